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
    resumed_from: Checkpoint | None = None
    start_step: int = 0
    best_loss: float = math.inf
    history: list = field(default_factory=list)   # a {global_step, train_loss, val_loss, is_best} per checkpoint
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

    def checkpoint_due(self, step: int) -> bool:
        """Validation and a checkpoint at every step divisible by validation_interval, and at the last."""
        return step % self.config.validation_interval == 0 or self.is_last(step)
