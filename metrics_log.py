"""runs/RUN/metrics.jsonl: what happened at every step, one JSON object per line.

Global rank 0 appends two kinds of rows (every key is documented in the README):

    {"kind": "train", "step": 41, "loss": 5.91, "learning_rate": 0.0004,
     "grad_norm": 0.83, "clipped_fraction": 0.0, "tokens_per_second": 51234.5, "mfu": 0.41,
     "tokens_seen": 1376256, "elapsed_seconds": 26.9, "cpu_rss_bytes": 1203765248}
    {"kind": "validation", "step": 50, "train_loss": 5.87, "val_loss": 5.93,
     "is_best": true, "checkpoint": "20261202-120000-iteration-50"}

A training row stands for the steps since the previous training row: `loss` is the mean
over those steps, every rank and every micro-step; `grad_norm` (present when grad_clip is
set) the mean norm before clipping and `clipped_fraction` the share of those steps whose
norm was clipped. On CUDA `cuda_max_allocated_bytes` replaces `cpu_rss_bytes`.
"""

import json
from pathlib import Path

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
