"""Run every benchmark, one after the other, each in its own process.

    uv run python bench/run_all.py [--quick]

--quick shrinks the work (fewer timed steps and new tokens, a smaller corpus and token
file); the 163M training step is still slow on a CPU. The defaults are the sizes the
README's performance section describes.
"""

import subprocess
import sys
from pathlib import Path

import click

BENCH = Path(__file__).resolve().parent

FULL = [
    ["bench_train_step.py"],
    ["bench_generate.py"],
    ["bench_data.py"],
    ["bench_memory.py"],
    ["bench_moe.py"],
    ["bench_health_check.py"],
]
QUICK = [
    ["bench_train_step.py", "--repeats", "2"],
    ["bench_generate.py", "--new-tokens", "64", "--batch-sizes", "1"],
    ["bench_data.py", "--tokens", "2", "--big-tokens", "0", "--token-file-gb", "0.2"],
    ["bench_memory.py", "--emb-dim", "256", "--n-layers", "4"],
    ["bench_moe.py", "--sizes", "256x8x2", "--tokens", "1024", "--repeats", "2"],
    ["bench_health_check.py", "--emb-dim", "256", "--n-layers", "4", "--repeats", "3"],
]


@click.command()
@click.option("--quick", is_flag=True, help="Smaller sizes, for a quick look.")
def main(quick):
    failed = []
    for script, *arguments in QUICK if quick else FULL:
        print(f"\n=== {script} {' '.join(arguments)}", flush=True)
        if subprocess.run([sys.executable, str(BENCH / script), *arguments]).returncode != 0:
            failed.append(script)
    if failed:
        raise click.ClickException(f"benchmark(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
