"""The charts: the loss chart drawn headless, atomically, from our checkpoints or the
original scripts'; the metrics chart from metrics.jsonl at several run lengths."""

import json
import math
import os
import random
from pathlib import Path

import pytest

from helpers import run_script
from support import charts as chart
from support import progress
from support.progress import ChartDrawer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def point(step, train, val, is_best=False):
    return {"global_step": step, "train_loss": train, "val_loss": val, "is_best": is_best}


def write_checkpoint(checkpoints_dir, name, meta):
    """Just the two files listing looks at: enough for the chart."""
    path = Path(checkpoints_dir) / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_draws_a_png_atomically(tmp_path):
    png = tmp_path / "big-training-run-chart.png"
    png.write_bytes(b"an older chart")
    chart.draw_loss_chart([point(0, 10.9, 10.8), point(100, 6.1, 6.3, True), point(150, 6.0, 6.4)],
                          100, png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path) == ["big-training-run-chart.png"]  # no temporary left behind


def test_points_come_from_latest_history_when_present(tmp_path):
    # keep_checkpoints deleted the older checkpoints; their points live on in the history.
    history = [point(0, 9.0, 9.5, True), point(10, 8.0, 8.5, True), point(20, 7.0, 7.5, True)]
    write_checkpoint(tmp_path, "20250101Z000200-iteration-20",
                     {**history[-1], "history": history})
    os.symlink("20250101Z000200-iteration-20", tmp_path / "latest")
    os.symlink("20250101Z000200-iteration-20", tmp_path / "best")
    points, best_step = chart.chart_points(tmp_path)
    assert [p["global_step"] for p in points] == [0, 10, 20]
    assert best_step == 20


def test_points_from_original_checkpoints_skip_leftovers(tmp_path):
    write_checkpoint(tmp_path, "20250101Z000000-iteration-0", point(0, 9.0, 9.5, True))
    write_checkpoint(tmp_path, "20250101Z000100-iteration-10", point(10, 8.0, 8.5, True))
    write_checkpoint(tmp_path, "20250101Z000200-iteration-20", point(20, 7.5, 8.9))
    # Resumed from step 10 later: the newer checkpoint of step 20 replaces the old one.
    write_checkpoint(tmp_path, "20250102Z000000-iteration-20", point(20, 7.0, 7.9))
    os.symlink("20250101Z000100-iteration-10", tmp_path / "best")
    os.symlink("20250102Z000000-iteration-20", tmp_path / "latest")
    (tmp_path / "20250101Z000300-iteration-30").mkdir()                # died mid-save
    (tmp_path / ".partial-20250101Z000400-iteration-40").mkdir()       # ours, died mid-save
    (tmp_path / "20250101Z000500-iteration-50").write_text("stray file")
    points, best_step = chart.chart_points(tmp_path)
    assert points == [point(0, 9.0, 9.5, True), point(10, 8.0, 8.5, True), point(20, 7.0, 7.9)]
    assert best_step == 10


def test_command_redraws_a_run_chart(tmp_path):
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir / "checkpoints", "20250101Z000000-iteration-0", point(0, 9.0, 9.5, True))
    result = run_script("chart.py", run_dir)
    assert result.returncode == 0, result.stderr
    assert (run_dir / chart.CHART_FILE).read_bytes()[:8] == PNG_MAGIC
    # No metrics.jsonl (the original scripts' run): the loss chart alone, and no warning.
    assert result.stdout == f"wrote {run_dir / chart.CHART_FILE} (1 points)\n" and not result.stderr
    assert sorted(os.listdir(run_dir)) == [chart.CHART_FILE, "checkpoints"]

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    result = run_script("chart.py", empty)
    assert result.returncode == 1
    assert "no complete checkpoints" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def humor_sans_font(tmp_path):
    """An xkcd-style font as matplotlib sees it: DejaVu Sans renamed 'Humor Sans'."""
    from fontTools.ttLib import TTFont
    from matplotlib import font_manager

    font = TTFont(font_manager.findfont("DejaVu Sans"))
    for record in font["name"].names:
        if record.nameID in (1, 4, 16):
            record.string = "Humor Sans"
    path = tmp_path / "humor-sans.ttf"
    font.save(path)
    before = list(font_manager.fontManager.ttflist)
    font_manager.fontManager.addfont(str(path))
    yield
    font_manager.fontManager.ttflist[:] = before


@pytest.fixture
def no_xkcd_font():
    """Hide any xkcd font this machine has, to see the fallback."""
    from matplotlib import font_manager

    before = list(font_manager.fontManager.ttflist)
    font_manager.fontManager.ttflist[:] = [font for font in before if font.name not in chart.XKCD_FONTS]
    yield
    font_manager.fontManager.ttflist[:] = before


def test_xkcd_style_when_the_font_is_installed(tmp_path, humor_sans_font, recwarn, caplog):
    import matplotlib

    assert chart.xkcd_font_installed()
    png = tmp_path / "chart.png"
    figure = chart.draw_loss_chart([point(0, 9.0, 9.5, True), point(10, 8.0, 8.5)], 0, png)
    metrics_figure = chart.draw_metrics_chart(synthetic_metrics(10), tmp_path / "metrics.png", 1.0)
    assert png.read_bytes()[:8] == PNG_MAGIC
    for drawn in (figure, metrics_figure):
        assert drawn.axes[0].lines[0].get_sketch_params() is not None  # hand-drawn wobble
        assert drawn.axes[0].title.get_fontfamily() == ["Humor Sans"]
    assert matplotlib.rcParams["path.sketch"] is None  # and the style did not leak out
    assert not [w for w in recwarn if "findfont" in str(w.message)]
    # Nor a logged "findfont: Font family 'xkcd' not found." per text drawn.
    assert not [record for record in caplog.records if "findfont" in record.getMessage()]


def test_plain_style_without_the_font(tmp_path, no_xkcd_font, recwarn):
    assert not chart.xkcd_font_installed()
    figure = chart.draw_loss_chart([point(0, 9.0, 9.5, True), point(10, 8.0, 8.5)], 0,
                                   tmp_path / "chart.png")
    assert figure.axes[0].lines[0].get_sketch_params() is None
    assert not [w for w in recwarn if "findfont" in str(w.message)]


# --- the metrics chart (training-metrics-chart.png, from metrics.jsonl) ---

def synthetic_metrics(steps, log_interval=1, grad_clip=1.0, seed=0):
    """metrics.jsonl rows of a made-up run shaped like a real one: cosine learning rate
    after a linear warmup, a noisy loss falling from 11 towards 3.3, gradient norms that
    start high (clipped) and settle with a few spikes, a slow first step, and validation
    rows at twenty checkpoints."""
    rng = random.Random(seed)
    warmup, peak, floor = max(1, steps // 20), 6e-4, 6e-5
    validation_interval, tokens_per_step = max(1, steps // 20), 524_288
    rows, pending, best, elapsed, logged_at = [], [], math.inf, 0.0, 0.0
    for step in range(steps):
        if step < warmup:
            learning_rate = peak * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            learning_rate = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        expected_loss = 3.3 + 7.7 * math.exp(-step / max(1, steps / 12))
        loss = expected_loss + rng.gauss(0, 0.04 + 0.15 * math.exp(-step / max(1, steps / 8)))
        norm = (0.35 + 6 * math.exp(-step / max(1, steps / 25))) * math.exp(rng.gauss(0, 0.25))
        norm *= 4 if rng.random() < 0.01 else 1
        elapsed += 25.0 if step == 0 else 1.1 * math.exp(rng.gauss(0, 0.02))  # compiling first
        pending.append((loss, norm))
        if (step + 1) % log_interval == 0 or step == steps - 1:
            tokens_per_second = tokens_per_step * len(pending) / (elapsed - logged_at)
            row = {"kind": "train", "step": step, "loss": sum(l for l, _ in pending) / len(pending),
                   "learning_rate": learning_rate, "tokens_per_second": tokens_per_second,
                   "mfu": tokens_per_second * 6 * 124e6 / 989e12,
                   "tokens_seen": (step + 1) * tokens_per_step, "elapsed_seconds": elapsed,
                   "cuda_max_allocated_bytes": 61 * 2**30}
            if grad_clip is not None:
                row["grad_norm"] = sum(n for _, n in pending) / len(pending)
                row["clipped_fraction"] = sum(n > grad_clip for _, n in pending) / len(pending)
            rows.append(row)
            pending, logged_at = [], elapsed
        if step % validation_interval == 0 or step == steps - 1:
            val_loss = expected_loss + 0.04 + rng.gauss(0, 0.01)
            rows.append({"kind": "validation", "step": step, "train_loss": expected_loss,
                         "val_loss": val_loss, "is_best": val_loss < best,
                         "checkpoint": f"20261202-120000-iteration-{step}"})
            best = min(best, val_loss)
    return rows


def write_metrics(path, rows):
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def axes_named(figure, ylabel):
    (axes,) = [axes for axes in figure.axes if axes.get_ylabel() == ylabel]
    return axes


def horizontal_lines(axes):
    """axhline's lines: two points spanning the axes' width at one height."""
    return [line for line in axes.lines if list(line.get_xdata()) == [0, 1]
            and len(set(line.get_ydata())) == 1]


def clipped_share_line(figure):
    """The share-of-steps-clipped line on the gradient-norm panel's right axis, or None."""
    lines = [line for axes in figure.axes if axes.get_ylabel() == "steps clipped" for line in axes.lines]
    return lines[0] if lines else None


@pytest.mark.parametrize("steps", [10, 10_000])
def test_metrics_chart_is_a_readable_png(tmp_path, steps):
    from matplotlib.image import imread

    rows = synthetic_metrics(steps)
    png = tmp_path / chart.METRICS_CHART_FILE
    figure = chart.draw_metrics_chart(rows, png, grad_clip=1.0)
    assert imread(png).shape[:2] == (1000, 1200)  # 12 x 10 inches at 100 dpi
    assert os.listdir(tmp_path) == [chart.METRICS_CHART_FILE]

    norm_axes = axes_named(figure, "gradient norm")
    assert [list(line.get_ydata()) for line in horizontal_lines(norm_axes)] == [[1.0, 1.0]]
    train_rows = [row for row in rows if row["kind"] == "train"]
    shares = clipped_share_line(figure).get_ydata()
    if steps == 10:
        # Few rows: every series drawn as logged, the clipped share too.
        assert list(shares) == [row["clipped_fraction"] for row in train_rows]
        assert all(line.get_alpha() is None for line in norm_axes.lines)
    else:
        # Many rows: the noisy series drawn faint under a rolling mean of 1/40 of the rows
        # (251 here: 250 made odd), the clipped share as that rolling mean.
        assert [line.get_alpha() for line in norm_axes.lines[:2]] == [0.25, None]
        assert "mean over 251 steps" in norm_axes.lines[1].get_label()
        clipped = [row["clipped_fraction"] for row in train_rows]
        assert shares[5000] == pytest.approx(sum(clipped[5000 - 125:5000 + 126]) / 251)
        # Thousands separators on the step axis.
        labels = [label.get_text() for label in figure.axes[3].get_xticklabels()]
        assert "10,000" in labels


def test_no_clipping_draws_no_clip_line_or_bars(tmp_path):
    rows = synthetic_metrics(10, grad_clip=None)
    assert not any("grad_norm" in row for row in rows)
    figure = chart.draw_metrics_chart(rows, tmp_path / "metrics.png", grad_clip=None)
    norm_axes = axes_named(figure, "gradient norm")
    assert len(norm_axes.lines) == 0 and clipped_share_line(figure) is None
    assert "no gradient norm logged" in " ".join(text.get_text() for text in norm_axes.texts)


def test_the_benchmark_panel_shows_each_tasks_main_score(tmp_path):
    from matplotlib.image import imread

    rows = synthetic_metrics(10)
    scores = {0: (0.25, 0.30, 9e8), 5: (0.27, None, 4e6), 9: (0.31, 0.36, 2e5)}
    for step, (hellaswag, arc_easy, perplexity) in scores.items():
        row = {"kind": "benchmark", "step": step, "tasks": ["hellaswag", "arc_easy", "tiny_answer"],
               "limit": 500, "seconds": 3.0, "hellaswag/acc": hellaswag - 0.01, "hellaswag/acc_stderr": 0.02,
               "hellaswag/acc_norm": hellaswag, "hellaswag/acc_norm_stderr": 0.02,
               "tiny_answer/perplexity": perplexity}
        if arc_easy is not None:   # a step without it: a gap in its line
            row["arc_easy/acc"] = arc_easy
        rows.append(row)
    png = tmp_path / chart.METRICS_CHART_FILE
    figure = chart.draw_metrics_chart(rows, png, grad_clip=1.0)
    assert imread(png).shape[:2] == (1250, 1200)   # 2.5 inches more for the fifth panel
    score_axes = axes_named(figure, "score")
    assert figure.axes.index(score_axes) == 1   # under the loss
    assert "first 500 examples of each task" in score_axes.get_title()
    # acc_norm where there is one, else acc, else the first metric; scores beyond [0, 1]
    # (a perplexity) dashed on a log-scale right axis.
    assert [text.get_text() for text in score_axes.get_legend().get_texts()] == [
        "hellaswag (acc_norm)", "arc_easy (acc)", "tiny_answer (perplexity, right)"]
    hellaswag, arc_easy = score_axes.lines
    assert list(hellaswag.get_xdata()) == [0, 5, 9] and list(hellaswag.get_ydata()) == [0.25, 0.27, 0.31]
    assert [str(value) for value in arc_easy.get_ydata()] == ["0.3", "nan", "0.36"]
    assert len(score_axes.collections) == 1   # the standard-error band: hellaswag's alone
    perplexity_axes = axes_named(figure, "perplexity")
    assert perplexity_axes.get_yscale() == "log" and perplexity_axes.lines[0].get_linestyle() == "--"


def test_rows_missing_keys_or_values_still_draw(tmp_path):
    # A run resumed with other settings, or a newer writer's rows: missing keys, null, a
    # diverged NaN/Infinity loss, an unknown kind, a benchmark row without a score, a step
    # logged twice (the last wins), values that are no numbers.
    rows = [{"kind": "train", "step": 0, "loss": 10.9},
            {"kind": "train", "step": 1, "loss": None, "learning_rate": 0.001},
            {"kind": "train", "step": 2, "loss": float("inf"), "grad_norm": 2.0},
            {"kind": "train", "step": 3, "loss": float("nan"), "tokens_per_second": 100.0},
            {"kind": "train", "step": 3, "loss": 9.0, "tokens_per_second": 120.0, "mfu": 0.3},
            {"kind": "train", "step": 4, "loss": "n/a", "learning_rate": True},
            {"kind": "benchmark", "step": 3, "hellaswag": 0.25},
            {"kind": "evaluation", "step": 3, "hellaswag/acc": 0.25},
            {"kind": "validation", "step": 3, "val_loss": 9.5}]
    png = tmp_path / "metrics.png"
    figure = chart.draw_metrics_chart(json.loads(json.dumps(rows)), png, grad_clip=1.0)
    assert png.read_bytes()[:8] == PNG_MAGIC
    loss_line = axes_named(figure, "loss").lines[0]
    assert list(loss_line.get_xdata()) == [0, 1, 2, 3, 4]
    assert [str(value) for value in loss_line.get_ydata()] == ["10.9", "nan", "nan", "9.0", "nan"]
    lr_line = axes_named(figure, "learning rate").lines[0]
    assert [str(value) for value in lr_line.get_ydata()] == ["nan", "0.001", "nan", "nan", "nan"]
    assert "no benchmark scores logged" in " ".join(text.get_text() for text in axes_named(figure, "score").texts)

    # Nothing at all: every panel says so.
    figure = chart.draw_metrics_chart([], png)
    assert sum(len(axes.texts) for axes in figure.axes) == 4


def test_rolling_mean_skips_and_keeps_gaps():
    import numpy as np

    values = [1.0, 2.0, math.nan, 4.0, 5.0, 6.0, 7.0]
    means = chart.rolling_mean(np.array(values), 3)
    expected = [1.5, 1.5, math.nan, 4.5, 5.0, 6.0, 6.5]  # neighbours that are numbers
    assert [str(value) for value in means] == [str(value) for value in expected]


def test_redraw_charts_draws_both_or_only_the_loss_chart(tmp_path):
    history = [point(0, 10.9, 10.8, True), point(9, 3.5, 3.6, True)]
    assert chart.redraw_charts(tmp_path, history, 9, 1.0) == ([tmp_path / chart.CHART_FILE], [])
    assert not (tmp_path / chart.METRICS_CHART_FILE).exists()

    write_metrics(tmp_path / "metrics.jsonl", synthetic_metrics(10))
    redrawn = chart.redraw_charts(tmp_path, history, 9, 1.0)
    assert redrawn.files == [tmp_path / chart.CHART_FILE, tmp_path / chart.METRICS_CHART_FILE]
    assert (tmp_path / chart.METRICS_CHART_FILE).read_bytes()[:8] == PNG_MAGIC


def test_the_drawer_draws_the_newest_asked_for_in_the_background(tmp_path, monkeypatch):
    """Training asks at every checkpoint and never waits: asks that come while a drawing
    runs, or within CHART_SECONDS of the last, are replaced by the newest; a line being written past the end asked for is no
    bad line; a chart that can't be drawn is a warning."""
    import threading
    import time

    write_metrics(tmp_path / "metrics.jsonl", synthetic_metrics(10))
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "st')   # training is writing the next row
    warnings, drawn, first_began = [], [], threading.Event()
    real_redraw = chart.redraw_charts

    def slow_redraw(run_dir, history, best_step, grad_clip, metrics_end):
        first_began.set()
        time.sleep(0.2)
        drawn.append([point["global_step"] for point in history])
        return real_redraw(run_dir, history, best_step, grad_clip, metrics_end)

    monkeypatch.setattr(chart, "redraw_charts", slow_redraw)
    monkeypatch.setattr(progress, "CHART_SECONDS", 0.0)
    drawer = ChartDrawer(tmp_path, 1.0, warnings.append)
    history = [point(0, 10.9, 10.8, True)]
    drawer.redraw(history, 0)
    first_began.wait(5)
    for step in (2, 4, 6):
        history.append(point(step, 9.0 - step, 9.0 - step, True))
        drawer.redraw(history, step)
    history.append(point(8, 0.5, 0.5))   # after the last ask: not drawn
    drawer.wait()
    assert drawn == [[0], [0, 2, 4, 6]]
    assert warnings == []
    assert (tmp_path / chart.METRICS_CHART_FILE).read_bytes()[:8] == PNG_MAGIC
    assert drawer.thread is None   # no thread left to keep the process alive

    # At most once every CHART_SECONDS: a short run draws once, at its end.
    drawn.clear()
    monkeypatch.setattr(progress, "CHART_SECONDS", 60.0)
    drawer = ChartDrawer(tmp_path, 1.0, warnings.append)
    for step in (0, 2, 4):
        drawer.redraw(history[:step // 2 + 1], step)
    time.sleep(0.5)
    assert drawn == []
    drawer.wait()
    assert drawn == [[0, 2, 4]]

    monkeypatch.setattr(chart, "redraw_charts", real_redraw)
    (tmp_path / chart.CHART_FILE).unlink()
    (tmp_path / chart.CHART_FILE).mkdir()   # the loss chart can't be written
    drawer.redraw(history, 6)
    drawer.wait()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: the charts in {tmp_path} were not redrawn: ")


def test_command_redraws_both_charts_and_names_a_garbage_line(tmp_path):
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir / "checkpoints", "20250101Z000000-iteration-0", point(0, 9.0, 9.5, True))
    (run_dir / "train.json").write_text(json.dumps({
        "dataset": "toy", "min_train_tokens": 256, "start_train_token": 0, "start_val_token": 0,
        "minibatch_size": 2, "validation_interval": 2, "validation_batches": 3, "grad_clip": 1.0}))
    lines = [json.dumps(row) for row in synthetic_metrics(10)]
    lines.insert(2, '{"kind": "train", "step": 1, "lo')  # line 3: torn by a crash
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = run_script("chart.py", run_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"{run_dir / 'metrics.jsonl'}: line 3 " in result.stderr
    assert result.stdout.splitlines() == [f"wrote {run_dir / chart.CHART_FILE} (1 points)",
                                          f"wrote {run_dir / chart.METRICS_CHART_FILE}"]
    for name in (chart.CHART_FILE, chart.METRICS_CHART_FILE):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_run_grad_clip_comes_from_train_json(tmp_path):
    assert chart.run_grad_clip(tmp_path) is None  # no train.json: no line
    train = {"dataset": "toy", "min_train_tokens": 256, "start_train_token": 0, "start_val_token": 0,
             "minibatch_size": 2, "validation_interval": 2, "validation_batches": 3}
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert chart.run_grad_clip(tmp_path) is None
    (tmp_path / "train.json").write_text(json.dumps({**train, "grad_clip": 0.5}))
    assert chart.run_grad_clip(tmp_path) == 0.5
