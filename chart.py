"""The loss chart: train and validation loss against global step, best step marked.

ddp_train.py redraws runs/RUN/big-training-run-chart.png after every checkpoint.
To redraw it by hand (for a run the original scripts trained, say):

    uv run python chart.py RUN_DIR

Headless (matplotlib's Agg canvas, no display needed). xkcd style, as the original,
when an xkcd font is installed (setup_lambda.sh installs one); plain otherwise,
because xkcd mode without its font only produces warnings and a fallback font.
"""

from pathlib import Path

import click

import safe_files

CHART_FILE = "big-training-run-chart.png"
XKCD_FONTS = ("xkcd", "xkcd Script", "Humor Sans")


def xkcd_font_installed() -> bool:
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return any(name in installed for name in XKCD_FONTS)


def draw_loss_chart(points, best_step, png_path):
    """Plot points ({global_step, train_loss, val_loss} dicts) to png_path, atomically;
    returns the matplotlib Figure.

    best_step (or None) gets a dashed vertical line. The image is written to a hidden
    temporary file and renamed, so a crash never leaves a truncated PNG behind.
    """
    # matplotlib is imported here, not at the top: only global rank 0 ever draws, and
    # the import costs every other rank a second of start-up.
    import contextlib

    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    points = sorted(points, key=lambda point: point["global_step"])
    steps = [point["global_step"] for point in points]
    marker = {"marker": "o", "markersize": 3} if len(points) <= 100 else {}
    # plt.xkcd() only sets rcParams; the figure is drawn on an Agg canvas of its own,
    # never through pyplot's window machinery, so no display is needed.
    with plt.xkcd() if xkcd_font_installed() else contextlib.nullcontext():
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


def chart_points(checkpoints_dir):
    """The points and best step to draw for a run's checkpoints directory: the history
    `latest` carries (or, for the original scripts' runs, every checkpoint's)."""
    # Imported here, not at the top: checkpointing imports torch, which takes seconds,
    # and `chart.py --help` should answer at once.
    import checkpointing

    points = checkpointing.run_history(checkpoints_dir)
    best = checkpointing.link_target(checkpoints_dir, "best")
    best_steps = {point["global_step"] for point in points}
    best_step = best.global_step if best is not None and best.global_step in best_steps else None
    return points, best_step


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def main(run_dir):
    """Redraw RUN_DIR/big-training-run-chart.png from RUN_DIR/checkpoints."""
    points, best_step = chart_points(run_dir / "checkpoints")
    if not points:
        raise click.ClickException(f"{run_dir / 'checkpoints'}: no complete checkpoints to chart")
    draw_loss_chart(points, best_step, run_dir / CHART_FILE)
    print(f"wrote {run_dir / CHART_FILE} ({len(points)} points)")


if __name__ == "__main__":
    main()
