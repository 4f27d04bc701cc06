"""One training session's state: what ddp_train.py's set_up builds and its loop reads and
updates, in one object that the package's pieces (metrics, progress, preflight,
checkpoints' meta.json) take instead of long argument lists; and what is done with that
state as a whole: resuming it from a checkpoint, saving it as one (and handing it to the
mirror), rolling it back before a loss spike, the validation loss."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from . import checkpointing, weights

from . import run_history
from .checkpointing import Checkpoint
from .config import TrainConfig
from .optimizer import load_optimizer_state, resume_schedule
from .devices import to_device
from .parallel import (Ranks, WrappedModel, all_reduce_sum, finish_process_group, load_full_model_state,
                       restore_rng_states)
from .token_data import TokenBatches


@dataclass
class Training:
    ranks: Ranks
    run_dir: Path
    model_config: dict
    config: TrainConfig
    device: torch.device
    dtype_name: str
    train_batches: TokenBatches
    val_batches: TokenBatches
    model: WrappedModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: object = None      # the later original's learning-rate schedule (optimizer.original_schedule)
    resumed_from: Checkpoint | None = None
    start_step: int = 0
    best_loss: float = math.inf
    history: list = field(default_factory=list)   # a {global_step, train_loss, val_loss, is_best} per checkpoint
    best_key: str = "val_loss"    # the meta.json number `best` is the lowest of (run_history.best_loss_key)
    health: object = None         # health.Health: non-finite steps and loss spikes
    skipped_steps: list = field(default_factory=list)   # [first, last] step ranges a rollback skipped
    rollbacks: int = 0            # how many times the run went back to a checkpoint before a loss spike
    injected_loss: tuple | None = None  # a test's (steps, factor) for this rank's loss (health.LOSS_TIMES_VARIABLE)
    preemption: object = None     # preemption.Preemption: SIGTERM's flag; None in a preflight
    resumed_session: dict | None = None   # the checkpoint's half-done sums, for the metrics once they exist
    saved_model_state: dict | None = None  # the newest checkpoint's full weights (rank 0), for its benchmarks
    mirror: object = None         # mirror.CheckpointMirror on global rank 0 when train.json names one
    run_lock: object = None       # global rank 0's hold on the run directory (safe_files.lock_run)
    metrics: object = None        # metrics.MetricsLog on every rank of a real run; None in a preflight
    benchmarks: object = None     # benchmark_scores.InTrainingBenchmarks when train.json has benchmark_tasks

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches a global step trains on: every rank's, every accumulation step's."""
        return self.ranks.world_size * self.config.gradient_accumulation_steps

    @property
    def total_steps(self) -> int:
        return len(self.train_batches) // self.micro_batches_per_step

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batches_per_step * self.config.minibatch_size * self.model_config["context_length"]

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def is_last(self, step: int) -> bool:
        return step == self.total_steps - 1

    @property
    def is_moe(self) -> bool:
        return "moe" in self.model_config

    def checkpoint_due(self, step: int) -> bool:
        """A checkpoint (after validation, where the run validates) at every step divisible
        by checkpoint_interval (validation_interval), and at the last."""
        return step % self.config.checkpoint_interval == 0 or self.is_last(step)

    def next_step(self, step: int) -> int:
        """The step after `step`, past the ranges a rollback skipped (their batches are
        never trained on: a step's batches are fixed by its number)."""
        step += 1
        for first, last in self.skipped_steps:
            if first <= step <= last:
                step = last + 1
        return step


def resume(training: Training, checkpoint: Checkpoint, say=print) -> None:
    """Continue where `checkpoint` left off: optimizer, scaler and schedule states, the
    step, the best loss and loss history, every rank's generator states, the rollbacks
    and skipped steps (the weights are already loaded)."""
    ranks, device = training.ranks, training.device
    training.resumed_from = checkpoint
    state = checkpointing.read_resume_state(checkpoint)
    load_optimizer_state(training.model.model, training.optimizer, state.optimizer_state,
                         checkpoint.path / checkpointing.OPTIMIZER_FILE, sharded=training.model.sharded)
    if training.scaler.is_enabled() and state.scaler_state:
        training.scaler.load_state_dict(state.scaler_state)
    training.start_step = checkpoint.global_step + 1
    if training.scheduler is not None:
        resume_schedule(training.optimizer, training.scheduler, state.scheduler_state, training.start_step)
    training.best_loss = run_history.best_loss(training.checkpoints_dir, training.best_key)
    training.history = run_history.run_history(training.checkpoints_dir, resuming_from=checkpoint)
    if ranks.is_main:
        for line in checkpointing.changed_settings(checkpoint, training.config):
            say(line)
    training.skipped_steps = [list(pair) for pair in checkpoint.meta.get("skipped_steps", [])]
    training.rollbacks = checkpoint.meta.get("rollbacks", 0)
    training.health.skipped.fill_(checkpoint.meta.get("nonfinite_steps", 0))
    if state.rng_state is not None and state.rng_state.get("world_size") == ranks.world_size:
        training.resumed_session = restore_rng_states(state.rng_state, ranks, device)
        if training.resumed_session is not None:
            training.health.load_state(training.resumed_session["health"])
    else:
        # The original scripts saved no generator states: dropout masks from here on
        # can't match an uninterrupted run, but stay distinct per rank and per resume.
        torch.manual_seed(training.seed + ranks.rank + 1_000_003 * training.start_step)
        if ranks.is_main:
            say(f"note: {checkpoint.name} holds no random-number generator states for "
                f"{ranks.world_size} rank(s); training goes on with freshly seeded ones")


def session_state(training: Training) -> dict:
    """This rank's half-done sums that a checkpoint carries (in rng_state.pt, beside the
    generators): the metrics' open row and window, the health counters. Empty at a
    regular checkpoint but for the counters; a preemption's resume point needs them all."""
    return {"metrics": training.metrics.state(), "health": training.health.state()}


def save(training: Training, step: int, result, losses: dict, is_best: bool, low_space_warning) -> str | None:
    """Every rank: gather what a checkpoint holds (collectives); global rank 0: write it
    (meta.json from checkpointing.checkpoint_meta) and return its name (None elsewhere)."""
    from .optimizer import full_optimizer_state
    from .parallel import full_model_state, rng_states

    ranks, model = training.ranks, training.model
    rng_state = rng_states(ranks, training.device, session_state(training))
    model_state = full_model_state(model, ranks)
    optimizer_state = full_optimizer_state(model.model, training.optimizer, sharded=model.sharded)
    training.saved_model_state = model_state   # what benchmarks at this checkpoint score (rank 0)
    if not ranks.is_main:
        return None
    low_space_warning()
    meta = checkpointing.checkpoint_meta(training, step, losses, is_best, result.learning_rate,
                                         None if result.grad_norm is None else result.grad_norm.item())
    # The later original writes scaler.pt only with its fp16 scaler; the first one always.
    keep_scaler = training.scaler.is_enabled() or training.config.dialect == "bf269c6"
    saved = checkpointing.save_checkpoint(
        training.checkpoints_dir, model_state=model_state, optimizer_state=optimizer_state,
        scaler_state=training.scaler.state_dict() if keep_scaler else None, rng_state=rng_state, meta=meta,
        scheduler_state=None if training.scheduler is None else training.scheduler.state_dict(),
        keep=training.config.keep_checkpoints, model_config=training.model_config)
    if training.mirror is not None:   # copied off the machine in the background (support/mirror.py)
        best = checkpointing.link_target(training.checkpoints_dir, "best")
        training.mirror.hand_over(saved.path, best.name if best else None)
    return saved.name


def roll_back(training: Training, spike_step: int) -> tuple[Checkpoint, list]:
    """"on_loss_spike": "rollback": back to the newest checkpoint before spike_step, every
    rank, skipping the batches of the spike's window (the loss_spike_window steps up to
    the spike, those after the checkpoint), as PaLM's authors did. Returns the checkpoint
    and the skipped range; training goes on at the checkpoint's next step."""
    before = [c for c in checkpointing.list_checkpoints(training.checkpoints_dir) if c.global_step < spike_step]
    checkpoint = before[-1]
    skipped = [max(checkpoint.global_step + 1, spike_step - training.config.loss_spike_window + 1),
               min(spike_step, training.total_steps - 2)]
    state = weights.with_tied_names(weights.read_weights(checkpoint.path / weights.MODEL_FILE),
                                    training.model_config, checkpoint.path / weights.MODEL_FILE)
    for key, buffer in training.model.model.state_dict().items():   # the original's files may lack the masks
        state.setdefault(key, buffer)
    load_full_model_state(training.model, state)
    rollbacks = training.rollbacks + 1
    resume(training, checkpoint, say=lambda line: None)
    training.rollbacks = rollbacks
    if skipped[0] <= skipped[1]:
        training.skipped_steps.append(skipped)
    training.health.forget_the_window()
    return checkpoint, skipped


@dataclass
class StepResult:
    """What train_step hands the loop: device tensors (nothing waits for the device) and
    the learning rate the step used."""
    loss_sum: torch.Tensor            # this rank's loss summed over the micro-steps
    learning_rate: float
    grad_norm: torch.Tensor | None    # the global norm before clipping, where train.json clips
    micro_losses: list                # each micro-step's loss (global rank 0's feed the later original's meta.json)
    routing: list = field(default_factory=list)   # per micro-step (router probabilities, top-k weights), each (layers, experts)
    balance_loss: torch.Tensor | None = None       # the load-balancing loss summed over the micro-steps, where trained
    global_loss_sum: torch.Tensor | None = None    # loss_sum summed over the ranks: the same on every rank
    mean_loss: torch.Tensor | None = None          # the step's mean loss over every rank and micro-step
    nonfinite: torch.Tensor | None = None          # 1.0 where the loss or gradient norm was not finite (skipped)
    nonfinite_what: torch.Tensor | None = None     # which: 1 the loss, 2 the gradient norm, 3 both
    stop: bool = False                             # SIGTERM reached a rank a step ago: stop after this one


def rolling_back(training: Training, spike: int) -> bool:
    """Whether a spike at step `spike` rolls the run back: asked for, rollbacks left, and a
    checkpoint before it to go back to."""
    config = training.config
    return (config.on_loss_spike == "rollback" and training.rollbacks < config.max_rollbacks
            and any(c.global_step < spike for c in checkpointing.list_checkpoints(training.checkpoints_dir)))


@torch.inference_mode()
def validation_loss(training: Training) -> float:
    """Mean loss over validation batches 0..n-1, the original's number, with each rank
    computing a share (batches rank, rank + W, ...) and one all-reduce joining them."""
    model, ranks, batches = training.model, training.ranks, training.val_batches
    model.evaluation.eval()
    losses = torch.zeros(len(batches), device=training.device)
    # Every rank runs the same number of forward passes: under FSDP each one all-gathers
    # the weights with every other rank, so a rank with one batch fewer would hang the
    # rest. The last round's spare ranks recompute batch 0 and drop the result.
    for first in range(0, len(batches), ranks.world_size):
        index = first + ranks.rank
        inputs, targets = to_device(batches[index if index < len(batches) else 0], training.device)
        with model.autocast:
            loss = model.evaluation(inputs, targets=targets)
        if index < len(batches):
            losses[index] = loss
    all_reduce_sum(losses, ranks)  # each entry is non-zero on one rank only: sums are exact
    model.evaluation.train()
    # Added up in batch order in Python floats, as the original did batch by batch.
    return sum(losses.tolist()) / len(batches)


def wait_for_the_mirror(training: Training) -> None:
    """Global rank 0: the copies still under way finished; a checkpoint that did not get
    to the mirror is one line and a non-zero exit, once the other ranks are done."""
    if training.mirror is None:
        return
    missing = training.mirror.wait()
    if missing:
        finish_process_group(training.ranks)
        raise click.ClickException(f"{len(missing)} checkpoint(s) did not get to the mirror "
                                   f"{training.config.checkpoint_mirror}: {', '.join(missing)}")
