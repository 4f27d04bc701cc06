"""Is the run healthy: steps whose loss or gradients are not finite, and loss spikes.

Every step train_step flags, on the device, whether its loss summed over the ranks or
its global gradient norm is not finite. Both are the same number on every rank (the
loss is all-reduced, the gradients were), so every rank takes the same decision without
talking: AdamW skips the step on the device (fused AdamW's found_inf, as the GradScaler
uses it), the schedule still advances, and the step is counted. A spike is a finite
step whose loss exceeds loss_spike_factor times the mean of the loss_spike_window
healthy steps before it.

Nothing here waits for the device during the steps: the flags are accumulated on it,
and every rank reads them every CHECK_EVERY steps (all at the same steps, so all come
to the same conclusion), and at checkpoints. Too many non-finite steps in a row stop
the run (RunDiverged); a spike is a warning line and a metrics row, or with
"on_loss_spike": "rollback" a return to the newest checkpoint before it (ddp_train.py).
"""

import click
import torch

CHECK_EVERY = 10   # steps between the reads of the device's flags (one host wait each)

# Exit codes that say why a run stopped (docs/what-can-go-wrong.md has them all).
DIVERGED_EXIT_CODE = 3


# Tests set TRAINING_TEST_LOSS_TIMES=RANK@FIRST-LAST*FACTOR (or RANK@STEP*FACTOR) to multiply
# that rank's loss at those global steps by FACTOR: nan for a diverging rank, 8 for a loss
# spike. The only way to make either happen on purpose on a CPU. Unset, nothing changes.
LOSS_TIMES_VARIABLE = "TRAINING_TEST_LOSS_TIMES"


def injected_loss_factor(rank: int) -> tuple[range, float] | None:
    """(steps, factor) of this rank's injected loss, or None."""
    import os

    value = os.environ.get(LOSS_TIMES_VARIABLE)
    if not value or int(value.split("@")[0]) != rank:
        return None
    steps, _, factor = value.split("@")[1].partition("*")
    first, _, last = steps.partition("-")
    return range(int(first), int(last or first) + 1), float(factor)


class RunDiverged(click.ClickException):
    """max_nonfinite_steps steps in a row were not finite: restarting would only repeat it."""
    exit_code = DIVERGED_EXIT_CODE


class Health:
    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.in_a_row, self.longest_run, self.skipped = zero(), zero(), zero()
        self.what = zero()          # which was not finite in the longest run's last step: 1 loss, 2 norm
        self.run_end = zero() - 1   # the step that ended the longest run of non-finite steps
        window = config.loss_spike_window
        self.recent = torch.zeros(window, device=device)   # the last healthy steps' mean losses
        self.filled = 0                                     # how many of them are there (host count)
        self.spikes = []            # rank 0: (step, loss, mean before, flag) of steps since the last read
        self.spiked = zero() - 1    # the first spiking step since the last read, -1 if none

    # --- every step (every rank): device work only ---

    def step_done(self, step: int, result, keep_spikes: bool) -> None:
        """The step's flags into the counts; keep_spikes on global rank 0, which reports them."""
        bad = result.nonfinite
        self.skipped += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        longer = self.in_a_row > self.longest_run
        self.longest_run = torch.where(longer, self.in_a_row, self.longest_run)
        self.run_end = torch.where(longer, torch.full_like(self.run_end, step), self.run_end)
        self.what = torch.where(longer, result.nonfinite_what, self.what)
        if result.mean_loss is None:
            return
        # A spike: a finite loss far above the mean of the healthy steps before it.
        average = self.recent.mean()
        full = self.filled >= len(self.recent)
        spike = (~bad.bool()) & (result.mean_loss > self.config.loss_spike_factor * average) if full else None
        if spike is not None:
            self.spiked = torch.where(spike & (self.spiked < 0), torch.full_like(self.spiked, step), self.spiked)
            if keep_spikes:
                self.spikes.append((step, result.mean_loss, average, spike))
        # Healthy steps enter the window; a non-finite one leaves it as it was.
        slot = self.filled % len(self.recent)
        self.recent[slot] = torch.where(bad.bool(), self.recent[slot], result.mean_loss)
        self.filled += 1

    # --- every CHECK_EVERY steps and at checkpoints (every rank): one read of the device ---

    def due(self, step: int) -> bool:
        return (step + 1) % CHECK_EVERY == 0

    def check(self, checkpoints_dir) -> int | None:
        """Raise RunDiverged when max_nonfinite_steps in a row were not finite; else the
        first spiking step since the last check (None without), and start counting afresh."""
        longest, run_end, what, spiked = torch.stack([self.longest_run, self.run_end, self.what,
                                                      self.spiked]).tolist()
        limit = self.config.max_nonfinite_steps
        if longest >= limit:
            raise RunDiverged(self.diverged_line(int(longest), int(run_end), int(what), checkpoints_dir))
        self.longest_run.zero_()
        self.spiked.fill_(-1)
        return None if spiked < 0 else int(spiked)

    def diverged_line(self, longest: int, run_end: int, what: int, checkpoints_dir) -> str:
        from . import checkpointing

        names = [name for bit, name in ((1, "loss"), (2, "gradient norm")) if what & bit]
        healthy = checkpointing.link_target(checkpoints_dir, "latest")
        where = (f"the newest healthy checkpoint is {healthy.path} (step {healthy.global_step:,}; latest points at it)"
                 if healthy else f"{checkpoints_dir} holds no checkpoint yet")
        return (f"steps {run_end - longest + 1:,} to {run_end:,} were not finite ({' and '.join(names)}): "
                f"{longest} in a row, max_nonfinite_steps is {self.config.max_nonfinite_steps}: stopped; "
                f"{where}. Not restartable as it is: lower learning_rate, or resume from an earlier checkpoint")

    def forget_the_window(self) -> None:
        """After a rollback: the losses before the spike are of weights no longer trained."""
        self.filled = 0
        self.recent.zero_()

    COUNTERS = ("in_a_row", "longest_run", "skipped", "what", "run_end", "recent", "spiked")

    def state(self) -> dict:
        """What a checkpoint carries (every rank): the counters and the spike window, so
        that a resumed run skips, stops and rolls back as an uninterrupted one."""
        return {**{name: getattr(self, name).cpu() for name in self.COUNTERS}, "filled": self.filled}

    def load_state(self, state: dict) -> None:
        if tuple(state["recent"].shape) != tuple(self.recent.shape):
            return   # loss_spike_window changed: start the window afresh
        for name in self.COUNTERS:
            getattr(self, name).copy_(state[name])
        self.filled = state["filled"]

    def skipped_total(self) -> int:
        """Non-finite steps skipped in the run so far (a host read: at checkpoints and the end)."""
        return int(self.skipped.item())

    # --- global rank 0: what the spikes were, for their lines and rows ---

    def take_spikes(self) -> list[dict]:
        """The spiking steps since the last call, read in one transfer."""
        if not self.spikes:
            return []
        values = torch.stack([torch.stack([loss, average, flag.float()]) for _, loss, average, flag
                              in self.spikes]).tolist()
        found = [{"kind": "spike", "step": step, "loss": loss, "mean_before": average,
                  "factor": self.config.loss_spike_factor}
                 for (step, *_), (loss, average, flag) in zip(self.spikes, values) if flag]
        self.spikes = []
        return found
