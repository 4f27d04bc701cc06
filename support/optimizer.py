"""AdamW, the learning-rate schedule, and the optimizer state a checkpoint holds.

The state is saved as torch's index-keyed `optimizer.state_dict()` (the original
scripts' optimizer.pt format), each parameter group also listing its parameters' names
so the file says which tensor is which. The same file loads under DDP and FSDP, and
the original scripts' files load too.
"""

import math
from pathlib import Path

import torch

from .checkpointing import CheckpointError
from .config import TrainConfig
from .parallel import full_on_cpu


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device):
    """AdamW with fused kernels on CUDA and CPUs (4x faster than the for-each
    kernels at 163M on a CPU). weight_decay_scope "all" is the original's one
    parameter group (its optimizer.pt files load into it); "matrices" exempts biases,
    norm scales/shifts (everything below 2-D) from decay, as GPT-2 practice does."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay_scope == "all":
        groups = [{"params": parameters, "weight_decay": config.weight_decay}]
    else:
        groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate,
                             fused=True if device.type in ("cuda", "cpu") else None)


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to min_learning_rate
    at the last step. The defaults give the original scripts' constant 0.0004."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    decay_steps = max(1, total_steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (
        1.0 + math.cos(math.pi * progress))


def original_schedule(optimizer, config: TrainConfig, total_steps: int):
    """The later original's `schedule_learning_rate`, built from torch's schedulers as it
    builds them, so that its scheduler.pt loads here and ours there: LinearLR from
    LR x 1e-5 to LR over W = (T x warmup_period_percent) // 100 steps, then
    CosineAnnealingLR towards LR / 10 over the other T - W, in a SequentialLR. The LR a
    step uses is the optimizer's before the scheduler steps (train_step reads it so).

    Without a warm-up (W = 0) it is a plain cosine from the peak, as torch 2.13 and later
    give it. torch's SequentialLR before that took the LinearLR's first step anyway: the
    run began at LR x 1e-5, went negative at step 1 and never reached the peak. That is
    not what anyone asks for, so an older torch is put in the state a newer one starts in."""
    learning_rate = config.learning_rate
    warmup = (total_steps * config.warmup_percent) // 100
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.00001, end_factor=1.0,
                                               total_iters=warmup)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup,
                                                        eta_min=learning_rate / 10)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[linear, cosine], milestones=[warmup])
    if warmup == 0 and optimizer.param_groups[0]["lr"] != optimizer.param_groups[0]["initial_lr"]:
        start_at_the_peak(optimizer, cosine, scheduler)
    return scheduler


def start_at_the_peak(optimizer, cosine, scheduler) -> None:
    """An older torch's SequentialLR without warm-up, put in the state of torch 2.13's:
    every group back at its peak, and the cosine's first step taken there."""
    import warnings

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    cosine.last_epoch = -1
    with warnings.catch_warnings():   # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore")
        cosine.step()
    scheduler._last_lr = cosine.get_last_lr()


def resume_schedule(optimizer, scheduler, saved: dict | None, start_step: int) -> None:
    """Continue the original's schedule where a checkpoint left it: its scheduler.pt where
    it has one, else (a checkpoint written without this schedule) the schedule stepped up
    to start_step. Every group's learning rate is then the schedule's for start_step, as
    the original's optimizer.pt holds it."""
    import warnings

    if saved is not None:
        scheduler.load_state_dict(saved)
    else:
        with warnings.catch_warnings():   # "lr_scheduler.step() before optimizer.step()": on purpose
            warnings.simplefilter("ignore")
            for _ in range(start_step):
                scheduler.step()
    for group, learning_rate in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = learning_rate


def clip_gradients(model, optimizer, scaler, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm (unscaled first, under fp16); returns the norm
    before clipping, as a device tensor. `model` is a parallel.WrappedModel."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.model.parameters(), max_norm)
    if model.sharded:  # FSDP: a DTensor, the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    return grad_norm


def gradient_norm(model) -> torch.Tensor:
    """The gradients' global norm (a device tensor), as clip_gradients returns it, for a
    run that does not clip: what tells a step whose gradients are not finite."""
    gradients = [p.grad for p in model.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(gradients)
    if model.sharded:
        norm = norm.full_tensor()
    return norm


def optimizer_step_unless(flag: torch.Tensor, optimizer, scaler) -> None:
    """optimizer.step(), skipped where flag (a 0-d float tensor on the device) is 1. Fused
    AdamW takes the flag as the GradScaler hands it its found_inf: the kernel leaves the
    weights and moments alone, and nothing waits for the device. Under fp16 the scaler
    skips steps with non-finite gradients itself. Other optimizers (MPS's for-each) read
    the flag on the host."""
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
        optimizer.found_inf = flag
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not flag.item():
        optimizer.step()
    scaler.update()


def set_learning_rate(optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def parameter_names_in_optimizer_order(model, optimizer) -> list[str]:
    """Parameter names in the order an index-keyed optimizer state dict counts them (its
    groups' params, one after the other). The same under DDP and FSDP."""
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    return [name_of[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def full_optimizer_state(model, optimizer, sharded: bool) -> dict:
    """The whole optimizer state, index-keyed, each group listing its parameters' names.
    Under FSDP it is gathered from the shards (a collective: every rank calls it;
    rank 0 gets the state, the others an empty dict)."""
    names = parameter_names_in_optimizer_order(model, optimizer)
    if not sharded:
        state = optimizer.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        by_name = get_optimizer_state_dict(model, optimizer, options=full_on_cpu())
        if not by_name.get("state") and not by_name.get("param_groups"):
            return {}
        index_of = {name: index for index, name in enumerate(names)}
        state = {"state": {index_of[name]: value for name, value in by_name["state"].items()},
                 "param_groups": [{**group, "params": [index_of[name] for name in group["params"]]}
                                  for group in by_name["param_groups"]]}
    for group in state["param_groups"]:
        group["param_names"] = [names[index] for index in group["params"]]
    return state


def load_optimizer_state(model, optimizer, saved: dict, path: Path, sharded: bool) -> None:
    """Load saved AdamW moments (written under DDP or FSDP, or by the original scripts).
    Each group keeps train.json's hyperparameters (and our kernel choice) and takes
    only its parameters from the file: torch would otherwise take every setting from
    it. Under FSDP the state goes in keyed by name, and every rank keeps its shard."""
    groups = _saved_groups_of_our_sizes(optimizer, saved, path)
    ours = [{key: value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups]
    try:
        if not sharded:
            optimizer.load_state_dict({
                "state": saved["state"],
                "param_groups": [{**settings, "params": theirs["params"]}
                                 for settings, theirs in zip(ours, groups)]})
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = parameter_names_in_optimizer_order(model, optimizer)
        by_name = {
            "state": {names[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**settings, "params": [names[index] for index in theirs["params"]]}
                             for settings, theirs in zip(ours, groups)],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: optimizer state does not fit ({error})") from None


def _saved_groups_of_our_sizes(optimizer, saved: dict, path: Path) -> list:
    """The saved parameter groups, refused unless they match this optimizer's group sizes
    (e.g. a checkpoint written under another weight_decay_scope)."""
    groups = saved.get("param_groups", [])
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if [len(group.get("params", [])) for group in groups] != sizes:
        raise CheckpointError(
            f"{path}: optimizer state is for parameter groups of sizes "
            f"{[len(group.get('params', [])) for group in groups]}, this model has {sizes}")
    return groups
