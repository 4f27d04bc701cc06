"""Before a long run: does it fit, how fast does it go, when will it end.

`ddp_train.py RUN DATASETS_DIR [CHECKPOINT] --preflight` trains a few global steps and
reports per rank tokens/s, MFU and peak memory, and how long the whole run will take;
`-f/--find-max-microbatch-size` searches for the largest minibatch_size whose training
step fits in memory. Both get the run built exactly as training builds it
(ddp_train.set_up: the same ranks, DDP or FSDP, compile, precision, activation
checkpointing, dataset, and a checkpoint's state when resuming) and train with
ddp_train's own train_step, which the script hands in (modules never import scripts).
They write nothing into the run directory: no checkpoint, lock, chart or metrics; the
weights they train stay in memory and are dropped at exit.

Like training_progress, this module prints what the person at the terminal reads
(global rank 0 alone).
"""

import dataclasses
import datetime
import gc
import math
import os
import resource
import socket
import sys
import time

import click
import torch
import torch.distributed as dist

from . import devices
from .safe_files import format_bytes
from gpt import GPTModel
from .optimizer import build_optimizer
from .parallel import Ranks, all_reduce_sum, wrap_model

WARMUP_STEPS = 2         # untimed: compilation, kernel selection, AdamW's state, NCCL set-up
TIMED_STEPS = 5          # --preflight-steps by default
TRIAL_MICRO_STEPS = 2    # a search trial's micro-steps: the second runs with the first's gradients held
CPU_MEMORY_SHARE = 0.8   # of the memory available to a rank: the rest for checkpoint writes, page cache

# torch.OutOfMemoryError since torch 2.5; the CUDA name before that.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Tests set PREFLIGHT_TEST_OOM_ABOVE=N to make every search trial with minibatch_size > N
# raise OutOfMemoryError on every rank, just before its step, as a GPU would: a CPU can't
# be made to run out of memory safely. Unset, it does nothing.
INJECT_OOM_VARIABLE = "PREFLIGHT_TEST_OOM_ABOVE"


def say(ranks: Ranks, line: str = "") -> None:
    if ranks.is_main:
        print(line, flush=True)


def gather_from_all(value, ranks: Ranks) -> list:
    """Every rank's `value` (a small picklable object), in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    everyone = [None] * ranks.world_size
    dist.all_gather_object(everyone, value, group=ranks.setup_group)
    return everyone


# --- memory ---

def read_proc_kib(path: str, field: str) -> int | None:
    """A `Field:  123 kB` line of a /proc file, in bytes; None off Linux."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory (since the last reset_peak_rss)."""
    peak = read_proc_kib("/proc/self/status", "VmHWM")
    if peak is None:  # macOS: no /proc, and ru_maxrss counts bytes there (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh from the current RSS (Linux 4.0+); where that is
    refused, peaks stay those since start-up, which only errs towards 'does not fit'."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as file:
            file.write("5")
    except OSError:
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        reset_peak_rss()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of this rank's peak memory: CUDA's allocated tensors, a
    CPU process's resident set, or what MPS's driver holds now (it keeps no peak)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return torch.cuda.max_memory_allocated(device), f"allocated of {format_bytes(total)}"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory(), "MPS driver"
    return peak_rss_bytes(), "RSS"


def release_memory(device: torch.device) -> None:
    gc.collect()  # an exception's traceback holds the failed step's tensors in cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError a CPU or MPS allocation fails with."""
    words = str(error).lower()
    return isinstance(error, OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in words or "can't allocate memory" in words))


# --- --preflight: speed, memory and the run's duration ---

def measure_run(training, train_step, *, timed_steps: int, deadline_hours: float | None) -> None:
    """Train WARMUP_STEPS untimed global steps and then timed_steps timed ones, the run's
    next steps on its own data (wrapping round at the end of the data), and print on
    global rank 0 a row per rank and what that speed means for the whole run."""
    ranks, device = training.ranks, training.device
    steps = [(training.start_step + i) % training.total_steps for i in range(WARMUP_STEPS + timed_steps)]
    say(ranks, f"preflight of {training.run_dir}: {WARMUP_STEPS} warm-up and {timed_steps} timed global "
               f"steps of {training.tokens_per_step:,} tokens; nothing is written")
    for step in steps[:WARMUP_STEPS]:
        train_step(training, step)
    wait_for_every_rank(training)
    loss_sum = torch.zeros((), device=device)
    started = time.perf_counter()
    for step in steps[WARMUP_STEPS:]:
        loss_sum += train_step(training, step).loss_sum
    devices.synchronize(device)
    elapsed = time.perf_counter() - started
    memory, memory_kind = peak_memory(device)
    row = {"rank": ranks.rank, "host": socket.gethostname(), "device": device_label(device),
           "seconds": elapsed, "tokens": timed_steps * training.tokens_per_step // ranks.world_size,
           "memory": memory, "memory_kind": memory_kind,
           "loss": loss_sum.item() / (timed_steps * training.config.gradient_accumulation_steps)}
    # Measured after the steps, so that its matrices don't count in the peak memory.
    peak_flops, source = devices.mfu_peak_flops(device, training.dtype_name) if ranks.is_main else (None, None)
    rows = gather_from_all(row, ranks)
    if ranks.is_main:
        print_preflight_report(training, rows, timed_steps, peak_flops, source, deadline_hours)


def wait_for_every_rank(training) -> None:
    """The device idle and every rank here, so that the ranks start their clocks together."""
    devices.synchronize(training.device)
    all_reduce_sum(torch.zeros(1, device=training.device), training.ranks)
    devices.synchronize(training.device)


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def print_preflight_report(training, rows: list[dict], timed_steps: int, peak_flops: float, source: str,
                           deadline_hours: float | None) -> None:
    flops_per_token = devices.training_flops_per_token(training.model_config)
    table = [("rank", "host", "device", "tokens/s", "MFU", "peak memory", "loss")]
    for row in rows:
        tokens_per_second = row["tokens"] / row["seconds"]
        table.append((str(row["rank"]), row["host"], row["device"], f"{tokens_per_second:,.0f}",
                      f"{tokens_per_second * flops_per_token / peak_flops:.1%}",
                      f"{format_bytes(row['memory'])} {row['memory_kind']}", f"{row['loss']:.4f}"))
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.rjust(width) if column in (0, 3, 4, 6) else cell.ljust(width)
                        for column, (cell, width) in enumerate(zip(line, widths))).rstrip())
    print(f"MFU is against {peak_flops / 1e12:,.3f} TFLOP/s ({source} on rank 0's {training.device.type}) "
          f"and {flops_per_token / 1e9:,.4f} GFLOP per token")

    # Ranks move in lockstep (every step ends in an all-reduce): the slowest sets the pace.
    steps_per_second = timed_steps / max(row["seconds"] for row in rows)
    tokens_per_second = steps_per_second * training.tokens_per_step
    print(f"all {len(rows)} rank(s): {tokens_per_second:,.0f} tokens/s, {steps_per_second:,.3f} global steps/s")
    left = max(0, training.total_steps - training.start_step)
    seconds = left / steps_per_second
    where = (f"from step {training.start_step:,}, resuming {training.resumed_from.name}" if training.resumed_from
             else "from the start")
    print(f"the whole run: {left:,} of {training.total_steps:,} global steps left ({where}) take "
          f"{duration(seconds)} at this speed ({seconds:,.2f} s; validation and checkpoints not counted)")
    if deadline_hours is not None:
        needed = left * training.tokens_per_step / (deadline_hours * 3600)
        verdict = (f"on time, {duration(deadline_hours * 3600 - seconds)} to spare"
                   if seconds <= deadline_hours * 3600 else
                   f"too slow by {needed / tokens_per_second:,.2f}x: {duration(seconds - deadline_hours * 3600)} late")
        print(f"deadline {deadline_hours:g} h: needs {needed:,.1f} tokens/s; {verdict}")


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


# --- -f/--find-max-microbatch-size ---

def find_max_microbatch_size(training, train_step) -> None:
    """Double minibatch_size from 1 until a training step doesn't fit, then bisect.
    Every trial runs on every rank and all ranks agree on its outcome, so that none
    goes on to a collective the others have left. Prints the largest size that fits
    and the gradient_accumulation_steps that keeps the run's global batch."""
    ranks, config = training.ranks, training.config
    # A rank's sequences per global step: a larger minibatch_size can't keep the global batch.
    per_rank = config.minibatch_size * config.gradient_accumulation_steps
    budget = CpuMemoryBudget(ranks) if training.device.type == "cpu" else None
    say(ranks, f"searching for the largest minibatch_size up to {per_rank} (train.json's minibatch_size "
               f"{config.minibatch_size} x gradient_accumulation_steps {config.gradient_accumulation_steps}) "
               f"whose training step fits, {TRIAL_MICRO_STEPS} micro-steps and AdamW per trial; nothing is written")
    if budget is not None:
        say(ranks, f"budget per rank: {format_bytes(budget.budget)} of RSS growth ({CPU_MEMORY_SHARE:.0%} of "
                   f"the memory available, shared by {budget.ranks_on_node} rank(s) per node)")

    out_of_memory_before = False

    def fits(size: int) -> bool:
        nonlocal training, out_of_memory_before
        if out_of_memory_before:  # rebuilt here, not after the failure: the last trial needs none
            training = rebuilt(training)
        outcomes = gather_from_all(try_size(training, train_step, size, budget), ranks)
        say(ranks, describe_trial(size, outcomes, budget))
        out_of_memory_before = any(outcome["out_of_memory"] for outcome in outcomes)
        return all(outcome["fits"] for outcome in outcomes)

    largest_fit, smallest_misfit, size = 0, None, 1
    while largest_fit < per_rank:
        if not fits(size):
            smallest_misfit = size
            break
        largest_fit, size = size, min(2 * size, per_rank)
    if largest_fit == 0:
        raise click.ClickException(
            f"{training.run_dir}: not even minibatch_size 1 fits; try \"activation_checkpointing\": true, "
            f"\"parallelism\": \"fsdp\" over more ranks, or a smaller model or context_length")
    if smallest_misfit is not None:
        while smallest_misfit - largest_fit > 1:
            middle = (largest_fit + smallest_misfit) // 2
            if fits(middle):
                largest_fit = middle
            else:
                smallest_misfit = middle
    say(ranks, f"largest minibatch_size that fits: {largest_fit}"
               + (" (the search goes no further: to see how far beyond, raise minibatch_size in train.json "
                  "and search again)" if smallest_misfit is None else ""))
    say(ranks, microbatch_advice(largest_fit, per_rank, ranks.world_size))


def microbatch_advice(largest_fit: int, per_rank: int, world_size: int) -> str:
    """The train.json keys that keep per_rank sequences per rank per global step (the global
    batch) with a minibatch_size that fits: the fewest micro-steps, and when no size fitting
    in that many divides per_rank, the nearest batch, with the exact alternative named."""
    accumulation = math.ceil(per_rank / largest_fit)
    minibatch = min(largest_fit, max(1, round(per_rank / accumulation)))
    keys = f'"minibatch_size": {minibatch}, "gradient_accumulation_steps": {accumulation}'
    wanted = world_size * per_rank
    if minibatch * accumulation == per_rank:
        return f"to keep the global batch of {wanted:,} sequences ({world_size} rank(s) x {per_rank}): {keys}"
    exact = max(divisor for divisor in range(1, largest_fit + 1) if per_rank % divisor == 0)
    got = world_size * minibatch * accumulation
    return (f"the global batch of {wanted:,} sequences ({world_size} rank(s) x {per_rank}) can't be kept "
            f"exactly in {accumulation} micro-steps: {keys} makes it {got:,} ({got / wanted - 1:+.1%}); "
            f"exactly: \"minibatch_size\": {exact}, \"gradient_accumulation_steps\": {per_rank // exact}")


def try_size(training, train_step, size: int, budget) -> dict:
    """One trial on this rank: a global step of TRIAL_MICRO_STEPS micro-batches of `size`
    sequences through the run's real model, optimizer and collectives."""
    device = training.device
    if budget is not None:
        # A CPU trial must not be run if it would exhaust the machine: every rank skips it
        # when any rank's extrapolation says it would not fit.
        predicted = budget.predicted_growth(size)
        if not all(gather_from_all(predicted <= budget.budget, training.ranks)):
            return {"fits": False, "out_of_memory": False, "memory": predicted, "ran": False}
    trial = dataclasses.replace(
        training, train_batches=RepeatedRows(training.train_batches, size),
        config=dataclasses.replace(training.config, minibatch_size=size,
                                   gradient_accumulation_steps=TRIAL_MICRO_STEPS))
    reset_peak_memory(device)
    try:
        inject_out_of_memory(size)
        train_step(trial, training.start_step % training.total_steps)
        devices.synchronize(device)
    except Exception as error:  # anything but running out of memory is raised again
        if not is_out_of_memory(error):
            raise
        return {"fits": False, "out_of_memory": True, "memory": None, "ran": True,
                "injected": INJECT_OOM_VARIABLE in str(error)}
    if budget is None:
        return {"fits": True, "out_of_memory": False, "memory": peak_memory(device)[0], "ran": True}
    growth = budget.measured(size)
    return {"fits": growth <= budget.budget, "out_of_memory": False, "memory": growth, "ran": True}


def inject_out_of_memory(size: int) -> None:
    limit = os.environ.get(INJECT_OOM_VARIABLE)
    if limit is not None and size > int(limit):
        raise OutOfMemoryError(f"{INJECT_OOM_VARIABLE}={limit}: minibatch_size {size} does not fit (injected)")


def describe_trial(size: int, outcomes: list[dict], budget) -> str:
    line = f"  minibatch_size {size:>5,}: "
    out_of_memory = [rank for rank, outcome in enumerate(outcomes) if outcome["out_of_memory"]]
    if out_of_memory:
        injected = all(outcomes[rank]["injected"] for rank in out_of_memory)
        return (line + f"out of memory on rank(s) {', '.join(map(str, out_of_memory))}"
                + (f" (injected: {INJECT_OOM_VARIABLE} is set)" if injected else ""))
    fullest = max(range(len(outcomes)), key=lambda rank: outcomes[rank]["memory"])
    memory = format_bytes(max(0, round(outcomes[fullest]["memory"])))
    if budget is None:
        return line + f"fits, peak {memory} (rank {fullest})"
    if not outcomes[fullest]["ran"]:
        return line + f"not tried: RSS would grow by about {memory} (rank {fullest}), over the budget"
    return line + (f"{'fits' if all(o['fits'] for o in outcomes) else 'over the budget'}, "
                   f"RSS grew by {memory} (rank {fullest})")


def rebuilt(training):
    """The run's model, optimizer and scaler built afresh after a trial ran out of memory.
    An allocation can fail in the middle of a backward pass, leaving DDP's gradient
    reducer (or FSDP's hooks) waiting for gradients that never come, which torch can't
    undo in place. The old ones go first, so that their memory is free for the new."""
    config, device, ranks = training.config, training.device, training.ranks
    training.model = training.optimizer = training.scaler = None
    if config.compile:
        torch.compiler.reset()  # compiled code can hold on to the old model's tensors
    release_memory(device)
    torch.manual_seed(training.seed)
    model = GPTModel(training.model_config).to(device)
    wrapped = wrap_model(model, ranks, device, training.dtype_name, parallelism=config.parallelism,
                         activation_checkpointing=config.activation_checkpointing, compile=config.compile)
    return dataclasses.replace(training, model=wrapped, optimizer=build_optimizer(model, config, device),
                               scaler=torch.amp.GradScaler(device.type, enabled=training.dtype_name == "fp16"))


class RepeatedRows:
    """Batches of `size` sequences taken in order from the run's train batches, wrapping
    round at their end: a trial trains on real data at any size, however short the split."""

    def __init__(self, batches, size: int):
        self.batches, self.size = batches, size
        self.batches_per_trial_batch = math.ceil(size / batches.batch_size)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index: int):
        first = index * self.batches_per_trial_batch
        parts = [self.batches[(first + i) % len(self.batches)] for i in range(self.batches_per_trial_batch)]
        return tuple(torch.cat([part[which] for part in parts])[:self.size] for which in (0, 1))


class CpuMemoryBudget:
    """On a CPU nothing fails cleanly when memory runs out: the machine swaps, or the
    kernel kills a rank. A trial fits when this rank's peak resident memory grew, from
    before the search, by at most its share of the memory available: CPU_MEMORY_SHARE of
    MemAvailable divided over the node's ranks. A trial is not even run when the growth
    extrapolated from the two largest sizes measured would pass that share."""

    def __init__(self, ranks: Ranks):
        available = read_proc_kib("/proc/meminfo", "MemAvailable")
        if available is None:
            raise click.ClickException("-f/--find-max-microbatch-size on a CPU reads the memory available "
                                       "from /proc/meminfo, which this system does not have")
        self.ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        # Every rank judges against the same number: the smallest any rank saw.
        self.budget = min(gather_from_all(CPU_MEMORY_SHARE * available / self.ranks_on_node, ranks))
        self.baseline = read_proc_kib("/proc/self/status", "VmRSS") or peak_rss_bytes()
        self.growths = {}  # size -> measured RSS growth, of the sizes that ran

    def measured(self, size: int) -> int:
        growth = peak_rss_bytes() - self.baseline
        self.growths[size] = growth
        return growth

    def predicted_growth(self, size: int) -> float:
        return extrapolated_growth(self.growths, size)


def extrapolated_growth(growths: dict, size: int) -> float:
    """The RSS growth of `size` sequences from those measured below it (size -> bytes): a
    straight line through the two largest (a fixed part, AdamW's state, and a part per
    sequence), or proportional to the one; 0 when none is known."""
    below = sorted(measured for measured in growths if measured < size)
    if not below:
        return 0.0
    largest = below[-1]
    proportional = growths[largest] * size / largest
    if len(below) == 1:
        return proportional
    smaller = below[-2]
    per_sequence = (growths[largest] - growths[smaller]) / (largest - smaller)
    if per_sequence <= 0:  # noise (the allocator keeping freed memory): the cautious guess
        return proportional
    return growths[largest] + per_sequence * (size - largest)
