"""The run's charts, drawn headless and atomically into runs/RUN/:

- big-training-run-chart.png (the original's file): train and validation loss against
  global step, best step marked, from the checkpoints' history;
- training-metrics-chart.png: what happened between checkpoints, from metrics.jsonl
  (see metrics.py), one function a panel: training loss per logged step under the
  validation points, benchmark scores (when there are any), learning rate, gradient norm
  with the clip threshold and the share of clipped steps, and tokens/s with MFU. It is a
  look at the run, not an analysis tool: TensorBoard and W&B get the same rows.

ddp_train.py redraws them after every checkpoint, on a thread of global rank 0
(progress.ChartDrawer); chart.py RUN_DIR redraws them by hand (redraw_charts).

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
ROUTING_CHART_FILE = "moe-routing-chart.png"
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
        axes.plot(steps, [_number(point["train_loss"]) for point in points], label="training loss", **marker)
        validated = any(point.get("val_loss") is not None for point in points)
        if validated:
            axes.plot(steps, [_number(point.get("val_loss")) for point in points], label="validation loss", **marker)
        if best_step is not None:
            # Without validation (checkpoint_interval) best is the lowest training loss.
            axes.axvline(best_step, color="red", linestyle="--",
                         label=f"best {'validation' if validated else 'training'} loss (step {best_step})")
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
# Dots on lines of at most this many points: a short run's few values are seen one by one.
MAX_MARKED_POINTS = 60


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


class Series:
    """The training rows' steps and how a noisy series of them is drawn: as logged when
    short, else faint under its rolling mean."""

    def __init__(self, train_rows):
        import numpy as np

        self.rows = train_rows
        self.steps = _column(train_rows, "step")
        window = int(len(train_rows) * SMOOTHING_SHARE) // 2 * 2 + 1  # odd: centred
        self.window = window if window >= 5 else 1
        # Steps per row, for the legend: "mean over 250 steps" at log_interval 10.
        self.steps_per_row = float(np.median(np.diff(self.steps))) if len(self.steps) > 1 else 1.0

    def column(self, key):
        return _column(self.rows, key)

    def plot(self, axes, values, color, label, note=""):
        """Returns the line drawn over the raw one (for the legend)."""
        if self.window > 1:
            # No xkcd halo on the faint line: a white stroke around every wiggle would wash it out.
            axes.plot(self.steps, values, color=color, alpha=0.25, linewidth=0.8, path_effects=[])
            (line,) = axes.plot(self.steps, rolling_mean(values, self.window), color=color, linewidth=2,
                                label=f"{label}, mean over {self.window * self.steps_per_row:,.0f} steps{note}")
            return line
        marker = {"marker": "o", "markersize": 3} if len(self.steps) <= MAX_MARKED_POINTS else {}
        (line,) = axes.plot(self.steps, values, color=color, label=label + note, **marker)
        return line


def _say_nothing_logged(axes, message):
    axes.text(0.5, 0.5, message, transform=axes.transAxes, ha="center", va="center", color="gray")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _title(train_rows):
    if not train_rows:
        return "training metrics"
    last = train_rows[-1]
    parts = [f"step {last['step']:,}"]
    if not math.isnan(_number(last.get("tokens_seen"))):
        parts.append(f"{last['tokens_seen']:,} tokens")
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


def draw_loss_panel(axes, series: Series, validation_rows):
    """The training rows' loss under the validation points, the best one starred."""
    import numpy as np

    loss = series.column("loss")
    if not np.isnan(loss).all():
        series.plot(axes, loss, "tab:blue", "training loss")
    val_steps, val_loss = _column(validation_rows, "step"), _column(validation_rows, "val_loss")
    if not np.isnan(val_loss).all():
        axes.plot(val_steps, val_loss, color="tab:orange", marker="o", markersize=4, label="validation loss")
        best = [row for row in validation_rows if row.get("is_best") is True
                and not math.isnan(_number(row.get("val_loss")))]
        if best:
            axes.plot([best[-1]["step"]], [best[-1]["val_loss"]], linestyle="none", marker="*", markersize=16,
                      color="tab:red", zorder=5, clip_on=False,
                      label=f"best validation loss {best[-1]['val_loss']:.3f} (step {best[-1]['step']:,})")
    if axes.lines:
        axes.legend(loc="upper right")
    else:
        _say_nothing_logged(axes, "no loss logged")
    axes.set_ylabel("loss")
    axes.set_title("loss", fontsize="medium")


def draw_learning_rate_panel(axes, series: Series):
    """Smooth by construction: drawn as logged."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    learning_rate = series.column("learning_rate")
    if not np.isnan(learning_rate).all():
        marker = {"marker": "o", "markersize": 3} if len(series.steps) <= MAX_MARKED_POINTS else {}
        axes.plot(series.steps, learning_rate, color="tab:green", **marker)
        axes.set_ylim(bottom=0)
    else:
        _say_nothing_logged(axes, "no learning rate logged")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
    axes.set_ylabel("learning rate")
    axes.set_title("learning rate", fontsize="medium")


def draw_gradient_norm_panel(axes, series: Series, grad_clip):
    """The norm before clipping, grad_clip (None: no clipping, no line) as a dashed line,
    and the share of steps clipped on a right-hand axis."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    grad_norm, clipped = series.column("grad_norm"), series.column("clipped_fraction")
    handles = []
    if not np.isnan(grad_norm).all():
        handles.append(series.plot(axes, grad_norm, "tab:purple", "gradient norm before clipping"))
        axes.set_ylim(bottom=0)
    else:
        _say_nothing_logged(axes, "no gradient norm logged (measured only when train.json sets grad_clip)")
    if grad_clip is not None:
        handles.append(axes.axhline(grad_clip, color="tab:red", linestyle="--", label=f"clip threshold ({grad_clip:g})"))
    if not np.isnan(clipped).all():
        share_axes = axes.twinx()
        handles.append(share_axes.plot(series.steps, rolling_mean(clipped, series.window), color="tab:red",
                                       alpha=0.5, label="steps clipped (right)")[0])
        share_axes.set_ylim(0, 1.05)
        share_axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        share_axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
        share_axes.set_ylabel("steps clipped")
    if handles:
        axes.legend(handles=handles, loc="upper right")
    axes.set_ylabel("gradient norm")
    axes.set_title("gradient norm", fontsize="medium")


def draw_throughput_panel(axes, series: Series):
    """tokens/s, with MFU on a right-hand axis, and the peak memory in the title."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    tokens_per_second, mfu = series.column("tokens_per_second"), series.column("mfu")
    handles = []
    if not np.isnan(tokens_per_second).all():
        handles.append(series.plot(axes, tokens_per_second, "tab:blue", "tokens/s"))
        axes.set_ylim(bottom=0)
    if not np.isnan(mfu).all():
        mfu_axes = axes.twinx()
        handles.append(series.plot(mfu_axes, mfu, "tab:orange", "MFU", " (right)"))
        mfu_axes.set_ylim(bottom=0)
        # Whole percents unless MFU is tiny (a CPU run against a made-up peak, say).
        decimals = 0 if np.nanmax(mfu) >= 0.05 else None
        mfu_axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=decimals))
        mfu_axes.set_ylabel("MFU")
    if handles:
        axes.legend(handles=handles, loc="lower right")
    else:
        _say_nothing_logged(axes, "no throughput logged")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
    axes.set_ylabel("tokens/s")
    axes.set_title(f"throughput{_peak_memory(series.rows)}", fontsize="medium")


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


def draw_benchmark_panel(axes, benchmark_rows):
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
    atomically; returns the matplotlib Figure: the loss, learning rate, gradient norm and
    throughput panels over global step, and a benchmark panel under the loss when there
    are benchmark rows. A key no row carries leaves its panel saying so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    train_rows, validation_rows = latest_rows(rows, "train"), latest_rows(rows, "validation")
    benchmark_rows = latest_rows(rows, "benchmark")
    series = Series(train_rows)
    all_steps = [row["step"] for row in train_rows + validation_rows + benchmark_rows]
    low, high = min(all_steps, default=0), max(all_steps, default=0)
    margin = max(0.5, (high - low) * 0.01)
    with chart_style():
        heights = [3, 2, 3, 2.5]
        if benchmark_rows:   # a panel of scores under the loss: both say whether it learns
            heights.insert(1, 2.5)
        figure = Figure(figsize=(12, 10 + (2.5 if benchmark_rows else 0)))
        FigureCanvasAgg(figure)
        panels = list(figure.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights}))
        draw_loss_panel(panels[0], series, validation_rows)
        if benchmark_rows:
            draw_benchmark_panel(panels[1], benchmark_rows)
        draw_learning_rate_panel(panels[-3], series)
        draw_gradient_norm_panel(panels[-2], series, grad_clip)
        draw_throughput_panel(panels[-1], series)
        bottom = panels[-1]
        bottom.xaxis.set_major_locator(MaxNLocator(nbins=10, steps=[1, 2, 5, 10], integer=True, min_n_ticks=1))
        bottom.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        bottom.set_xlim(low - margin, high + margin)
        bottom.set_xlabel("global step")
        for axes in panels:
            # xkcd mode gives grid lines no width but a white halo: no halo.
            axes.grid(alpha=0.3, path_effects=[])
        figure.suptitle(_title(train_rows))
        figure.tight_layout()
        with safe_files.replacing(png_path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    return figure


# --- a mixture of experts' routing ---

def draw_routing_chart(rows, png_path):
    """How a mixture of experts routes, from metrics.jsonl's training rows: per MoE layer
    (a row of the figure) two heatmaps over global step and expert, each row's mean over
    rank 0's micro-steps: the router's probability of each expert (the softmax over all
    of them), and the weight each gets after the top-k (0 where not chosen). An even
    colour is balanced routing; a bright stripe is an expert taking every token, a dark
    one an expert left idle. Atomically written; returns the Figure."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    routed = [row for row in latest_rows(rows, "train") if isinstance(row.get("moe_routing_weights"), list)]
    layers = max((len(row["moe_routing_weights"]) for row in routed), default=0)
    steps = [row["step"] for row in routed]
    with chart_style():
        figure = Figure(figsize=(12, 2.6 * max(layers, 1) + 1))
        FigureCanvasAgg(figure)
        panels = figure.subplots(max(layers, 1), 2, squeeze=False, sharex=True)
        for layer in range(layers):
            for column, (key, what) in enumerate((("moe_routing_weights", "router probability"),
                                                  ("moe_routing_topk_weights", "weight after top-k"))):
                values = np.array([row[key][layer] for row in routed], dtype=float).T   # experts x rows
                axes = panels[layer][column]
                image = axes.imshow(values, aspect="auto", origin="lower", interpolation="nearest",
                                    extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, values.shape[0] - 0.5),
                                    vmin=0, vmax=max(values.max(), 1e-9), cmap="viridis")
                figure.colorbar(image, ax=axes)
                axes.set_title(f"layer {layer}: {what}", fontsize="medium")
                axes.set_ylabel("expert")
                axes.yaxis.set_major_locator(MaxNLocator(integer=True))
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        for axes in panels[-1]:
            axes.set_xlabel("global step")
        if not layers:
            _say_nothing_logged(panels[0][0], "no routing logged")
        figure.suptitle("mixture of experts: routing (mean over rank 0's micro-steps of each logged row)")
        figure.tight_layout()
        with safe_files.replacing(png_path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    return figure


def chart_points(checkpoints_dir):
    """The points and best step to draw for a run's checkpoints directory: the history
    `latest` carries (or, for the original scripts' runs, every checkpoint's)."""
    # Imported here, not at the top: checkpointing imports torch, which takes seconds,
    # and `chart.py --help` should answer at once.
    from . import checkpointing, run_history

    points = run_history.run_history(checkpoints_dir)
    best = checkpointing.link_target(checkpoints_dir, "best")
    best_steps = {point["global_step"] for point in points}
    best_step = best.global_step if best is not None and best.global_step in best_steps else None
    return points, best_step


class Redrawn(NamedTuple):
    files: list            # the PNGs written, loss chart first
    bad_metrics_lines: list  # metrics.jsonl's unreadable line numbers (1-based), skipped


def redraw_charts(run_dir, history, best_step, grad_clip=None, metrics_end=None) -> Redrawn:
    """Redraw a run's charts: the loss chart from history (checkpoint points as in
    meta.json, best_step as draw_loss_chart takes it) and, when run_dir holds a
    metrics.jsonl with rows, the metrics chart from it (its first metrics_end bytes, when
    given). Lines of metrics.jsonl that do not parse are skipped and returned, for the
    caller to report as it sees fit.

    It reads the whole log each time, which for 10,000 rows is a small part of the
    drawing (docs/performance.md has the seconds)."""
    from .metrics import METRICS_FILE, read_metrics  # here: it imports torch, which --help must not wait for

    run_dir = Path(run_dir)
    files = []
    if history:
        draw_loss_chart(history, best_step, run_dir / CHART_FILE)
        files.append(run_dir / CHART_FILE)
    rows, bad_lines = read_metrics(run_dir / METRICS_FILE, metrics_end)
    if rows:
        draw_metrics_chart(rows, run_dir / METRICS_CHART_FILE, grad_clip)
        files.append(run_dir / METRICS_CHART_FILE)
    if any("moe_routing_weights" in row for row in rows):
        draw_routing_chart(rows, run_dir / ROUTING_CHART_FILE)
        files.append(run_dir / ROUTING_CHART_FILE)
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
