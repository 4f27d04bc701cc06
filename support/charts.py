"""The run's charts, drawn headless and atomically into runs/RUN/:

- big-training-run-chart.png (the original's file): train and validation loss against
  global step, best step marked, from the checkpoints' history;
- training-metrics-chart.png: what happened between checkpoints, from metrics.jsonl
  (see metrics.py): training loss per logged step under the validation points,
  learning rate, gradient norm with the clip threshold and the share of clipped steps,
  and tokens/s with MFU.

ddp_train.py redraws both after every checkpoint (redraw_charts). To redraw them by hand
(for a run the original scripts trained, say, which has no metrics.jsonl and so only the
loss chart):

    uv run python chart.py RUN_DIR

Headless (matplotlib's Agg canvas, no display needed). xkcd style, as the original,
when an xkcd font is installed (setup_lambda.sh installs one); plain otherwise,
because xkcd mode without its font only produces warnings and a fallback font.
"""

import contextlib
import math
from pathlib import Path
from typing import NamedTuple

from . import safe_files

CHART_FILE = "big-training-run-chart.png"
METRICS_CHART_FILE = "training-metrics-chart.png"
XKCD_FONTS = ("xkcd", "xkcd Script", "Humor Sans")


def installed_xkcd_fonts() -> list[str]:
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [name for name in XKCD_FONTS if name in installed]


def xkcd_font_installed() -> bool:
    return bool(installed_xkcd_fonts())


@contextlib.contextmanager
def chart_style():
    """xkcd style while drawing when an xkcd font is installed; matplotlib's plain style
    otherwise. Only rcParams change, and they are restored on the way out."""
    import matplotlib.pyplot as plt

    fonts = installed_xkcd_fonts()
    if not fonts:
        yield
        return
    with plt.xkcd():
        # plt.xkcd() asks for fonts a machine rarely has all of, and no longer for Humor
        # Sans (matplotlib 3.8 already not): matplotlib >= 3.6 then logs a "findfont: ...
        # not found" line per missing font for every text drawn, thousands a chart, and
        # ignores Humor Sans. Name the installed ones alone.
        plt.rcParams["font.family"] = fonts
        yield


def draw_loss_chart(points, best_step, png_path):
    """Plot points ({global_step, train_loss, val_loss} dicts) to png_path, atomically;
    returns the matplotlib Figure.

    best_step (or None) gets a dashed vertical line. The image is written to a hidden
    temporary file and renamed, so a crash never leaves a truncated PNG behind.
    """
    # matplotlib is imported here, not at the top: only global rank 0 ever draws, and
    # the import costs every other rank a second of start-up.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    points = sorted(points, key=lambda point: point["global_step"])
    steps = [point["global_step"] for point in points]
    marker = {"marker": "o", "markersize": 3} if len(points) <= 100 else {}
    # The style only sets rcParams; the figure is drawn on an Agg canvas of its own, never
    # through pyplot's window machinery, so no display is needed.
    with chart_style():
        figure = Figure(figsize=(12, 7))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(steps, [point["train_loss"] for point in points], label="training loss", **marker)
        axes.plot(steps, [point["val_loss"] for point in points], label="validation loss", **marker)
        if best_step is not None:
            axes.axvline(best_step, color="red", linestyle="--",
                         label=f"best validation loss (step {best_step})")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("global step")
        axes.set_ylabel("loss")
        axes.set_title("training run loss")
        axes.legend()
        figure.tight_layout()
        with safe_files.replacing(png_path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    return figure


# --- the metrics chart ---

# A noisy series of many rows gets a rolling mean over its faint raw line, the window this
# share of the rows, so that the smoothing looks alike at every run length. The window is
# odd and at least 5 rows: under 160 rows, the series is drawn as logged.
SMOOTHING_SHARE = 1 / 40
# At most this many bars of "share of steps clipped" across the gradient-norm panel.
MAX_CLIP_BARS = 50
# Dots on lines of at most this many points: a short run's few values are seen one by one.
MAX_MARKED_POINTS = 60
# The loss panel may leave this first share of the steps' (higher) loss above its top.
LOSS_ZOOM_SKIPS = 0.1


def _number(value) -> float:
    """A row's value as a float; NaN (a gap in the line) for a missing, non-numeric or
    infinite one (json reads NaN and Infinity; a diverged run may have logged them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _column(rows, key):
    """One key of every row as a float array, NaN where _number gives NaN."""
    import numpy as np

    values = [row.get(key) for row in rows]
    # numpy converts a list of numbers and None (as NaN) in one go, several times faster
    # than a call per value, which matters at 100,000 rows; anything else (a string, a
    # bool, a list) takes the slow path, value by value.
    if set(map(type, values)) <= {int, float, type(None)}:
        column = np.array(values, dtype=float)
        column[~np.isfinite(column)] = np.nan
        return column
    return np.array([_number(value) for value in values], dtype=float)


def latest_rows(rows, kind):
    """The rows of one kind in step order, the last written winning where a step appears
    twice (a resume drops rows past its step, so only a hand-edited file has doubles)."""
    by_step = {row["step"]: row for row in rows if row.get("kind") == kind}
    return [by_step[step] for step in sorted(by_step)]


def steps_covered(steps):
    """How many global steps each training row stands for: the gap to the row before it.
    The first row's gap is unknown (a run continued from the original scripts starts its
    log mid-run): it covers at most `step + 1` steps and is taken as long as the next gap."""
    import numpy as np

    steps = np.asarray(steps, dtype=float)
    if len(steps) == 0:
        return steps
    gaps = np.diff(steps)
    first = min(steps[0] + 1, gaps[0]) if len(gaps) else 1.0
    return np.concatenate([[max(first, 1.0)], gaps])


def rolling_mean(values, window: int):
    """The mean of each value's `window` neighbours (centred, fewer at the ends), skipping
    NaN; NaN where the value itself is missing, so gaps in a series stay gaps."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    present = ~np.isnan(values)
    # Running sums make every window's mean one subtraction: O(rows), whatever the window.
    sums = np.concatenate([[0.0], np.cumsum(np.where(present, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(present)])
    index = np.arange(len(values))
    low = np.maximum(index - window // 2, 0)
    high = np.minimum(index + window // 2 + 1, len(values))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums[high] - sums[low]) / (counts[high] - counts[low])
    means[~present] = np.nan
    return means


def _nice_width(width: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... steps that is at least width."""
    magnitude = 1
    while True:
        for multiple in (1, 2, 5):
            if multiple * magnitude >= width:
                return multiple * magnitude
        magnitude *= 10


def clipped_share_bars(steps, covered, clipped_fractions):
    """Bars of the share of steps whose gradient norm was clipped: (edges, shares, width).

    One bar per training row when there are few; else buckets of a round number of steps
    (width; None for one bar a row), each the mean of its rows weighted by the steps each
    row covers. Rows without clipped_fraction count in no bar; a bar of none is NaN (no
    bar); None when no row has one."""
    import numpy as np

    known = ~np.isnan(clipped_fractions)
    if not known.any():
        return None
    if len(steps) <= MAX_CLIP_BARS:
        # Row i stands for steps (step - covered, step]: its bar spans them.
        edges = np.concatenate([[steps[0] - covered[0] + 0.5], steps + 0.5])
        return edges, clipped_fractions, None
    steps, covered, fractions = steps[known], covered[known], clipped_fractions[known]
    first = steps[0] - covered[0] + 1
    width = _nice_width((steps[-1] - first + 1) / MAX_CLIP_BARS)
    start = first // width * width
    bucket = ((steps - start) // width).astype(int)
    count = int(bucket[-1]) + 1
    weights = np.bincount(bucket, weights=covered, minlength=count)
    clipped = np.bincount(bucket, weights=covered * fractions, minlength=count)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(weights > 0, clipped / np.where(weights > 0, weights, 1), np.nan)
    edges = start + width * np.arange(count + 1) - 0.5
    return edges, shares, width


def _plot_series(axes, steps, values, window, typical_covered, color, label, note=""):
    """A noisy series: faint raw line and its rolling mean when long, a plain line (with
    dots when short) otherwise. Returns the line drawn over the raw one (for the legend)."""
    if window > 1:
        # No xkcd halo on the faint line: a white stroke around every wiggle would wash it out.
        axes.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, path_effects=[])
        span = _thousands(window * typical_covered)
        (line,) = axes.plot(steps, rolling_mean(values, window), color=color, linewidth=2,
                            label=f"{label}, mean over {span} steps{note}")
        return line
    marker = {"marker": "o", "markersize": 3} if len(steps) <= MAX_MARKED_POINTS else {}
    (line,) = axes.plot(steps, values, color=color, label=label + note, **marker)
    return line


def _late_loss_limits(steps, train_line, val_steps, val_loss, low, high):
    """y limits for the loss panel that leave out the first steps' loss when showing it
    would squash the rest of the run into a sliver (a loss falling from 11 to 4 in its
    first few percent, then slowly to 3); None to show everything."""
    import numpy as np

    late_from = low + LOSS_ZOOM_SKIPS * (high - low)
    late = np.concatenate([train_line[steps >= late_from], val_loss[val_steps >= late_from]])
    every = np.concatenate([train_line, val_loss])
    late, every = late[~np.isnan(late)], every[~np.isnan(every)]
    if len(late) == 0:
        return None
    bottom, top = every.min(), late.max()
    if every.max() - bottom <= 3 * (top - bottom):
        return None
    span = top - bottom
    return bottom - 0.05 * span, top + 0.25 * span


def _constant_ratio(numerators, denominators):
    """numerators / denominators where that is one number (within 1%) over every row that
    has both; None otherwise."""
    import numpy as np

    both = ~np.isnan(numerators) & ~np.isnan(denominators) & (denominators > 0)
    if not both.any():
        return None
    ratios = numerators[both] / denominators[both]
    low, high = ratios.min(), ratios.max()
    if low <= 0 or high > 1.01 * low:
        return None
    return float(np.median(ratios))


def _thousands(value) -> str:
    return f"{value:,.0f}"


def _say_nothing_logged(axes, message):
    axes.text(0.5, 0.5, message, transform=axes.transAxes, ha="center", va="center",
              color="gray")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _title(train_rows):
    if not train_rows:
        return "training metrics"
    last = train_rows[-1]
    parts = [f"step {_thousands(last['step'])}"]
    if not math.isnan(_number(last.get("tokens_seen"))):
        parts.append(f"{_thousands(last['tokens_seen'])} tokens")
    if not math.isnan(_number(last.get("elapsed_seconds"))):
        parts.append(f"{_duration(last['elapsed_seconds'])} elapsed")
    return "training metrics: " + ", ".join(parts)


def _peak_memory(train_rows) -> str:
    """The peak memory any row saw, for the throughput panel's title ('' when none)."""
    for key, what in (("cuda_max_allocated_bytes", "peak CUDA memory allocated"),
                      ("cpu_rss_bytes", "peak CPU RSS")):
        values = [_number(row.get(key)) for row in train_rows]
        values = [value for value in values if not math.isnan(value)]
        if values:
            return f"; {what} {max(values) / 2**30:,.1f} GiB"
    return ""


def benchmark_series(benchmark_rows):
    """What the benchmark panel draws: for each task the rows name (`tasks`; in a row
    without it, every TASK/ prefix of its keys), its main score (benchmark_scores.main_metric)
    over the rows, as (task, metric, steps, values, standard errors), NaN where a row
    lacks it."""
    import numpy as np

    # Imported here: chart.py's command line answers --help before anything but click.
    from .benchmark_scores import main_metric, task_scores

    tasks = []
    for row in benchmark_rows:
        named = row.get("tasks")
        if isinstance(named, list):
            tasks += [task for task in named if isinstance(task, str)]
        else:
            tasks += [key.split("/", 1)[0] for key in row if "/" in key]
    series = []
    for task in dict.fromkeys(tasks):
        scores = [task_scores(row, task) for row in benchmark_rows]
        metric = main_metric(list(dict.fromkeys(metric for score in scores for metric in score)))
        if metric is None:
            continue
        pairs = [score.get(metric, (None, None)) for score in scores]
        series.append((task, metric, np.array([row["step"] for row in benchmark_rows], dtype=float),
                       np.array([_number(value) for value, _ in pairs]),
                       np.array([_number(stderr) for _, stderr in pairs])))
    return series


def _draw_benchmark_panel(axes, benchmark_rows):
    """Each task's main score against step: scores between 0 and 1 (accuracies) on the
    left axis in percent, with a band of one standard error; any others (a perplexity)
    dashed, on a log-scale right axis."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    series = benchmark_series(benchmark_rows)
    shares = [entry for entry in series if np.nanmin(entry[3], initial=np.inf) >= 0
              and np.nanmax(entry[3], initial=-np.inf) <= 1]
    others = [entry for entry in series if entry not in shares]
    marker = {"marker": "o", "markersize": 4}
    # The legend goes in rows across the top, over headroom left for it above the lines.
    columns = min(len(series), 4) or 1
    headroom = 1 + 0.3 * math.ceil(len(series) / columns)
    handles = []
    for task, metric, steps, values, errors in shares:
        (line,) = axes.plot(steps, values, label=f"{task} ({metric})", **marker)
        handles.append(line)
        if not np.isnan(errors).all():
            axes.fill_between(steps, values - errors, values + errors, color=line.get_color(),
                              alpha=0.15, linewidth=0, path_effects=[])
    if shares:
        low = min(np.nanmin(values - np.nan_to_num(errors)) for *_, values, errors in shares)
        high = max(np.nanmax(values + np.nan_to_num(errors)) for *_, values, errors in shares)
        pad = max(0.02, 0.1 * (high - low))
        bottom, top = max(0.0, low - pad), high + pad
        axes.set_ylim(bottom, min(1.0, bottom + (top - bottom) * headroom))
        axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
    if others:
        right = axes.twinx()
        for task, metric, steps, values, _ in others:
            (line,) = right.plot(steps, values, linestyle="--", color=f"C{len(handles) % 10}",
                                 label=f"{task} ({metric}, right)", **marker)
            handles.append(line)
        if all(np.nanmin(values, initial=np.inf) > 0 for *_, values, _ in others):
            right.set_yscale("log")
        low, high = right.get_ylim()
        if right.get_yscale() == "log":
            right.set_ylim(low, low * (high / low) ** headroom)
        else:
            right.set_ylim(low, low + (high - low) * headroom)
        right.set_ylabel(", ".join(dict.fromkeys(metric for _, metric, *_ in others)))
    if handles:
        axes.legend(handles=handles, loc="upper left", fontsize="small", ncol=columns)
    else:
        _say_nothing_logged(axes, "no benchmark scores logged")
    axes.set_ylabel("score")
    limit = benchmark_rows[-1].get("limit")
    examples = f"first {limit:,} examples of each task" if isinstance(limit, int) else "every example"
    axes.set_title(f"benchmarks (lm-eval, {examples}; shaded: ± one standard error)", fontsize="medium")


def draw_metrics_chart(rows, png_path, grad_clip=None):
    """Plot metrics.jsonl's rows (as metrics.read_metrics returns them) to png_path,
    atomically; returns the matplotlib Figure.

    Four panels over global step: training loss with the validation points (best one
    starred); learning rate; gradient norm, with grad_clip (None: no clipping, no line)
    as a dashed line and the share of clipped steps as bars on a right-hand axis; tokens/s
    with MFU on a right-hand axis. A key no row carries leaves its panel saying so. When
    there are benchmark rows, a fifth panel under the loss shows each task's main score.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import (FuncFormatter, LogLocator, MaxNLocator, NullFormatter,
                                   PercentFormatter)

    train_rows = latest_rows(rows, "train")
    validation_rows = latest_rows(rows, "validation")
    benchmark_rows = latest_rows(rows, "benchmark")
    steps = _column(train_rows, "step")
    covered = steps_covered(steps)
    typical_covered = float(np.median(covered)) if len(covered) else 1.0
    window = int(len(train_rows) * SMOOTHING_SHARE) // 2 * 2 + 1  # odd: centred
    window = window if window >= 5 else 1
    all_steps = [row["step"] for row in train_rows + validation_rows + benchmark_rows]
    low = min(steps[0] - covered[0] + 1, *all_steps) if len(steps) else min(all_steps, default=0)
    high = max(all_steps, default=0)
    margin = max(0.5, (high - low) * 0.01)
    thousands = FuncFormatter(lambda value, _: _thousands(value))
    general = FuncFormatter(lambda value, _: f"{value:g}")

    with chart_style():
        heights = [3, 2, 3, 2.5]
        if benchmark_rows:   # a panel of scores under the loss: both say whether it learns
            heights.insert(1, 2.5)
        figure = Figure(figsize=(12, 10 + (2.5 if benchmark_rows else 0)))
        FigureCanvasAgg(figure)
        panels = list(figure.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights}))
        if benchmark_rows:
            _draw_benchmark_panel(panels[1], benchmark_rows)
        loss_axes, lr_axes, norm_axes, speed_axes = panels[:1] + panels[-3:]

        # Loss: the training rows' loss, faint when long, under the validation points.
        loss = _column(train_rows, "loss")
        val_steps = _column(validation_rows, "step")
        val_loss = _column(validation_rows, "val_loss")
        loss_title = "loss"
        if not np.isnan(loss).all():
            train_line = _plot_series(loss_axes, steps, loss, window, typical_covered, "tab:blue",
                                      "training loss")
            limits = _late_loss_limits(steps, train_line.get_ydata(), val_steps, val_loss, low, high)
            if limits is not None:
                loss_axes.set_ylim(*limits)
                loss_title = ("loss (the first steps' higher loss is above the top: "
                              f"see {CHART_FILE})")
        if not np.isnan(val_loss).all():
            loss_axes.plot(val_steps, val_loss, color="tab:orange", marker="o", markersize=4,
                           label="validation loss")
            best = [row for row in validation_rows if row.get("is_best") is True
                    and not math.isnan(_number(row.get("val_loss")))]
            if best:
                loss_axes.plot([best[-1]["step"]], [best[-1]["val_loss"]], linestyle="none",
                               marker="*", markersize=16, color="tab:red", zorder=5, clip_on=False,
                               label=f"best validation loss {best[-1]['val_loss']:.3f} "
                                     f"(step {_thousands(best[-1]['step'])})")
        if loss_axes.lines:
            loss_axes.legend(loc="upper right")
        else:
            _say_nothing_logged(loss_axes, "no loss logged")
        loss_axes.set_ylabel("loss")

        # Learning rate: smooth by construction, drawn as logged.
        learning_rate = _column(train_rows, "learning_rate")
        if not np.isnan(learning_rate).all():
            marker = {"marker": "o", "markersize": 3} if len(steps) <= MAX_MARKED_POINTS else {}
            lr_axes.plot(steps, learning_rate, color="tab:green", **marker)
            lr_axes.set_ylim(bottom=0)
        else:
            _say_nothing_logged(lr_axes, "no learning rate logged")
        lr_axes.yaxis.set_major_formatter(general)
        lr_axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
        lr_axes.set_ylabel("learning rate")

        # Gradient norm, the clip threshold, and the share of steps clipped behind them.
        grad_norm = _column(train_rows, "grad_norm")
        clip_bars = clipped_share_bars(steps, covered, _column(train_rows, "clipped_fraction"))
        handles = []
        if clip_bars is not None:
            edges, shares, width = clip_bars
            share_axes = norm_axes.twinx()
            # The bars go behind the norm's lines: the twin is drawn first, the norm's own
            # background hidden so that the bars show through.
            norm_axes.set_zorder(share_axes.get_zorder() + 1)
            norm_axes.patch.set_visible(False)
            per = "logged row" if width is None else f"{_thousands(width)} steps"
            bars = share_axes.stairs(shares, edges, fill=True, color="tab:red", alpha=0.2,
                                     path_effects=[], label=f"steps clipped, share per {per} (right)")
            bars.set_sketch_params(None)  # xkcd's wobble would fray the bars' fill into stripes
            handles.append(bars)
            share_axes.set_ylim(0, 1.05)
            share_axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            share_axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
            share_axes.set_ylabel("steps clipped")
        if not np.isnan(grad_norm).all():
            handles.insert(0, _plot_series(norm_axes, steps, grad_norm, window, typical_covered,
                                           "tab:purple", "gradient norm before clipping"))
            positive = grad_norm[grad_norm > 0]
            if len(positive) and positive.max() > 10 * np.median(positive):
                # Early spikes tens of times the settled norm would flatten the rest: log scale.
                norm_axes.set_yscale("log")
                norm_axes.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                norm_axes.yaxis.set_major_formatter(general)
                norm_axes.yaxis.set_minor_formatter(NullFormatter())
            else:
                norm_axes.set_ylim(bottom=0)
        if grad_clip is not None:
            handles.append(norm_axes.axhline(grad_clip, color="tab:red", linestyle="--",
                                             label=f"clip threshold ({grad_clip:g})"))
        if handles:
            norm_axes.legend(handles=handles, loc="upper right")
        if np.isnan(grad_norm).all():
            _say_nothing_logged(norm_axes, "no gradient norm logged "
                                           "(measured only when train.json sets grad_clip)")
        norm_axes.set_ylabel("gradient norm")

        # Throughput, with MFU on a right-hand axis.
        tokens_per_second = _column(train_rows, "tokens_per_second")
        mfu = _column(train_rows, "mfu")
        has_speed, has_mfu = not np.isnan(tokens_per_second).all(), not np.isnan(mfu).all()
        speed_handles = []
        mfu_per_token_per_second = _constant_ratio(mfu, tokens_per_second)
        if has_speed:
            note = " (MFU on the right)" if mfu_per_token_per_second else ""
            speed_handles.append(_plot_series(speed_axes, steps, tokens_per_second, window,
                                              typical_covered, "tab:blue", "tokens/s", note))
            speed_axes.set_ylim(bottom=0)
        if mfu_per_token_per_second:
            # MFU is tokens/s times a constant (the model's FLOPs a token over the devices'
            # peak): one line read against two scales says it all.
            ratio = mfu_per_token_per_second
            mfu_axes = speed_axes.secondary_yaxis(
                "right", functions=(lambda value: value * ratio, lambda value: value / ratio))
        elif has_mfu:
            # Not proportional (the world size changed at a resume, say): a line of its own.
            mfu_axes = speed_axes.twinx()
            speed_handles.append(_plot_series(mfu_axes, steps, mfu, window, typical_covered,
                                              "tab:orange", "MFU", " (right)"))
            mfu_axes.set_ylim(bottom=0)
        if has_mfu:
            # Whole percents unless MFU is tiny (a CPU run against a made-up peak, say).
            decimals = 0 if np.nanmax(mfu) >= 0.05 else None
            mfu_axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=decimals))
            mfu_axes.set_ylabel("MFU")
        if speed_handles:
            speed_axes.legend(handles=speed_handles, loc="lower right")
        else:
            _say_nothing_logged(speed_axes, "no throughput logged")
        speed_axes.yaxis.set_major_formatter(thousands)
        speed_axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
        speed_axes.set_ylabel("tokens/s")
        speed_axes.set_title(f"throughput{_peak_memory(train_rows)}", fontsize="medium")

        loss_axes.set_title(loss_title, fontsize="medium")
        lr_axes.set_title("learning rate", fontsize="medium")
        norm_axes.set_title("gradient norm", fontsize="medium")
        speed_axes.xaxis.set_major_locator(MaxNLocator(nbins=10, steps=[1, 2, 5, 10], integer=True,
                                                       min_n_ticks=1))
        speed_axes.xaxis.set_major_formatter(thousands)
        speed_axes.set_xlim(low - margin, high + margin)
        speed_axes.set_xlabel("global step")
        for axes in panels:
            # xkcd mode gives grid lines no width but a white halo, which would cut stripes
            # through the bars: no halo.
            axes.grid(alpha=0.3, path_effects=[])
        figure.suptitle(_title(train_rows))
        figure.tight_layout()
        with safe_files.replacing(png_path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    return figure


def chart_points(checkpoints_dir):
    """The points and best step to draw for a run's checkpoints directory: the history
    `latest` carries (or, for the original scripts' runs, every checkpoint's)."""
    # Imported here, not at the top: checkpointing imports torch, which takes seconds,
    # and `chart.py --help` should answer at once.
    from . import checkpointing

    points = checkpointing.run_history(checkpoints_dir)
    best = checkpointing.link_target(checkpoints_dir, "best")
    best_steps = {point["global_step"] for point in points}
    best_step = best.global_step if best is not None and best.global_step in best_steps else None
    return points, best_step


class Redrawn(NamedTuple):
    files: list            # the PNGs written, loss chart first
    bad_metrics_lines: list  # metrics.jsonl's unreadable line numbers (1-based), skipped


def redraw_charts(run_dir, history, best_step, grad_clip=None) -> Redrawn:
    """Redraw a run's charts: the loss chart from history (checkpoint points as in
    meta.json, best_step as draw_loss_chart takes it) and, when run_dir holds a
    metrics.jsonl with rows, the metrics chart from it. Lines of metrics.jsonl that do
    not parse are skipped and returned, for the caller to report as it sees fit.

    ddp_train.py calls this on global rank 0 at every checkpoint, while the other ranks
    wait at the next collective: it reads the whole log each time, which for 10,000 rows
    is a small part of the drawing (docs/performance.md has the seconds)."""
    from .metrics import METRICS_FILE, read_metrics  # here: it imports torch, which --help must not wait for

    run_dir = Path(run_dir)
    files = []
    if history:
        draw_loss_chart(history, best_step, run_dir / CHART_FILE)
        files.append(run_dir / CHART_FILE)
    rows, bad_lines = read_metrics(run_dir / METRICS_FILE)
    if rows:
        draw_metrics_chart(rows, run_dir / METRICS_CHART_FILE, grad_clip)
        files.append(run_dir / METRICS_CHART_FILE)
    return Redrawn(files, bad_lines)


def bad_lines_warning(path, bad_lines) -> str:
    """One line naming a metrics file's unreadable lines (the first few, and how many)."""
    shown = ", ".join(str(number) for number in bad_lines[:5])
    more = f", ... ({len(bad_lines)} in all)" if len(bad_lines) > 5 else ""
    noun = "line" if len(bad_lines) == 1 else "lines"
    return (f"warning: {path}: {noun} {shown}{more} not a JSON row with an integer step; "
            f"drawn without {'it' if len(bad_lines) == 1 else 'them'}")


def run_grad_clip(run_dir):
    """The clip threshold of run_dir/train.json; None when it sets none or there is no
    train.json (the chart is then drawn without the line). A broken train.json is a
    ConfigError naming file, key and value."""
    from .config import load_train_config

    path = Path(run_dir) / "train.json"
    return load_train_config(path).grad_clip if path.exists() else None
