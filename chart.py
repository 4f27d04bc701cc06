"""Redraw a run's charts by hand (training redraws them after every checkpoint).

    uv run python chart.py RUN_DIR

Writes RUN_DIR/big-training-run-chart.png from RUN_DIR/checkpoints and, when
RUN_DIR/metrics.jsonl exists, RUN_DIR/training-metrics-chart.png from it. A run the
original scripts trained has no metrics.jsonl, and so gets the loss chart alone.
The drawing is support/charts.py.
"""

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(run_dir):
    """Redraw RUN_DIR's charts: big-training-run-chart.png from RUN_DIR/checkpoints and,
    when RUN_DIR/metrics.jsonl exists, training-metrics-chart.png from it."""
    # Imported here: --help answers before matplotlib and torch load.
    from support.charts import CHART_FILE, bad_lines_warning, chart_points, redraw_charts, run_grad_clip
    from support.metrics import METRICS_FILE

    try:
        grad_clip = run_grad_clip(run_dir)
    except click.ClickException as error:
        click.echo(f"warning: {error.format_message()}; drawing without the clip threshold", err=True)
        grad_clip = None
    points, best_step = chart_points(run_dir / "checkpoints")
    redrawn = redraw_charts(run_dir, points, best_step, grad_clip)
    if redrawn.bad_metrics_lines:
        click.echo(bad_lines_warning(run_dir / METRICS_FILE, redrawn.bad_metrics_lines), err=True)
    if not redrawn.files:
        raise click.ClickException(f"{run_dir / 'checkpoints'}: no complete checkpoints to chart "
                                   f"(and no rows in {run_dir / METRICS_FILE})")
    if not points:
        # A run stopped before its first checkpoint still shows its steps so far.
        click.echo(f"warning: {run_dir / 'checkpoints'}: no complete checkpoints; "
                   f"{CHART_FILE} not drawn", err=True)
    for path in redrawn.files:
        print(f"wrote {path}" + (f" ({len(points)} points)" if path.name == CHART_FILE else ""))


if __name__ == "__main__":
    main()
