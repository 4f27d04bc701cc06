"""Side-by-side timing helpers for the benchmarks: alternate, warm up, report medians."""

import statistics
import time

import torch

from support.devices import synchronize  # the project root is on sys.path in every bench script


def alternate(candidates, repeats, warmup=1, device=torch.device("cpu")):
    """Time each named callable `repeats` times, interleaved (A, B, A, B, ...) after warm-up.

    Interleaving spreads the machine's noise (other processes, clock changes) over
    all candidates alike, so the ratio of medians is trustworthy even when the
    absolute numbers drift. Returns {name: median seconds}.
    """
    for function in candidates.values():
        for _ in range(warmup):
            function()
    synchronize(device)
    seconds = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def print_table(headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))
