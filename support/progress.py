"""What a person watching a training run sees: the progress bar and the closing summary.

The training loss stays on the device, summed micro-step by micro-step; the host
reads it only about once a second (global rank 0, for the bar) and at checkpoints,
so no step waits on the GPU for the sake of a number on the screen.

MFU (model FLOPs utilisation) is tokens/s per rank x the model's training FLOPs per
token (devices.training_flops_per_token) / the device's peak FLOP/s: a known GPU's
datasheet peak, else a large matmul measured at start-up (a CPU's practical peak).
"""

import datetime
import sys
import time

import torch
from tqdm import tqdm

from . import devices
from .parallel import Ranks, all_reduce_sum

REFRESH_SECONDS = 1.0   # how often rank 0 reads the loss off the device for the bar
LOG_LINE_SECONDS = 30.0  # how often a plain line replaces the bar when stderr is no terminal


class TrainingProgress:
    def __init__(self, *, ranks: Ranks, device: torch.device, dtype_name: str, model_config: dict,
                 start_step: int, total_steps: int, tokens_per_step: int, micro_steps_per_step: int,
                 metrics=None):
        self.micro_steps_per_step = micro_steps_per_step
        self.metrics = metrics   # metrics.MetricsLog, written whenever the bar reads the device
        self.ranks, self.start_step, self.total_steps = ranks, start_step, total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = devices.training_flops_per_token(model_config)
        self.peak_flops = None
        if ranks.is_main:
            self.peak_flops, source = devices.mfu_peak_flops(device, dtype_name)
            print(f"MFU is against {self.peak_flops / 1e12:,.3f} TFLOP/s ({source} on {device.type})")
        # Training loss since the last checkpoint, summed on the device.
        self.loss_sum = torch.zeros((), device=device)
        self.micro_steps = 0
        # The bar's last refresh: when, at which step, and the loss sum then.
        self.shown = {"time": time.monotonic(), "step": start_step, "loss_sum": 0.0, "micro_steps": 0}
        self.last_losses = None   # (train, validation) at the newest checkpoint
        # Redirected to a file, a bar would write a carriage-return update every second:
        # plain lines every LOG_LINE_SECONDS instead.
        self.plain_lines = not sys.stderr.isatty()
        self.last_line_time = -LOG_LINE_SECONDS
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not ranks.is_main or self.plain_lines)
        self.started = time.monotonic()

    def mfu(self, tokens_per_second: float) -> float:
        return tokens_per_second / self.ranks.world_size * self.flops_per_token / self.peak_flops

    def step_done(self, step: int, step_loss: torch.Tensor, learning_rate: float, grad_norm) -> None:
        """Count a step's loss (this rank's sum over its micro-steps, a device tensor: no
        host sync) and advance the bar; about once a second (rank 0 only) read the loss
        and show it with the learning rate, tokens/s, MFU and the gradient norm."""
        self.loss_sum += step_loss
        self.micro_steps += self.micro_steps_per_step
        if self.metrics is not None:
            self.metrics.step_done(step, step_loss, learning_rate, grad_norm)
        self.bar.update(1)
        now = time.monotonic()
        if not self.ranks.is_main or now - self.shown["time"] < REFRESH_SECONDS:
            return
        loss_sum = self.loss_sum.item()
        recent_loss = (loss_sum - self.shown["loss_sum"]) / max(1, self.micro_steps - self.shown["micro_steps"])
        tokens_per_second = (step + 1 - self.shown["step"]) * self.tokens_per_step / (now - self.shown["time"])
        fields = {"loss": f"{recent_loss:.4f}", "lr": f"{learning_rate:.2e}",
                  "tok/s": f"{tokens_per_second:,.0f}", "MFU": f"{self.mfu(tokens_per_second):.1%}"}
        if grad_norm is not None:
            fields["grad norm"] = f"{grad_norm.item():.3f}"
        self.bar.set_postfix(fields, refresh=False)
        if self.plain_lines and now - self.last_line_time >= LOG_LINE_SECONDS:
            self.last_line_time = now
            done = (step + 1) / self.total_steps
            print(f"step {step + 1:,}/{self.total_steps:,} ({done:.1%}): "
                  + ", ".join(f"{name} {value}" for name, value in fields.items()), file=sys.stderr, flush=True)
        self.shown.update(time=now, step=step + 1, loss_sum=loss_sum, micro_steps=self.micro_steps)
        self.write_metrics()

    def write_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.write_rows(self.peak_flops, self.flops_per_token)

    def take_train_loss(self) -> float:
        """The mean training loss over every rank's micro-steps since the last call (a
        collective: every rank calls it), and a fresh sum for the next interval."""
        total = all_reduce_sum(self.loss_sum.clone(), self.ranks).item()
        train_loss = total / (self.micro_steps * self.ranks.world_size)
        self.loss_sum.zero_()
        self.micro_steps = 0
        self.shown.update(loss_sum=0.0, micro_steps=0)
        return train_loss

    def checkpoint_written(self, step: int, train_loss: float, val_loss: float, is_best: bool,
                           name: str) -> None:
        self.last_losses = (train_loss, val_loss)
        if self.metrics is not None:
            self.metrics.checkpoint_written(step, train_loss, val_loss, is_best, name)
        if self.ranks.is_main:
            self.bar.write(f"step {step:,}: train loss {train_loss:.4f}, validation loss "
                           f"{val_loss:.4f}{' (best)' if is_best else ''} -> {name}")

    def training_resumes(self, step: int) -> None:
        """After checkpoint `step`: the next tokens/s (bar and metrics) leave out the time
        spent validating, saving and drawing."""
        if self.metrics is not None:
            self.metrics.training_resumes(step)
        self.shown.update(time=time.monotonic(), step=step + 1)

    def write(self, line: str) -> None:
        """A line above the bar (rank 0 only)."""
        if self.ranks.is_main:
            self.bar.write(line)

    def finish(self, best_loss: float) -> None:
        """Close the bar; rank 0 prints the summary lines."""
        self.bar.close()
        if self.metrics is not None:
            self.write_metrics()
            self.metrics.close()
        elapsed = time.monotonic() - self.started
        if not self.ranks.is_main:
            return
        tokens = (self.total_steps - self.start_step) * self.tokens_per_step
        print(f"Training finished in {datetime.timedelta(seconds=round(elapsed))} "
              f"(global steps {self.start_step:,} to {self.total_steps - 1:,})")
        print(f"Tokens seen: {tokens:,} this session, {self.total_steps * self.tokens_per_step:,} in all")
        per_rank = tokens / elapsed / self.ranks.world_size
        print(f"Throughput: {tokens / elapsed:,.0f} tokens/s ({per_rank:,.0f} per rank), "
              f"MFU {self.mfu(tokens / elapsed):.1%} of {self.peak_flops / 1e12:,.2f} TFLOP/s")
        train_loss, val_loss = self.last_losses
        print(f"Final train loss: {train_loss:.4f}, validation loss: {val_loss:.4f}"
              f" (best validation loss {best_loss:.4f})")
