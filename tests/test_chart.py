"""The loss chart: drawn headless, atomically, from our checkpoints or the original scripts'."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import chart

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
    result = CliRunner().invoke(chart.main, [str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / chart.CHART_FILE).read_bytes()[:8] == PNG_MAGIC

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    result = CliRunner().invoke(chart.main, [str(empty)])
    assert result.exit_code == 1
    assert "no complete checkpoints" in result.output


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


def test_xkcd_style_when_the_font_is_installed(tmp_path, humor_sans_font, recwarn):
    import matplotlib

    assert chart.xkcd_font_installed()
    png = tmp_path / "chart.png"
    figure = chart.draw_loss_chart([point(0, 9.0, 9.5, True), point(10, 8.0, 8.5)], 0, png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert figure.axes[0].lines[0].get_sketch_params() is not None  # hand-drawn wobble
    assert matplotlib.rcParams["path.sketch"] is None  # and the style did not leak out
    assert not [w for w in recwarn if "findfont" in str(w.message)]


def test_plain_style_without_the_font(tmp_path, no_xkcd_font, recwarn):
    assert not chart.xkcd_font_installed()
    figure = chart.draw_loss_chart([point(0, 9.0, 9.5, True), point(10, 8.0, 8.5)], 0,
                                   tmp_path / "chart.png")
    assert figure.axes[0].lines[0].get_sketch_params() is None
    assert not [w for w in recwarn if "findfont" in str(w.message)]
