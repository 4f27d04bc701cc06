"""runs/RUN/metrics.jsonl: what happened at every step, one JSON object per line.

Global rank 0 appends these kinds of rows (every key is documented in the README):

    {"kind": "train", "step": 41, "loss": 5.91, "learning_rate": 0.0004,
     "grad_norm": 0.83, "clipped_fraction": 0.0, "tokens_per_second": 51234.5, "mfu": 0.41,
     "tokens_seen": 1376256, "elapsed_seconds": 26.9, "cpu_rss_bytes": 1203765248}
    {"kind": "validation", "step": 50, "train_loss": 5.87, "val_loss": 5.93,
     "is_best": true, "checkpoint": "20261202-120000-iteration-50"}
    {"kind": "benchmark", "step": 50, "checkpoint": "20261202-120000-iteration-50",
     "tasks": ["hellaswag"], "limit": 500, "seconds": 41.2, "hellaswag/acc": 0.286,
     "hellaswag/acc_stderr": 0.0202, "hellaswag/acc_norm": 0.298, "hellaswag/acc_norm_stderr": 0.0205}

A training row stands for the steps since the previous training row: `loss` is the mean
over those steps, every rank and every micro-step; `grad_norm` (present when grad_clip is
set) the mean norm before clipping and `clipped_fraction` the share of those steps whose
norm was clipped. On CUDA `cuda_max_allocated_bytes` replaces `cpu_rss_bytes`. A benchmark
row (train.json's benchmark_tasks; see benchmark_scores.py) holds lm-eval's scores of the
checkpoint of its step, as TASK/METRIC keys.
"""

import dataclasses
import importlib.util
import json
import os
import secrets
import string
import time
from pathlib import Path

import click
import torch

from . import safe_files
from .parallel import Ranks, all_reduce_sum

METRICS_FILE = "metrics.jsonl"


def read_metrics(path) -> tuple[list[dict], list[int]]:
    """The rows of a metrics file and the numbers (1-based) of lines that are not a JSON
    object with an integer step (a torn last line after a crash, or garbage)."""
    rows, bad_lines = [], []
    path = Path(path)
    if not path.exists():
        return rows, bad_lines
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad_lines.append(number)
                continue
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                bad_lines.append(number)
                continue
            rows.append(row)
    return rows, bad_lines


class MetricsError(click.ClickException):
    """A logger that can't start (a missing package, a directory that can't be made)."""


def check_loggers_installed(config, train_json) -> None:
    """Every rank, at start-up: an enabled logger whose package is missing is one line,
    before anything is written."""
    wanted = [("tensorboard", config.tensorboard, "tensorboard", "uv sync"),
              ("wandb_project", config.wandb_project is not None, "wandb", "uv sync --extra wandb")]
    for key, enabled, package, install in wanted:
        if enabled and not importable(package):
            raise MetricsError(f"{train_json}: key '{key}' is set, but the {package} package is not "
                               f"installed (install it with `{install}`, or unset the key)")


def importable(package: str) -> bool:
    """Whether `import package` would find it (without importing it: wandb takes seconds)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def memory_in_use(device: torch.device) -> dict:
    """Device memory where it can be read without waiting for the device."""
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    try:  # Linux: resident pages of this process
        with open("/proc/self/statm") as statm:
            return {"cpu_rss_bytes": int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    except (OSError, ValueError, IndexError):
        return {}


class MetricsLog:
    """Collects the training rows on the device as the steps go, and (global rank 0)
    writes them to metrics.jsonl, TensorBoard and W&B whenever the host reads them anyway.

    Every rank calls `step_done` each step; at the end of a row's steps the row's loss
    sum is all-reduced (a one-number collective, queued on the device like the gradient
    all-reduce before it: no host wait). Only `write_rows` reads the device, and the
    training loop calls it when the progress bar refreshes (about once a second), at
    checkpoints and at the end, so logging every step costs no synchronisation.
    """

    def __init__(self, *, run_dir: Path, ranks: Ranks, device: torch.device, config, model_config: dict,
                 tokens_per_step: int, micro_batches_per_step: int, row_ends_at):
        self.run_dir, self.ranks, self.device, self.config = Path(run_dir), ranks, device, config
        self.tokens_per_step, self.micro_batches_per_step = tokens_per_step, micro_batches_per_step
        self.row_ends_at = row_ends_at            # step -> True where a training row ends
        self.path = self.run_dir / METRICS_FILE
        self.file = self.tensorboard = self.wandb_run = None
        self.model_config = model_config
        # The open row, on the device: its steps' local loss sum, norm sum and clip count.
        self.row_loss = torch.zeros((), device=device)
        self.row_norm = torch.zeros((), device=device)
        self.row_clipped = torch.zeros((), device=device)
        self.row_steps = 0
        # Closed rows not yet written: (step, steps, loss sum, norm sum, clipped, lr, seconds)
        self.pending = []
        self.elapsed_before = 0.0     # elapsed_seconds of the run before this session
        self.started = time.monotonic()
        self.window = (self.started, None)   # (time, step) of the previous write

    # --- start-up (global rank 0) ---

    def open(self, resumed_from=None, history=(), checkpoint_names=None) -> list[str]:
        """Prepare metrics.jsonl for this session and start the enabled loggers; returns
        lines to print. A resume first drops the rows past its checkpoint's step."""
        notes = []
        resume_step = None if resumed_from is None else resumed_from.global_step
        # The loggers that can fail start first, so that a failure leaves the log as it was.
        if self.config.tensorboard:
            self.tensorboard = start_tensorboard(self.run_dir / "tensorboard", resume_step)
        if self.config.wandb_project is not None:
            self.wandb_run = start_wandb(self.run_dir, self.config, self.model_config)
        rows, bad_lines = read_metrics(self.path)
        if resume_step is None and any(row.get("kind") == "validation" for row in rows):
            # A fresh start beside the log of a run whose checkpoints were moved away:
            # that log goes with them, so keep it, aside. (Rows of a session that crashed
            # before its first checkpoint are simply dropped below.)
            aside = self.path.with_name(f"{METRICS_FILE}.{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.path, aside)
            notes.append(f"{self.path}: kept the earlier run's log as {aside.name}")
            rows, bad_lines = [], []
        elif bad_lines:
            aside = self.path.with_name(f"{METRICS_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.path, aside)
            notes.append(f"warning: {self.path} line {bad_lines[0]} is not a metrics row"
                         f"{f' ({len(bad_lines)} such lines)' if len(bad_lines) > 1 else ''}: rewritten "
                         f"from the checkpoints' history, the old file kept as {aside.name}")
            rows = history_rows(history, checkpoint_names or {})
        kept = [row for row in rows if resume_step is not None and row["step"] <= resume_step]
        if resume_step is not None and history and not any(
                row.get("kind") == "validation" and row["step"] == resume_step for row in kept):
            # The crash came between writing the checkpoint and logging it.
            kept += history_rows([history[-1]], {resume_step: resumed_from.name})
        if kept != rows or bad_lines or (kept and not self.path.exists()):
            safe_files.write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        trained = [row for row in kept if row.get("kind") == "train" and "elapsed_seconds" in row]
        self.elapsed_before = trained[-1]["elapsed_seconds"] if trained else 0.0
        self.file = open(self.path, "a", encoding="utf-8")
        return notes

    # --- every step (every rank) ---

    def step_done(self, step: int, step_loss: torch.Tensor, learning_rate: float, grad_norm) -> None:
        self.row_loss += step_loss
        if grad_norm is not None:
            self.row_norm += grad_norm
            self.row_clipped += grad_norm > self.config.grad_clip
        self.row_steps += 1
        if not self.row_ends_at(step):
            return
        loss_sum = all_reduce_sum(self.row_loss.clone(), self.ranks)
        if self.ranks.is_main:
            self.pending.append((step, self.row_steps, loss_sum, self.row_norm.clone(), self.row_clipped.clone(),
                                 learning_rate, time.monotonic()))
        self.row_loss.zero_()
        self.row_norm.zero_()
        self.row_clipped.zero_()
        self.row_steps = 0

    # --- writing (global rank 0) ---

    def write_rows(self, peak_flops: float, flops_per_token: float) -> None:
        """Read the closed rows off the device (one transfer) and write them."""
        if not self.ranks.is_main or not self.pending:
            return
        numbers = torch.stack([torch.stack([loss, norm, clipped]) for _, _, loss, norm, clipped, _, _ in self.pending])
        now = time.monotonic()
        window_start, window_step = self.window
        first_step = self.pending[0][0] - self.pending[0][1] + 1 if window_step is None else window_step + 1
        last_step = self.pending[-1][0]
        # Speed is measured over the whole window since the last write: single rows are
        # timed on the host, which runs ahead of the device.
        tokens_per_second = (last_step - first_step + 1) * self.tokens_per_step / max(now - window_start, 1e-9)
        memory = memory_in_use(self.device)
        for (step, steps, *_, learning_rate, seen_at), (loss, norm, clipped) in zip(self.pending, numbers.tolist()):
            row = {"kind": "train", "step": step, "loss": loss / (steps * self.micro_batches_per_step),
                   "learning_rate": learning_rate}
            if self.config.grad_clip is not None:
                row["grad_norm"] = norm / steps
                row["clipped_fraction"] = clipped / steps
            row.update(tokens_per_second=tokens_per_second,
                       mfu=tokens_per_second / self.ranks.world_size * flops_per_token / peak_flops,
                       tokens_seen=(step + 1) * self.tokens_per_step,
                       elapsed_seconds=round(self.elapsed_before + seen_at - self.started, 3), **memory)
            self.write(row)
        self.pending.clear()
        self.window = (now, last_step)
        self.file.flush()

    def checkpoint_written(self, step: int, train_loss: float, val_loss: float, is_best: bool, name: str) -> None:
        """The validation row, and the log made durable up to this checkpoint."""
        if not self.ranks.is_main:
            return
        self.write_now({"kind": "validation", "step": step, "train_loss": train_loss, "val_loss": val_loss,
                        "is_best": is_best, "checkpoint": name})

    def write_now(self, row: dict) -> None:
        """A row written at once and made durable (global rank 0): a checkpoint's."""
        self.write(row)
        safe_files.flush_to_disk(self.file)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def training_resumes(self, step: int) -> None:
        """The next rows' speed counts from here, not from before validating, saving and
        drawing the charts at checkpoint `step`."""
        self.window = (time.monotonic(), step)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        scalars = {key: value for key, value in row.items()
                   if key not in ("kind", "step", "checkpoint") and isinstance(value, (int, float))}
        group = row["kind"]   # train/..., validation/..., benchmark/hellaswag/acc_norm
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{group}/{key}", float(value), row["step"])
        if self.wandb_run is not None:
            self.wandb_run.log({"global_step": row["step"], **{f"{group}/{key}": value for key, value in scalars.items()}})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def history_rows(history, checkpoint_names: dict) -> list[dict]:
    """Validation rows rebuilt from a checkpoint's loss history."""
    return [{"kind": "validation", "step": point["global_step"], "train_loss": point["train_loss"],
             "val_loss": point["val_loss"], "is_best": bool(point.get("is_best")),
             "checkpoint": checkpoint_names.get(point["global_step"])} for point in history]


def start_tensorboard(log_dir: Path, resume_step):
    from torch.utils.tensorboard import SummaryWriter

    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MetricsError(f"{log_dir}: can't create the TensorBoard directory ({error.strerror})") from None
    # purge_step hides the events a crashed session wrote past the checkpoint resumed from.
    return SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


WANDB_ID_FILE = "wandb-run-id"


def start_wandb(run_dir: Path, config, model_config: dict):
    """A W&B run that a restart continues: its id is kept in runs/RUN/wandb-run-id."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    if not run_id:
        # W&B's own form of id: 8 lowercase letters and digits.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        safe_files.write_atomically(id_file, run_id + "\n")
    try:
        run = wandb.init(project=config.wandb_project, id=run_id, resume="allow", dir=str(run_dir),
                         name=run_dir.name, config={"model": model_config, "train": dataclasses.asdict(config)})
    except Exception as error:  # not logged in, no network, a bad project name...
        raise MetricsError(f"W&B project {config.wandb_project!r}: {safe_files.first_line(error)} "
                           f"(WANDB_MODE=offline logs to {run_dir / 'wandb'} without a network)") from None
    # Our step is the x-axis: W&B's own step only ever grows, and a resumed run logs
    # steps again from its checkpoint on.
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run
