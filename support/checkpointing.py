"""A run's checkpoint directories: listing, meta.json, saving, pruning, the resume state.

A run's checkpoints keep the original scripts' layout, so existing runs keep working:

    runs/RUN/checkpoints/
        20251209Z143355-iteration-1000/    (UTC time it was written, global step)
            model.safetensors   the bare model's state dict (loads strictly into GPTModel)
            optimizer.pt        AdamW state
            scaler.pt           GradScaler state (empty when no scaler is used; a c894ed0-dialect
                                run writes it only with its fp16 scaler, as the original)
            scheduler.pt        the later original's learning-rate schedule (schedule_learning_rate)
            rng_state.pt        every rank's random-number generator states (ours only)
            meta.json           bf269c6: train_loss, val_loss, global_step, is_best, and more;
                                c894ed0: learning_rate, min/max/avg_train_loss, ..., and more
        best -> 20251209Z143355-iteration-1000     (relative symlinks)
        latest -> ...

Crash safety. A checkpoint is written into a hidden directory (`.partial-NAME`),
every file and the directory are fsynced, and only then is it renamed to NAME: a
process killed at any instant leaves either a complete checkpoint or a hidden
leftover, never a half-written one under its final name. `best` and `latest` are
swapped by renaming a new symlink over the old one, so they always point at a
complete checkpoint. Old checkpoints are deleted the same way round: renamed out
of sight first, removed after. Listing skips anything that isn't a complete
checkpoint, including the leftovers of the original scripts' non-atomic saves.

A failed save (a full disk above all) removes what it wrote before it raises, and
says in one line what happened (safe_files.write_failure). The weights file itself
is weights.py's.
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import click
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import safe_files
from .weights import CONFIG_METADATA_KEY, MODEL_FILE, CheckpointError, read_torch_file, tensors_to_save


OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
META_FILE = "meta.json"
LINK_NAMES = ("best", "latest")
PARTIAL_PREFIX = ".partial-"     # a checkpoint being written
DOOMED_PREFIX = ".deleting-"     # a pruned checkpoint being removed
NAME_PATTERN = re.compile(r"^(?P<time>\d{8}Z\d{6})-iteration-(?P<step>\d+)$")


# --- which run, which checkpoint ---

def find_run_dir(runs_dir: Path, run: str) -> Path:
    """runs/RUN, as the original; or RUN itself when it is a path to a run directory."""
    candidates = [Path(run)] if os.sep in run or run.startswith(".") else [Path(runs_dir) / run, Path(run)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise click.ClickException(
        f"no run directory {candidates[0]} (a run is a directory holding model.json and train.json)")


def find_checkpoint_to_resume(checkpoints_dir: Path, name: str | None):
    """The checkpoint to resume from; None for a fresh run, which must not clobber an old one.
    `auto` takes the newest complete checkpoint: what `latest` points at, or one a crash
    left complete before `latest` was moved to it."""
    if name == "auto":
        existing = list_checkpoints(checkpoints_dir)
        return existing[-1] if existing else None
    if name is not None:
        return resolve_checkpoint(checkpoints_dir, name)
    existing = list_checkpoints(checkpoints_dir)
    if existing:
        raise click.ClickException(
            f"{checkpoints_dir} already holds {len(existing)} checkpoint(s), newest "
            f"{existing[-1].name}: pass `latest` (or another checkpoint) to resume, or move "
            f"that directory away to start this run again"
        )
    return None


# --- listing ---

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str          # directory name, e.g. 20251209Z143355-iteration-1000
    path: Path
    global_step: int
    meta: dict

    @property
    def written_at(self) -> str:
        return NAME_PATTERN.match(self.name)["time"]


def read_meta(checkpoint_dir) -> dict:
    """meta.json of a checkpoint, with errors naming the file and what is wrong with it."""
    path = Path(checkpoint_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text, so not JSON") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    step = meta.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: no valid 'global_step' (got {json.dumps(step)})")
    return meta


def _why_incomplete(path: Path) -> str:
    """What keeps the directory at path from being a complete checkpoint, in words."""
    if not NAME_PATTERN.match(path.name):
        return f"{path.name} is not a checkpoint name (like 20251209Z143355-iteration-1000)"
    if not path.is_dir():
        return f"{path} is not a directory"
    if not (path / MODEL_FILE).is_file():
        return f"{path} has no {MODEL_FILE}"
    try:
        read_meta(path)
    except CheckpointError as error:
        return error.message
    return f"{path} is not a complete checkpoint"


def _link_problem(link: Path) -> str:
    """What is wrong with a `best` or `latest` symlink that points at no complete checkpoint."""
    shown = os.readlink(link)
    target = link.parent / shown   # as the user wrote the directory, not made absolute
    if not target.exists():
        return f"points at {shown}, which does not exist"
    return f"points at {shown}, which is incomplete: {_why_incomplete(target)}"


def _complete_checkpoint(path: Path, name: str) -> Checkpoint | None:
    """The checkpoint at path, or None for anything that isn't a complete one."""
    if not NAME_PATTERN.match(name) or not path.is_dir() or not (path / MODEL_FILE).is_file():
        return None
    try:
        meta = read_meta(path)
    except CheckpointError:
        return None  # e.g. the original scripts died before writing meta.json, their last file
    return Checkpoint(name, path, meta["global_step"], meta)


def list_checkpoints(checkpoints_dir) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (by the time in the name, then the step).

    Symlinks, hidden leftovers of interrupted saves and deletions, stray files and
    directories without a complete set of files are all skipped.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        if entry.is_symlink() or entry.name.startswith("."):
            continue
        checkpoint = _complete_checkpoint(entry, entry.name)
        if checkpoint is not None:
            found.append(checkpoint)
    return sorted(found, key=lambda c: (c.written_at, c.global_step))


def link_target(checkpoints_dir, link_name) -> Checkpoint | None:
    """The complete checkpoint that `best` or `latest` points at, or None."""
    link = Path(checkpoints_dir) / link_name
    if not link.is_symlink():
        return None
    target = link.resolve()
    return _complete_checkpoint(target, target.name)


def resolve_checkpoint(checkpoints_dir, name: str) -> Checkpoint:
    """A checkpoint named on the command line: `latest`, `best` or a directory name."""
    checkpoints_dir = Path(checkpoints_dir)
    if name in LINK_NAMES:
        checkpoint = link_target(checkpoints_dir, name)
        if checkpoint is None:
            link = checkpoints_dir / name
            problem = _link_problem(link) if link.is_symlink() else "does not exist"
            raise CheckpointError(f"{link} {problem}{_available(checkpoints_dir)}")
        return checkpoint
    if "/" in name or os.sep in name or not NAME_PATTERN.match(name):
        raise CheckpointError(
            f"'{name}' is not a checkpoint name: give latest, best, or a directory name "
            f"like 20251209Z143355-iteration-1000 under {checkpoints_dir}{_available(checkpoints_dir)}"
        )
    path = checkpoints_dir / name
    checkpoint = _complete_checkpoint(path, name)
    if checkpoint is None:
        problem = f"is incomplete: {_why_incomplete(path)}" if path.exists() else "does not exist"
        raise CheckpointError(f"{path} {problem}{_available(checkpoints_dir)}")
    return checkpoint


def link_warnings(checkpoints_dir, best_key: str = "val_loss") -> list[str]:
    """A warning line for `best` or `latest` pointing at no complete checkpoint (a garbage
    meta.json, a deleted directory). Training goes on without it -- the best loss so far
    comes from the other checkpoints -- and the next save re-points it; this says so."""
    checkpoints_dir = Path(checkpoints_dir)
    warnings = []
    for link_name in LINK_NAMES:
        link = checkpoints_dir / link_name
        if not link.is_symlink() or link_target(checkpoints_dir, link_name) is not None:
            continue
        if link_name == "best":
            from .run_history import best_loss   # it lists checkpoints with this module

            loss = best_loss(checkpoints_dir, best_key)
            what = {"val_loss": "validation loss", "train_loss": "train loss"}.get(best_key, best_key)
            consequence = (f"the best {what} so far is taken from the other checkpoints "
                           f"({'none' if math.isinf(loss) else f'{loss:.4f}'}), and best moves to the "
                           f"next checkpoint that beats it")
        else:
            consequence = "latest moves to the next checkpoint written"
        warnings.append(f"warning: {link} {_link_problem(link)}; {consequence}")
    return warnings


def _available(checkpoints_dir) -> str:
    names = [c.name for c in list_checkpoints(checkpoints_dir)]
    if not names:
        return " (there are no complete checkpoints)"
    shown = ", ".join(names[-3:])
    return f" (newest: {shown}{f'; {len(names)} in all' if len(names) > 3 else ''})"


# --- meta.json ---

def checkpoint_meta(training, step: int, losses: dict, is_best: bool, learning_rate: float,
                    grad_norm: float | None) -> dict:
    """What a checkpoint's meta.json says. `losses` holds train_loss (every rank's mean),
    val_loss (None without validation) and the later original's window statistics
    (window_statistics in metrics.py). A bf269c6-dialect run writes the original's first
    four keys (train_loss, val_loss, global_step, is_best), a c894ed0-dialect run its
    eleven, in its order; ours follow, so that a resume can check it continues the same
    run (`check_resumable`), the chart survives pruning (history: a {global_step,
    train_loss, val_loss, is_best} point per checkpoint), and a person sees how the
    checkpoint was trained. `training` is the session (support/training.py), its history
    already holding this checkpoint's point."""
    config = training.config
    if config.dialect == "c894ed0":
        window = losses["window"] or dict.fromkeys(WINDOW_KEYS)   # a resume point's window goes on
        meta = {"learning_rate": learning_rate, **{key: window[key] for key in WINDOW_KEYS},
                "global_step": step, "is_best": is_best, "train_loss": losses["train_loss"]}
        if config.validates:
            meta["val_loss"] = losses["val_loss"]
    else:
        meta = {"train_loss": losses["train_loss"], "val_loss": losses["val_loss"], "global_step": step,
                "is_best": is_best}
        if training.is_moe and losses["window"] is not None:
            meta.update({key: losses["window"][key] for key in ("moe_routing_weights", "moe_routing_topk_weights")})
    return meta | {
        "tokens_seen": (step + 1) * training.tokens_per_step, "learning_rate": learning_rate,
        "grad_norm": grad_norm, "world_size": training.ranks.world_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "minibatch_size": config.minibatch_size, "context_length": training.model_config["context_length"],
        "dtype": training.dtype_name, "seed": config.seed, "history": training.history,
        "parallelism": "fsdp" if training.model.sharded else "ddp",
        "activation_checkpointing": config.activation_checkpointing,
        # How healthy the run was (support/health.py): steps skipped for not being
        # finite, rollbacks before loss spikes and the steps they skipped, the spike window.
        "nonfinite_steps": training.health.skipped_total(), "rollbacks": training.rollbacks,
        "skipped_steps": training.skipped_steps,
        # A resume point written at a SIGTERM (support/preemption.py): no validation, never best.
        "preempted": losses["train_loss"] is None,
        # train.json's optimisation settings, so that a resume can say which of them changed.
        "optimisation": {key: getattr(config, key) for key in OPTIMISATION_KEYS},
    }


# The settings a resumed run may change, but should be told it did (learning rate and
# schedule, decay, clipping, accumulation's share of the loss, the balancing loss).
OPTIMISATION_KEYS = ("learning_rate", "weight_decay", "warmup_steps", "lr_schedule", "min_learning_rate",
                     "warmup_percent", "grad_clip", "moe_balance_loss_weight")
# What the later original's dialect calls them, where the name differs.
C894ED0_NAMES = {"grad_clip": "clipping_max_norm", "warmup_percent": "warmup_period_percent",
                 "lr_schedule": "schedule_learning_rate"}


def changed_settings(checkpoint: "Checkpoint", config) -> list[str]:
    """A note line for each optimisation setting of train.json that is not what the
    checkpoint was trained with (checkpoints from before this was recorded say nothing)."""
    recorded = checkpoint.meta.get("optimisation")
    if not isinstance(recorded, dict):
        return []
    lines = []
    for key in OPTIMISATION_KEYS:
        if key in recorded and recorded[key] != getattr(config, key):
            name = C894ED0_NAMES.get(key, key) if config.dialect == "c894ed0" else key
            lines.append(f"note: train.json's {name} is now {json.dumps(getattr(config, key))}; {checkpoint.name} "
                         f"was trained with {json.dumps(recorded[key])}: going on with the new value")
    return lines


# The later original's meta.json keys between learning_rate and global_step, in its order.
WINDOW_KEYS = ("min_train_loss", "max_train_loss", "avg_train_loss", "max_grad_norms", "avg_grad_norms",
               "frac_clipped", "moe_routing_weights", "moe_routing_topk_weights")


def check_resumable(checkpoint: Checkpoint, *, world_size: int, gradient_accumulation_steps: int,
                    minibatch_size: int, context_length: int) -> None:
    """Refuse to resume with a data layout that would skip or repeat training batches.

    A global step trains on micro-batches s*W*A ... s*W*A + W*A - 1 (W ranks, A
    accumulation steps), so another world size resumes the same batches as long as
    W x A, minibatch_size and context_length stay the same (elastic resume)."""
    meta, path = checkpoint.meta, checkpoint.path / META_FILE
    for key, ours in (("minibatch_size", minibatch_size), ("context_length", context_length)):
        theirs = meta.get(key)  # absent from checkpoints written by the original scripts
        if theirs is not None and theirs != ours:
            raise CheckpointError(
                f"{path}: written with {key} {theirs}, this run has {ours}; resuming would "
                f"skip or repeat training batches, so resume with the same {key}"
            )
    their_ranks, their_steps = meta.get("world_size"), meta.get("gradient_accumulation_steps", 1)
    if their_ranks is None:
        return
    theirs, ours = their_ranks * their_steps, world_size * gradient_accumulation_steps
    if theirs != ours:
        advice = (f"with {world_size} rank(s) set gradient_accumulation_steps to {theirs // world_size}"
                  if theirs % world_size == 0 else f"use a number of ranks that divides {theirs}")
        raise CheckpointError(
            f"{path}: written by {their_ranks} rank(s) x {their_steps} accumulation step(s), this "
            f"run has {world_size} x {gradient_accumulation_steps}; resuming would skip or repeat "
            f"training batches: {advice}")


# --- writing ---

# Tests set CHECKPOINTING_TEST_KILL_AT=POINT@STEP to SIGKILL the saving process at a
# named point of the save of global step STEP: the only way to prove that a crash at
# exactly that instant leaves nothing half-visible. Unset, it does nothing.
KILL_AT_VARIABLE = "CHECKPOINTING_TEST_KILL_AT"


def _test_kill_point(point: str, global_step: int) -> None:
    if os.environ.get(KILL_AT_VARIABLE) == f"{point}@{global_step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as file:
        torch.save(obj, file)
        safe_files.flush_to_disk(file)


def _new_name(checkpoints_dir: Path, global_step: int) -> str:
    while True:
        name = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dZ%H%M%S}-iteration-{global_step}"
        if not os.path.lexists(checkpoints_dir / name):
            return name
        time.sleep(0.2)  # the same step saved twice within a second: wait for a fresh name


def point_link(checkpoints_dir: Path, link_name: str, target_name: str) -> None:
    """Make checkpoints_dir/link_name a relative symlink to target_name, atomically."""
    temporary = safe_files.hidden_temporary(checkpoints_dir / link_name, "tmp")
    if os.path.lexists(temporary):
        temporary.unlink()
    try:
        temporary.symlink_to(target_name, target_is_directory=True)
        os.replace(temporary, checkpoints_dir / link_name)
    finally:
        if os.path.lexists(temporary):
            temporary.unlink()
    safe_files.fsync_dir(checkpoints_dir)


def save_checkpoint(checkpoints_dir, *, model_state: dict, optimizer_state: dict,
                    scaler_state: dict | None, rng_state: dict | None, meta: dict, scheduler_state=None,
                    keep: int | None = None, model_config: dict | None = None) -> Checkpoint:
    """Write a complete checkpoint atomically, point `latest` (and `best` when meta says
    is_best) at it, and delete all but the newest `keep` (best and latest are kept).

    model_config (model.json's keys) goes into model.safetensors' metadata, so that the
    weights are refused by a model.json they were not written for. A failed write
    (a full disk above all) leaves nothing behind: the new checkpoint's files are
    removed before the error is raised, and every earlier checkpoint, `best` and
    `latest` stay as they were."""
    checkpoints_dir = Path(checkpoints_dir)
    global_step = meta["global_step"]
    # Copied off the GPU before the try: a CUDA error here is no write failure.
    tensors = {key: tensor.detach().contiguous().cpu() for key, tensor in model_state.items()}
    metadata = {"format": "pt"}
    if model_config is not None:
        tensors, aliases = tensors_to_save(tensors, model_config)
        metadata.update(aliases, **{CONFIG_METADATA_KEY: json.dumps(model_config)})
    name = None
    writing = {"file": None}   # the file being written, for the error message
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        name = _new_name(checkpoints_dir, global_step)
        partial = checkpoints_dir / f"{PARTIAL_PREFIX}{name}"
        _write_files(partial, global_step, tensors, metadata,
                     {OPTIMIZER_FILE: optimizer_state, SCALER_FILE: scaler_state, SCHEDULER_FILE: scheduler_state,
                      RNG_FILE: rng_state}, meta, writing)
        final = checkpoints_dir / name
        os.rename(partial, final)
        safe_files.fsync_dir(checkpoints_dir)
        _test_kill_point("after-rename", global_step)
        point_link(checkpoints_dir, "latest", name)
        _test_kill_point("after-latest", global_step)
        if meta.get("is_best"):
            point_link(checkpoints_dir, "best", name)
        if keep is not None:
            prune_checkpoints(checkpoints_dir, keep)
    except (OSError, SafetensorError, RuntimeError) as error:
        # Disk full, no permission, a network mount gone (torch.save reports those as
        # RuntimeError): whatever carries a final name is still complete.
        if name is not None:
            _take_back(checkpoints_dir, name)
        needed = estimated_checkpoint_bytes(tensors, optimizer_state, scaler_state or {}, rng_state, meta)
        what = f"checkpoint{f' {name}' if name else ''} of step {global_step}"
        raise CheckpointError(safe_files.write_failure(checkpoints_dir, what, error, writing["file"], needed)) from None
    return Checkpoint(name, final, global_step, meta)


def _take_back(checkpoints_dir: Path, name: str) -> None:
    """After a failed save: remove what it wrote unless `latest` already points at it
    (then it is the newest complete checkpoint and stays). Best effort: whatever can't
    be removed now is hidden, and removed when the next run starts."""
    for link_name in LINK_NAMES:
        temporary = safe_files.hidden_temporary(checkpoints_dir / link_name, "tmp")
        if temporary.is_symlink():
            with contextlib.suppress(OSError):
                temporary.unlink()
    latest = checkpoints_dir / "latest"
    if latest.is_symlink() and os.readlink(latest) == name:
        return
    with contextlib.suppress(OSError):
        if (checkpoints_dir / name).is_dir():  # renamed into place; latest not moved yet
            doomed = checkpoints_dir / f"{DOOMED_PREFIX}{name}"
            os.rename(checkpoints_dir / name, doomed)
            shutil.rmtree(doomed)
    shutil.rmtree(checkpoints_dir / f"{PARTIAL_PREFIX}{name}", ignore_errors=True)


def estimated_checkpoint_bytes(tensors: dict, optimizer_state: dict, scaler_state: dict,
                               rng_state: dict | None, meta: dict) -> int:
    """About what a checkpoint of these states takes on disk: every tensor's bytes, a
    little per tensor and per file for headers, and meta.json."""
    def state_bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.nelement() * value.element_size() + 128
        if isinstance(value, dict):
            return sum(state_bytes(key) + state_bytes(item) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return sum(state_bytes(item) for item in value)
        return 16

    files = [tensors, optimizer_state, scaler_state] + ([rng_state] if rng_state is not None else [])
    return (sum(state_bytes(state) + 1024 for state in files)
            + len(json.dumps(meta, indent=2).encode("utf-8")))


def checkpoint_bytes(checkpoint: Checkpoint) -> int:
    """What a checkpoint's files take (their sizes added up)."""
    return sum(entry.stat().st_size for entry in checkpoint.path.iterdir() if entry.is_file())


def low_space_warning(checkpoints_dir) -> str | None:
    """A warning line when the free space where checkpoints go is less than the newest
    complete checkpoint takes (the next will need as much), else None. For the trainer
    to print before each save."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints = list_checkpoints(checkpoints_dir)
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    try:
        size = checkpoint_bytes(newest)
        free = shutil.disk_usage(checkpoints_dir).free
    except OSError:
        return None  # the save itself will say what is wrong
    if free >= size:
        return None
    return (f"warning: {checkpoints_dir}: {safe_files.format_bytes(free)} free, less than the {safe_files.format_bytes(size)} "
            f"of the newest checkpoint {newest.name}; the next checkpoint will probably not fit")


def _write_files(partial: Path, global_step, tensors, metadata, torch_files: dict, meta, writing):
    """Every file of a checkpoint, into the hidden directory `partial`, synced to disk;
    torch_files maps a .pt file's name to its state (None: not written); writing["file"]
    names the one being written."""
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    writing["file"] = MODEL_FILE
    save_file(tensors, str(partial / MODEL_FILE), metadata=metadata)
    safe_files.give_usual_permissions(partial / MODEL_FILE)  # safetensors creates it owner-only
    safe_files.fsync_file(partial / MODEL_FILE)
    _test_kill_point("partial", global_step)
    for name, state in torch_files.items():
        if state is not None:
            writing["file"] = name
            _torch_save(state, partial / name)
    writing["file"] = META_FILE
    with open(partial / META_FILE, "w", encoding="utf-8") as file:
        json.dump(meta, file, indent=2)
        safe_files.flush_to_disk(file)
    writing["file"] = None
    safe_files.fsync_dir(partial)
    _test_kill_point("before-rename", global_step)


def prune_checkpoints(checkpoints_dir, keep: int) -> list[str]:
    """Delete all but the `keep` most recently written checkpoints, never the targets of
    `best` and `latest`. Returns the names deleted."""
    checkpoints_dir = Path(checkpoints_dir)
    protected = {c.name for c in (link_target(checkpoints_dir, link) for link in LINK_NAMES) if c}
    checkpoints = list_checkpoints(checkpoints_dir)
    doomed = [c for c in checkpoints[:max(0, len(checkpoints) - keep)] if c.name not in protected]
    for checkpoint in doomed:
        # Out of sight first: a crash mid-removal leaves a hidden leftover, not a
        # visible checkpoint with half its files.
        hidden = checkpoints_dir / f"{DOOMED_PREFIX}{checkpoint.name}"
        os.rename(checkpoint.path, hidden)
        _test_kill_point("mid-prune", checkpoint.global_step)
        shutil.rmtree(hidden)
    if doomed:
        safe_files.fsync_dir(checkpoints_dir)
    return [c.name for c in doomed]


def remove_leftovers(checkpoints_dir) -> list[str]:
    """Remove what interrupted saves, deletions and link swaps left behind.

    Only call this when no other process is writing into the directory (ddp_train.py
    does, on global rank 0, before training starts)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    removed = []
    for entry in checkpoints_dir.iterdir():
        name = entry.name
        if name.startswith((PARTIAL_PREFIX, DOOMED_PREFIX)) and not entry.is_symlink() and entry.is_dir():
            shutil.rmtree(entry)
        elif name.startswith(".") and name.endswith(".tmp") and entry.is_symlink():
            entry.unlink()
        else:
            continue
        removed.append(name)
    return removed


# --- reading what resuming needs ---

@dataclasses.dataclass
class ResumeState:
    checkpoint: Checkpoint
    optimizer_state: dict
    scaler_state: dict | None      # None where the checkpoint has no scaler.pt (the later original without AMP)
    rng_state: dict | None         # None for checkpoints written by the original scripts
    scheduler_state: dict | None   # the later original's learning-rate schedule, where it had one


def _read_state_dict(path: Path, what: str, required: bool = True) -> dict | None:
    if not required and not path.exists():
        return None
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not {what}")
    return state


def read_resume_state(checkpoint: Checkpoint) -> ResumeState:
    """Optimizer, scaler, RNG and schedule states of a checkpoint (the weights are read separately)."""
    path = checkpoint.path
    optimizer_state = _read_state_dict(path / OPTIMIZER_FILE, "an optimizer state dict")
    if "state" not in optimizer_state:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: not an optimizer state dict")
    return ResumeState(checkpoint, optimizer_state,
                       _read_state_dict(path / SCALER_FILE, "a GradScaler state dict", required=False),
                       _read_state_dict(path / RNG_FILE, "an RNG state dict", required=False),
                       _read_state_dict(path / SCHEDULER_FILE, "a learning-rate scheduler's state dict",
                                        required=False))
