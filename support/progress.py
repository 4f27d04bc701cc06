"""What a person watching a training run sees: the start-up line, the progress bar, a
line per checkpoint, and the closing summary (global rank 0 prints; the others are quiet).

The bar shows the rows of metrics.StepMetrics as global rank 0 reads them off the device,
about once a second, so no step waits on the GPU for the sake of a number on the screen.
MFU (model FLOPs utilisation) is tokens/s per rank x the model's training FLOPs per token
(devices.training_flops_per_token) / the device's peak FLOP/s (devices.mfu_peak_flops).
"""

import atexit
import datetime
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from . import charts, checkpointing
from .metrics import METRICS_FILE

REFRESH_SECONDS = 1.0   # how often rank 0 reads the rows off the device for the bar
LOG_LINE_SECONDS = 30.0  # how often a plain line replaces the bar when stderr is no terminal
CHART_SECONDS = 10.0    # how often, at most, the charts are redrawn during training


def startup_line(training, dataset_dir, checked_batches: int, init_from, checkpoint_name) -> str:
    """The line that says what this session trains: the model, precision and ranks, the
    data, and where it starts from."""
    config, model = training.config, training.model
    parameters = sum(p.numel() for p in model.model.parameters())
    benchmarks = training.benchmarks
    return (f"{training.run_dir}: {parameters:,} parameters, {training.dtype_name} on "
            f"{training.ranks.world_size} x {training.device.type}"
            + (f", {config.parallelism}" if model.sharded else "")
            + (f", starting from {init_from}" if init_from is not None else "") + "; "
            f"dataset {dataset_dir}: {training.total_steps:,} global steps of "
            f"{training.tokens_per_step:,} tokens; token ids of the first {checked_batches:,} "
            f"batches checked against vocab_size {training.model_config['vocab_size']:,}"
            + (f"; lm-eval {', '.join(config.benchmark_tasks)} every {config.benchmark_interval:,} steps "
               f"and at the last, {config.benchmark_limit:,} examples each" if benchmarks else "")
            + (f"; resuming from {training.resumed_from.name} at step {training.start_step:,}"
               if training.resumed_from else "; auto: no checkpoint yet, starting fresh"
               if checkpoint_name == "auto" else ""))


class TrainingProgress:
    def __init__(self, training):
        self.training, self.ranks, self.metrics = training, training.ranks, training.metrics
        if self.ranks.is_main:
            print(f"MFU is against {self.metrics.peak_flops / 1e12:,.3f} TFLOP/s "
                  f"({self.metrics.peak_source} on {training.device.type})")
        self.last_refresh = time.monotonic()
        self.last_losses = None   # (train, validation) at the newest checkpoint
        # Redirected to a file, a bar would write a carriage-return update every second:
        # plain lines every LOG_LINE_SECONDS instead.
        self.plain_lines = not sys.stderr.isatty()
        self.last_line_time = -LOG_LINE_SECONDS
        self.bar = tqdm(total=training.total_steps, initial=training.start_step, unit="step",
                        dynamic_ncols=True, disable=not self.ranks.is_main or self.plain_lines)
        self.started = time.monotonic()
        self.first_step, self.steps_run = training.start_step, 0   # a rollback trains some steps again
        self.charts = ChartDrawer(training.run_dir, training.config.grad_clip, self.write) if self.ranks.is_main else None

    def step_done(self, step: int, result) -> None:
        """Count a step (train_step's StepResult: device tensors, no host sync) and advance
        the bar; about once a second (rank 0 only) read the rows and show them."""
        self.metrics.step_done(step, result)
        self.bar.update(1)
        self.steps_run += 1
        now = time.monotonic()
        if not self.ranks.is_main or now - self.last_refresh < REFRESH_SECONDS:
            return
        self.last_refresh = now
        shown = self.metrics.read_rows()
        if shown is None:
            return
        fields = {"loss": f"{shown['loss']:.4f}", "lr": f"{shown['learning_rate']:.2e}",
                  "tok/s": f"{shown['tokens_per_second']:,.0f}", "MFU": f"{shown['mfu']:.1%}"}
        if "grad_norm" in shown:
            fields["grad norm"] = f"{shown['grad_norm']:.3f}"
        if shown["nonfinite_steps"]:
            fields["skipped"] = f"{shown['nonfinite_steps']:,}"   # steps not finite (support/health.py)
        self.bar.set_postfix(fields, refresh=False)
        if self.plain_lines and now - self.last_line_time >= LOG_LINE_SECONDS:
            self.last_line_time = now
            done = (step + 1) / self.training.total_steps
            print(f"step {step + 1:,}/{self.training.total_steps:,} ({done:.1%}): "
                  + ", ".join(f"{name} {value}" for name, value in fields.items()), file=sys.stderr, flush=True)

    def spikes(self, rows: list[dict]) -> None:
        """Loss spikes (health.Health.take_spikes): a warning line and a metrics row each."""
        for row in rows:
            self.metrics.write_now(row)
            self.write(f"warning: loss spike at step {row['step']:,}: {row['loss']:.4f}, over {row['factor']:g} "
                       f"times the mean of the {self.training.config.loss_spike_window:,} steps before it "
                       f"({row['mean_before']:.4f})")

    def rolled_back(self, checkpoint, skipped: list, spike: int) -> int:
        """After health's rollback to `checkpoint`: its line and metrics row, the bar and the
        metrics counting from there; returns the step training goes on at."""
        training = self.training
        self.metrics.rolled_back(checkpoint.global_step)
        self.metrics.nonfinite_total = checkpoint.meta.get("nonfinite_steps", 0)
        if self.ranks.is_main:
            self.metrics.write_now({"kind": "rollback", "step": spike, "checkpoint": checkpoint.name,
                                    "skipped_steps": skipped, "rollbacks": training.rollbacks})
            self.write(f"rollback {training.rollbacks} of {training.config.max_rollbacks} after the loss spike at "
                       f"step {spike:,}: back to {checkpoint.name}, skipping the batches of steps "
                       f"{skipped[0]:,} to {skipped[1]:,}")
        next_step = training.next_step(checkpoint.global_step)
        self.bar.n = next_step
        self.last_refresh = time.monotonic()
        return next_step

    def stopped(self, step: int, checkpointed: bool, resume_point: str | None, resume_command: str) -> str:
        """After a SIGTERM: the bar closed, the metrics made durable, one line (rank 0
        prints it; every rank returns it, for torchrun's summary)."""
        self.bar.close()
        self.metrics.close()
        written = ("its checkpoint written" if checkpointed else f"resume point {resume_point} written"
                   if resume_point else "no resume point: its weights are not healthy")
        line = f"stopped by SIGTERM after step {step:,} ({written}); resume with: {resume_command}"
        if self.ranks.is_main:
            print(line, file=sys.stderr, flush=True)
        return line

    def write(self, line: str) -> None:
        """A line above the bar (rank 0 only)."""
        if self.ranks.is_main:
            self.bar.write(line)

    def checkpoint_written(self, step: int, losses: dict, is_best: bool, name) -> None:
        """The checkpoint's row in metrics.jsonl and its line (rank 0): a "validation" row
        where the run validates, else a "checkpoint" row with the window's statistics."""
        if not self.ranks.is_main:
            return
        train_loss, val_loss, window = losses["train_loss"], losses.get("val_loss"), losses.get("window") or {}
        self.last_losses = (train_loss, val_loss, window.get("avg_train_loss"))
        if val_loss is not None:
            row = {"kind": "validation", "step": step, "train_loss": train_loss, "val_loss": val_loss}
            line = f"train loss {train_loss:.4f}, validation loss {val_loss:.4f}"
        else:
            row = {"kind": "checkpoint", "step": step, "train_loss": train_loss,
                   **{key: window.get(key) for key in ("min_train_loss", "max_train_loss", "avg_train_loss")}}
            line = (f"train loss {train_loss:.4f} (rank 0's micro-steps: {window['avg_train_loss']:.4f}, "
                    f"from {window['min_train_loss']:.4f} to {window['max_train_loss']:.4f})")
        self.metrics.write_now({**row, "is_best": is_best, "checkpoint": name})
        self.bar.write(f"step {step:,}: {line}{' (best)' if is_best else ''} -> {name}")

    def checkpoint_done(self, step: int) -> None:
        """After checkpoint `step` (and its benchmarks): the charts redrawn in the background
        (rank 0), and the next tokens/s counted from here, leaving out validating and saving."""
        training = self.training
        if self.ranks.is_main:
            best_step = max((point["global_step"] for point in training.history if point["is_best"]),
                            default=None)
            self.charts.redraw(training.history, best_step)
        self.metrics.training_resumes(step)
        self.last_refresh = time.monotonic()

    def low_space_warning(self) -> None:
        if self.ranks.is_main:
            warning = checkpointing.low_space_warning(self.training.checkpoints_dir)
            if warning is not None:
                self.write(warning)

    def finish(self, best_loss: float) -> None:
        """Close the bar and the metrics; rank 0 waits for the charts and prints the summary lines."""
        if self.charts is not None:
            self.charts.wait()
        self.bar.close()
        self.metrics.close()
        elapsed = time.monotonic() - self.started
        if not self.ranks.is_main:
            return
        training = self.training
        tokens = self.steps_run * training.tokens_per_step
        again = self.steps_run - (training.total_steps - self.first_step)
        print(f"Training finished in {datetime.timedelta(seconds=round(elapsed))} "
              f"(global steps {self.first_step:,} to {training.total_steps - 1:,}"
              + (f"; {again:,} of them trained again after rollbacks" if again > 0 else "") + ")")
        if self.metrics.nonfinite_total:
            print(f"Skipped: {self.metrics.nonfinite_total:,} step(s) whose loss or gradient norm was not finite")
        print(f"Tokens seen: {tokens:,} this session, {training.total_steps * training.tokens_per_step:,} in all")
        per_rank = tokens / elapsed / self.ranks.world_size
        print(f"Throughput: {tokens / elapsed:,.0f} tokens/s ({per_rank:,.0f} per rank), "
              f"MFU {self.metrics.mfu(tokens / elapsed):.1%} of {self.metrics.peak_flops / 1e12:,.2f} TFLOP/s")
        train_loss, val_loss, window_loss = self.last_losses
        if val_loss is not None:
            print(f"Final train loss: {train_loss:.4f}, validation loss: {val_loss:.4f}"
                  f" (best validation loss {best_loss:.4f})")
        else:
            best = f"best {'window average' if window_loss is not None and training.best_key == 'avg_train_loss' else 'train loss'}"
            print(f"Final train loss: {train_loss:.4f}" + (f", rank 0's last window {window_loss:.4f}" if window_loss is not None else "")
                  + f" ({best} {best_loss:.4f})")


class ChartDrawer:
    """Redraws a run's charts on a thread of global rank 0, so that no rank waits for
    matplotlib at a checkpoint (0.7 to 2 s of one core each time), at most once every
    CHART_SECONDS: a checkpoint that comes sooner, or while the charts are being drawn,
    replaces the one still waiting, so the thread never falls behind and the charts end
    drawn from the newest. wait() draws what is waiting at once; so does the end of the
    process (atexit), a run stopped by an error or a signal included, short of being
    killed. A chart that can't be drawn is a warning: the run goes on."""

    def __init__(self, run_dir, grad_clip, warn):
        self.run_dir, self.grad_clip, self.warn = Path(run_dir), grad_clip, warn
        self.metrics_path = self.run_dir / METRICS_FILE
        self.lock = threading.Lock()
        self.waiting = None    # the newest charts asked for and not yet begun
        self.thread = None
        self.hurry = threading.Event()
        self.last_drawn = time.monotonic()   # a run shorter than CHART_SECONDS draws once, at its end
        atexit.register(self.wait)

    def redraw(self, history, best_step) -> None:
        """Ask for the charts as they are now: `history` copied, metrics.jsonl up to its
        present end (the rows written after it are the next checkpoint's)."""
        metrics_end = self.metrics_path.stat().st_size if self.metrics_path.exists() else None
        with self.lock:
            self.waiting = ([dict(point) for point in history], best_step, metrics_end)
            if self.thread is None:
                # A daemon: a sleeping drawer must not hold up the end of a process (atexit draws).
                self.thread = threading.Thread(target=self._draw_while_asked, name="charts", daemon=True)
                self.thread.start()

    def _draw_while_asked(self) -> None:
        while True:
            self.hurry.wait(max(0.0, self.last_drawn + CHART_SECONDS - time.monotonic()))
            with self.lock:
                asked, self.waiting = self.waiting, None
                if asked is None:
                    self.thread = None
                    return
            self.last_drawn = time.monotonic()
            history, best_step, metrics_end = asked
            try:
                redrawn = charts.redraw_charts(self.run_dir, history, best_step, self.grad_clip, metrics_end)
            except Exception as error:   # a full disk, a broken font: the run matters more than its chart
                self.warn(f"warning: the charts in {self.run_dir} were not redrawn: {error}")
                continue
            if redrawn.bad_metrics_lines:
                self.warn(charts.bad_lines_warning(self.metrics_path, redrawn.bad_metrics_lines))

    def wait(self) -> None:
        """Draw what is waiting now, and return when it is drawn."""
        self.hurry.set()
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join()
