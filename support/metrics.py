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

One path for these numbers. StepMetrics, on every rank, sums each step's loss (and
gradient norm) on the device and closes a row every log_interval steps and at each
checkpoint, the row's loss summed over the ranks by a one-number all-reduce queued on
the device like the gradients' before it: no host wait. Global rank 0 reads the closed
rows off the device in one transfer when the progress bar refreshes (about once a
second), at checkpoints and at the end, and hands each row to its sinks: metrics.jsonl,
TensorBoard, W&B. The progress bar shows the same rows, and a checkpoint's train loss is
their mean since the checkpoint before.
"""

import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import string
import time
from pathlib import Path

import click
import torch

from . import devices, safe_files
from .parallel import all_reduce_sum, main_rank_first

METRICS_FILE = "metrics.jsonl"


def read_metrics(path, end: int | None = None) -> tuple[list[dict], list[int]]:
    """The rows of a metrics file and the numbers (1-based) of lines that are not a JSON
    object with an integer step (a torn last line after a crash, or garbage). With `end`,
    only the first `end` bytes, as they were when training asked for a chart: a line
    still being written past them is no bad line, only one not read yet."""
    rows, bad_lines = [], []
    path = Path(path)
    if not path.exists():
        return rows, bad_lines
    with open(path, encoding="utf-8", errors="replace") as file:
        lines = file if end is None else _whole_lines(file.buffer.read(end).decode("utf-8", errors="replace"))
        for number, line in enumerate(lines, start=1):
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


def _whole_lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    return lines[:-1] if lines and not lines[-1].endswith("\n") else lines


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


class StepMetrics:
    """The per-step numbers of a training session, accumulated on the device (every rank),
    and the rows made of them (global rank 0), which the progress bar shows and the sinks
    write. `training` is the session (support/training.py); sinks only on rank 0."""

    def __init__(self, training, sinks=(), elapsed_before: float = 0.0):
        self.training, self.ranks, self.device = training, training.ranks, training.device
        self.grad_clip = training.config.grad_clip
        self.flops_per_token = devices.training_flops_per_token(training.model_config)
        # The peak MFU is measured against: rank 0 alone reports MFU.
        self.peak_flops, self.peak_source = (devices.mfu_peak_flops(training.device, training.dtype_name)
                                             if training.ranks.is_main else (None, None))
        self.sinks = list(sinks)
        # The open row, on the device: this rank's loss sum, norm sum and clipped count.
        self.row_loss = torch.zeros((), device=self.device)
        self.row_norm = torch.zeros((), device=self.device)
        self.row_clipped = torch.zeros((), device=self.device)
        self.row_nonfinite = torch.zeros((), device=self.device)   # steps skipped: not finite
        self.row_steps = 0
        # Steps of the run skipped so far, as the rows read tell it (rank 0): the bar's count.
        resumed = getattr(training, "resumed_from", None)
        self.nonfinite_total = resumed.meta.get("nonfinite_steps", 0) if resumed is not None else 0
        # Closed rows not read yet (rank 0): (step, steps, loss sum over ranks, norm sum, clipped, lr, time)
        self.pending = []
        self.elapsed_before = elapsed_before   # elapsed_seconds of the run before this session
        self.started = time.monotonic()
        self.window = (self.started, None)     # (time, step) of the previous read
        # This rank's loss since the last checkpoint, on the device, for the checkpoint's train loss.
        self.checkpoint_loss = torch.zeros((), device=self.device)
        self.checkpoint_steps = 0
        # Rank 0's micro-steps since the last checkpoint, for the later original's meta.json keys.
        self.checkpoint_window = CheckpointWindow(self.grad_clip) if training.ranks.is_main else None
        # A mixture of experts' routing over the open row's micro-steps (rank 0), and its balance loss.
        self.row_routing = self.row_balance = None
        self.row_micro_steps = 0

    def row_ends_at(self, step: int) -> bool:
        # Rows also end at every checkpoint, so that a resumed run logs the rows an
        # uninterrupted one does.
        return step % self.training.config.log_interval == 0 or self.training.checkpoint_due(step)

    def mfu(self, tokens_per_second: float) -> float:
        return tokens_per_second / self.ranks.world_size * self.flops_per_token / self.peak_flops

    # --- every step (every rank): device work only ---

    def step_done(self, step: int, result) -> None:
        """A finished global step: `result` is train_step's StepResult (support/training.py)."""
        step_loss, learning_rate, grad_norm = result.loss_sum, result.learning_rate, result.grad_norm
        self.checkpoint_loss += step_loss
        self.checkpoint_steps += 1
        if self.ranks.is_main:
            self.checkpoint_window.add(result)
            self.add_routing(result)
        self.row_loss += result.global_loss_sum
        self.row_nonfinite += result.nonfinite
        if grad_norm is not None:
            self.row_norm += grad_norm
            self.row_clipped += grad_norm > self.grad_clip
        self.row_steps += 1
        if not self.row_ends_at(step):
            return
        if self.ranks.is_main:
            self.pending.append((step, self.row_steps, self.row_loss.clone(), self.row_norm.clone(),
                                 self.row_clipped.clone(), self.row_nonfinite.clone(), learning_rate,
                                 time.monotonic(), self.take_routing()))
        self.row_loss.zero_()
        self.row_nonfinite.zero_()
        self.row_norm.zero_()
        self.row_clipped.zero_()
        self.row_steps = 0

    def add_routing(self, result) -> None:
        """Rank 0: the step's micro-steps' routing statistics into the open row (device sums)."""
        if not result.routing:
            return
        sums = torch.stack([torch.stack(pair) for pair in result.routing]).sum(0)   # (2, layers, experts)
        self.row_routing = sums if self.row_routing is None else self.row_routing + sums
        if result.balance_loss is not None:
            self.row_balance = result.balance_loss if self.row_balance is None else self.row_balance + result.balance_loss
        self.row_micro_steps += len(result.routing)

    def take_routing(self):
        """The open row's routing sums and micro-step count, and a fresh start; None for a dense model."""
        taken = None if self.row_routing is None else (self.row_routing, self.row_balance, self.row_micro_steps)
        self.row_routing = self.row_balance = None
        self.row_micro_steps = 0
        return taken

    # --- reading the rows (global rank 0) ---

    def read_rows(self) -> dict | None:
        """Read the closed rows off the device (one transfer), write them to the sinks,
        and return what the bar shows of them (the mean loss and gradient norm over their
        steps, the last learning rate, tokens/s and MFU); None when there were none."""
        if not self.ranks.is_main or not self.pending:
            return None
        numbers = torch.stack([torch.stack([loss, norm, clipped, skipped])
                               for _, _, loss, norm, clipped, skipped, *_ in self.pending])
        now = time.monotonic()
        window_start, window_step = self.window
        first_step = self.pending[0][0] - self.pending[0][1] + 1 if window_step is None else window_step + 1
        last_step = self.pending[-1][0]
        # Speed is measured over the whole window since the last read: single rows are
        # timed on the host, which runs ahead of the device.
        tokens_per_second = (last_step - first_step + 1) * self.training.tokens_per_step / max(now - window_start, 1e-9)
        memory = memory_in_use(self.device)
        micro_batches = self.training.micro_batches_per_step
        loss_sum = norm_sum = 0.0
        steps = 0
        for (step, row_steps, *_, learning_rate, seen_at, routing), (loss, norm, clipped, skipped) in zip(
                self.pending, numbers.tolist()):
            row = {"kind": "train", "step": step, "loss": loss / (row_steps * micro_batches),
                   "learning_rate": learning_rate}
            if self.grad_clip is not None:
                row["grad_norm"] = norm / row_steps
                row["clipped_fraction"] = clipped / row_steps
            row["nonfinite_steps"] = int(skipped)
            self.nonfinite_total += int(skipped)
            row.update(tokens_per_second=tokens_per_second, mfu=self.mfu(tokens_per_second),
                       tokens_seen=(step + 1) * self.training.tokens_per_step,
                       elapsed_seconds=round(self.elapsed_before + seen_at - self.started, 3), **memory)
            if routing is not None:
                row.update(routing_row(*routing))
            self.write(row)
            loss_sum, norm_sum, steps = loss_sum + loss, norm_sum + norm, steps + row_steps
        self.pending.clear()
        self.window = (now, last_step)
        for sink in self.sinks:
            sink.flush()
        shown = {"loss": loss_sum / (steps * micro_batches), "learning_rate": learning_rate,
                 "tokens_per_second": tokens_per_second, "mfu": self.mfu(tokens_per_second)}
        if self.grad_clip is not None:
            shown["grad_norm"] = norm_sum / steps
        shown["nonfinite_steps"] = self.nonfinite_total
        return shown

    def take_checkpoint_losses(self) -> dict:
        """A checkpoint's losses: `train_loss`, the mean over every rank and micro-step of
        the steps since the previous checkpoint (a collective: every rank calls it, and
        gets it), and on global rank 0 `window`, the later original's statistics of its
        own micro-steps (CheckpointWindow.take; None elsewhere)."""
        self.read_rows()
        total = all_reduce_sum(self.checkpoint_loss.clone(), self.ranks).item()
        train_loss = total / (self.checkpoint_steps * self.training.micro_batches_per_step)
        self.checkpoint_loss.zero_()
        self.checkpoint_steps = 0
        window = self.checkpoint_window.take() if self.ranks.is_main else None
        return {"train_loss": train_loss, "window": window}

    # --- what a checkpoint carries of the sums in progress (every rank) ---

    SUMS = ("checkpoint_loss", "row_loss", "row_norm", "row_clipped", "row_nonfinite")
    COUNTS = ("checkpoint_steps", "row_steps", "row_micro_steps")

    def state(self) -> dict:
        """The sums the next row and checkpoint are still adding up (pending rows are
        written first), for a checkpoint in the middle of them: a preemption's."""
        self.read_rows()
        state = {name: getattr(self, name).cpu() for name in self.SUMS}
        state.update({name: getattr(self, name) for name in self.COUNTS})
        state["routing"] = None if self.row_routing is None else (
            self.row_routing.cpu(), None if self.row_balance is None else self.row_balance.cpu())
        if self.checkpoint_window is not None:
            state["window"] = self.checkpoint_window.state()
        return state

    def load_state(self, state: dict) -> None:
        for name in self.SUMS:
            getattr(self, name).copy_(state[name])
        for name in self.COUNTS:
            setattr(self, name, state[name])
        if state["routing"] is not None:
            routing, balance = state["routing"]
            self.row_routing = routing.to(self.device)
            self.row_balance = None if balance is None else balance.to(self.device)
        if self.checkpoint_window is not None and "window" in state:
            self.checkpoint_window.load_state(state["window"], self.device)

    def rolled_back(self, step: int) -> None:
        """Back to the checkpoint of `step` (a rollback): the rows so far are written, and
        what the next checkpoint sums starts afresh there."""
        self.read_rows()
        for total in (self.checkpoint_loss, self.row_loss, self.row_norm, self.row_clipped, self.row_nonfinite):
            total.zero_()
        self.checkpoint_steps = self.row_steps = 0
        self.take_routing()
        if self.checkpoint_window is not None:
            self.checkpoint_window.take()
        self.training_resumes(step)

    def training_resumes(self, step: int) -> None:
        """After checkpoint `step`: the next tokens/s leave out the time spent validating,
        saving and drawing."""
        self.window = (time.monotonic(), step)

    # --- the sinks (global rank 0) ---

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def write_now(self, row: dict) -> None:
        """A row written at once and made durable (global rank 0): a checkpoint's."""
        self.write(row)
        for sink in self.sinks:
            sink.flush(durable=True)

    def close(self) -> None:
        self.read_rows()
        for sink in self.sinks:
            sink.close()


class CheckpointWindow:
    """Global rank 0's micro-steps since the last checkpoint, as the later original keeps
    them for its meta.json: every micro-step's train loss, every step's gradient norm
    before clipping (with clipping), and a mixture of experts' routing statistics per
    micro-step. Kept on the device; read in one go at the checkpoint."""

    def __init__(self, grad_clip):
        self.grad_clip = grad_clip
        self.losses, self.norms, self.routing = [], [], []

    def add(self, result) -> None:
        self.losses.extend(result.micro_losses)
        if result.grad_norm is not None:
            self.norms.append(result.grad_norm)
        self.routing.extend(torch.stack(pair) for pair in result.routing)

    def state(self) -> dict:
        return {"losses": [t.cpu() for t in self.losses], "norms": [t.cpu() for t in self.norms],
                "routing": [t.cpu() for t in self.routing]}

    def load_state(self, state: dict, device) -> None:
        self.losses, self.norms, self.routing = ([t.to(device) for t in state[key]] for key in ("losses", "norms",
                                                                                                  "routing"))

    def take(self) -> dict:
        """The original's keys, computed as it computes them (Python floats), and a fresh window."""
        losses = torch.stack(self.losses).tolist() if self.losses else []
        norms = torch.stack(self.norms).tolist() if self.norms else []
        routing = torch.stack(self.routing).tolist() if self.routing else []   # micro-steps x 2 x layers x experts
        self.losses, self.norms, self.routing = [], [], []
        window = {"min_train_loss": min(losses, default=None), "max_train_loss": max(losses, default=None),
                  "avg_train_loss": sum(losses) / len(losses) if losses else None,
                  "max_grad_norms": None, "avg_grad_norms": None, "frac_clipped": None,
                  "moe_routing_weights": [pair[0] for pair in routing],
                  "moe_routing_topk_weights": [pair[1] for pair in routing]}
        if norms:
            window.update(max_grad_norms=max(norms), avg_grad_norms=sum(norms) / len(norms),
                          frac_clipped=sum(norm > self.grad_clip for norm in norms) / len(norms))
        return window


def routing_row(sums: torch.Tensor, balance_sum, micro_steps: int) -> dict:
    """A training row's mixture-of-experts keys: per layer, each expert's router
    probability and top-k weight averaged over the row's micro-steps (global rank 0's),
    and the mean load-balancing loss where one is trained."""
    means = (sums / micro_steps).tolist()
    row = {"moe_routing_weights": means[0], "moe_routing_topk_weights": means[1]}
    if balance_sum is not None:
        row["moe_balance_loss"] = balance_sum.item() / micro_steps
    return row


def row_scalars(row: dict) -> dict:
    """A row's numbers, named KIND/KEY (train/loss, benchmark/hellaswag/acc_norm), for the
    loggers that plot scalars."""
    return {f"{row['kind']}/{key}": value for key, value in row.items()
            if key not in ("kind", "step", "checkpoint") and isinstance(value, (int, float))}


class JsonlSink:
    """metrics.jsonl, appended to."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")

    def flush(self, durable: bool = False) -> None:
        if durable:
            safe_files.flush_to_disk(self.file)
        else:
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MetricsError(f"{log_dir}: can't create the TensorBoard directory ({error.strerror})") from None
        # purge_step hides the events a crashed session wrote past the checkpoint resumed from.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict) -> None:
        for name, value in row_scalars(row).items():
            self.writer.add_scalar(name, float(value), row["step"])

    def flush(self, durable: bool = False) -> None:
        if durable:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run):
        self.run = run

    def write(self, row: dict) -> None:
        self.run.log({"global_step": row["step"], **row_scalars(row)})

    def flush(self, durable: bool = False) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def start_metrics(training, checkpoint_names: dict) -> tuple[StepMetrics, list[str]]:
    """The session's StepMetrics, with metrics.jsonl (and TensorBoard, W&B) made ready by
    global rank 0 and the lines to print about it. A resume first drops the rows a crashed
    session wrote past its checkpoint. Every rank calls this; a failure is one line on all."""
    opened = main_rank_first(lambda: open_sinks_on_main_rank(training, checkpoint_names), training.ranks,
                             MetricsError)
    sinks, notes, elapsed_before = opened if opened is not None else ([], [], 0.0)
    return StepMetrics(training, sinks, elapsed_before), notes


def open_sinks_on_main_rank(training, checkpoint_names: dict):
    """(sinks, notes, elapsed_before): metrics.jsonl prepared for this session, and the
    enabled loggers started. The loggers that can fail start first, so that a failure
    leaves the log as it was."""
    config, run_dir, resumed_from = training.config, training.run_dir, training.resumed_from
    resume_step = None if resumed_from is None else resumed_from.global_step
    sinks = []
    # W&B first, the one most likely to fail (a login, a network), and it cleans up after
    # itself; TensorBoard's directory, made new, goes again if its start fails.
    if config.wandb_project is not None:
        sinks.append(WandbSink(start_wandb(run_dir, config, training.model_config)))
    if config.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", resume_step))
    path = run_dir / METRICS_FILE
    notes, kept = prepare_metrics_file(path, resumed_from, training.history, checkpoint_names)
    trained = [row for row in kept if row.get("kind") == "train" and "elapsed_seconds" in row]
    elapsed_before = trained[-1]["elapsed_seconds"] if trained else 0.0
    return [JsonlSink(path)] + sinks, notes, elapsed_before


def prepare_metrics_file(path: Path, resumed_from, history, checkpoint_names: dict) -> tuple[list[str], list[dict]]:
    """Make metrics.jsonl hold the rows up to the checkpoint this session resumes from (none
    for a fresh start); returns the lines to print and the rows kept.

    A crash leaves a torn last line: it is dropped, and every readable row kept. Lines that
    do not parse elsewhere (garbage) are dropped too, the file as it was kept beside it,
    and a checkpoint whose row went with them gets it back from the checkpoints' history:
    only what is truly gone is rebuilt."""
    notes = []
    resume_step = None if resumed_from is None else resumed_from.global_step
    rows, bad_lines = read_metrics(path)
    if resume_step is None and any(row.get("kind") in ("validation", "checkpoint") for row in rows):
        # A fresh start beside the log of a run whose checkpoints were moved away:
        # that log goes with them, so keep it, aside. (Rows of a session that crashed
        # before its first checkpoint are simply dropped below.)
        aside = path.with_name(f"{METRICS_FILE}.{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        notes.append(f"{path}: kept the earlier run's log as {aside.name}")
        rows, bad_lines = [], []
    elif bad_lines:
        torn = bad_lines == [last_line_number(path)]
        if not torn:
            aside = path.with_name(f"{METRICS_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            shutil.copyfile(path, aside)
        notes.append(f"warning: {path} line {bad_lines[0]} "
                     + ("(the last) was torn by a crash: dropped, every other row kept" if torn else
                        f"is not a metrics row{f' ({len(bad_lines)} such lines)' if len(bad_lines) > 1 else ''}: "
                        f"dropped, the readable rows kept and the checkpoints' rows restored from their "
                        f"history, the old file kept as {aside.name}"))
        logged = {row["step"] for row in rows if row.get("kind") in ("validation", "checkpoint")}
        rows = sorted(rows + history_rows([point for point in history if point["global_step"] not in logged],
                                          checkpoint_names), key=lambda row: row["step"])
    kept = [row for row in rows if resume_step is not None and row["step"] <= resume_step]
    if resume_step is not None and history and history[-1]["global_step"] == resume_step and not any(
            row.get("kind") in ("validation", "checkpoint") and row["step"] == resume_step for row in kept):
        # The crash came between writing the checkpoint and logging it.
        kept += history_rows([history[-1]], {resume_step: resumed_from.name})
    if kept != rows or bad_lines or (kept and not path.exists()):
        safe_files.write_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))
    return notes, kept


def last_line_number(path: Path) -> int:
    """The number (1-based, as read_metrics counts) of the file's last line that is not blank."""
    number = 0
    with open(path, "rb") as file:
        for index, line in enumerate(file, start=1):
            if line.strip():
                number = index
    return number


def history_rows(history, checkpoint_names: dict) -> list[dict]:
    """Validation (or, without validation, checkpoint) rows rebuilt from a checkpoint's loss history."""
    rows = []
    for point in history:
        row = {"kind": "validation" if point.get("val_loss") is not None else "checkpoint",
               "step": point["global_step"], "train_loss": point["train_loss"]}
        if point.get("val_loss") is not None:
            row["val_loss"] = point["val_loss"]
        rows.append({**row, "is_best": bool(point.get("is_best")), "checkpoint": checkpoint_names.get(point["global_step"])})
    return rows


WANDB_ID_FILE = "wandb-run-id"


def start_wandb(run_dir: Path, config, model_config: dict):
    """A W&B run that a restart continues: its id is kept in runs/RUN/wandb-run-id."""
    import wandb

    id_file, wandb_dir = run_dir / WANDB_ID_FILE, run_dir / "wandb"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    new_id, new_dir = not run_id, not wandb_dir.exists()
    # W&B's own form of id: 8 lowercase letters and digits; kept only once the run started.
    run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        run = wandb.init(project=config.wandb_project, id=run_id, resume="allow", dir=str(run_dir),
                         name=run_dir.name, config={"model": model_config, "train": dataclasses.asdict(config)})
    except Exception as error:  # not logged in, no network, a bad project name...
        if new_dir:   # nothing written into the run directory by a start that failed
            shutil.rmtree(wandb_dir, ignore_errors=True)
        raise MetricsError(f"W&B project {config.wandb_project!r}: {safe_files.first_line(error)} "
                           f"(WANDB_MODE=offline logs to {run_dir / 'wandb'} without a network)") from None
    if new_id:
        safe_files.write_atomically(id_file, run_id + "\n")
    # Our step is the x-axis: W&B's own step only ever grows, and a resumed run logs
    # steps again from its checkpoint on.
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run
