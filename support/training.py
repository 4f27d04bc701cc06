"""One training session's state: what ddp_train.py's set_up builds and its loop reads and
updates, in one object that the package's pieces (metrics, progress, preflight,
checkpoints' meta.json) take instead of long argument lists."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpointing import Checkpoint
from .config import TrainConfig
from .parallel import Ranks, WrappedModel
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
    best_key: str = "val_loss"    # the meta.json number `best` is the lowest of (checkpointing.best_loss_key)
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
