"""A run's loss history and its best, read from its checkpoints' meta.json: the points the
loss chart draws, what `best` means for a run (its validation loss, or without validation
its train loss), and the best so far that a resumed run has to beat."""

import math

from .checkpointing import Checkpoint, link_target, list_checkpoints


def best_loss_key(config) -> str:
    """Which meta.json number `best` is the lowest of: the validation loss where a run
    validates; else the later original's window average of rank 0's train losses
    (c894ed0 dialect), or our mean train loss."""
    if config.validates:
        return "val_loss"
    return "avg_train_loss" if config.dialect == "c894ed0" else "train_loss"


def best_loss(checkpoints_dir, key: str = "val_loss") -> float:
    """meta.json's `key` of the checkpoint `best` points at (as the original scripts read
    it); the lowest listed if `best` has none; infinity when there are no checkpoints."""
    best = link_target(checkpoints_dir, "best")
    if best is not None and _is_number(best.meta.get(key)):
        return float(best.meta[key])
    losses = [float(c.meta[key]) for c in list_checkpoints(checkpoints_dir) if _is_number(c.meta.get(key))]
    return min(losses, default=math.inf)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def loss_history(checkpoints_dir, up_to_step=None) -> list[dict]:
    """(global_step, train_loss, val_loss, is_best) points from every complete checkpoint.

    Used where a checkpoint carries no `history` of its own (the original scripts'):
    one point per step, the most recently written checkpoint winning where a run
    was resumed from an earlier one and went over the same steps again.
    """
    points = {}
    for checkpoint in list_checkpoints(checkpoints_dir):  # oldest first: newer ones overwrite
        meta = checkpoint.meta
        if up_to_step is not None and checkpoint.global_step > up_to_step:
            continue
        point = history_point(meta)
        if _is_number(point["train_loss"]):
            points[checkpoint.global_step] = point
    return [points[step] for step in sorted(points)]


def history_point(meta: dict) -> dict:
    """A checkpoint's point of the loss history: its train loss (the later original's
    window average where that is all it has) and validation loss (None without)."""
    train_loss = meta.get("train_loss", meta.get("avg_train_loss"))
    return {"global_step": meta["global_step"], "train_loss": train_loss, "val_loss": meta.get("val_loss"),
            "is_best": bool(meta.get("is_best", False))}


def run_history(checkpoints_dir, resuming_from: Checkpoint | None = None) -> list[dict]:
    """The run's loss history up to resuming_from, or up to `latest` when that is None.

    Our checkpoints carry the whole history in meta.json (so the chart survives
    keep_checkpoints deleting old ones). The original scripts' don't: it is rebuilt
    from every complete checkpoint's meta.json (up to resuming_from's step).
    """
    source = resuming_from or link_target(checkpoints_dir, "latest")
    if source is not None and isinstance(source.meta.get("history"), list):
        return source.meta["history"]
    return loss_history(checkpoints_dir, up_to_step=resuming_from.global_step if resuming_from else None)
