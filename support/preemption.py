"""Stopping on SIGTERM without losing the steps since the last checkpoint.

Spot and preemptible instances, `scancel`, `docker stop` and Kubernetes send SIGTERM and
allow tens of seconds (torchrun forwards it to every rank and waits 30). A rank that gets
it only raises its flag; the flag rides in the one-number all-reduce every step already
makes (the loss, for health.py), so that every rank learns of it at the same step, and
they all read it one step late: the host never waits for the step it has just queued.
They then finish that step, global rank 0 writes a checkpoint there (a resume point:
validated only when a validation was due anyway, never `best`), and every rank exits
with PREEMPTED_EXIT_CODE, "stopped, resumable". `ddp_train.py ... auto` resumes it, bit
for bit: the checkpoint carries the half-done sums of the next regular checkpoint.

A second SIGTERM, or preemption_grace_seconds running out first, ends the process at
once: what is on disk is the newest complete checkpoint (a save in progress stays a
hidden partial directory, as after any crash).
"""

import os
import signal
import threading

import torch

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): stopped, resumable


class Preemption:
    def __init__(self, device: torch.device, grace_seconds: float):
        self.device, self.grace_seconds = device, grace_seconds
        self.signals = 0
        self.previous = None   # (the step before's summed flag on the host, and its CUDA event)

    def install(self) -> None:
        """The SIGTERM handler of this process (the main thread installs it)."""
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            os._exit(PREEMPTED_EXIT_CODE)   # asked twice: now, with the checkpoints already on disk
        timer = threading.Timer(self.grace_seconds, os._exit, args=(PREEMPTED_EXIT_CODE,))
        timer.daemon = True
        timer.start()

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def flag(self) -> torch.Tensor:
        """This rank's flag for the step's all-reduce: 1.0 once SIGTERM came."""
        return torch.full((), float(self.requested), device=self.device)

    def stop_after(self, summed_flag: torch.Tensor) -> bool:
        """Given this step's flag summed over the ranks, whether the step before had one
        raised anywhere: then every rank stops after this step. On CUDA the flag is copied
        to pinned host memory behind an event, and read one step later, when it is there."""
        ready, self.previous = self.previous, None
        if self.device.type == "cuda":
            host = torch.empty((), pin_memory=True)
            host.copy_(summed_flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.previous = (host, event)
        else:
            self.previous = (summed_flag, None)
        if ready is None:
            return False
        value, event = ready
        if event is not None:
            event.synchronize()
        return bool(value.item() > 0)
