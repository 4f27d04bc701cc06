"""train.json's benchmark_tasks: lm-eval really scoring checkpoints during a real 2-rank
torchrun run, offline, on the local task tiny_choice (tests/data/lm_eval_tasks).

One run with benchmarks is compared with the same run without them (bit for bit: the
scoring must not touch training, its generators included) and its scores with what
test_benchmarks.py, run as users run it, gives on the same saved checkpoint. A resume
drops the benchmark rows past its checkpoint; mistakes in the benchmark keys are one line
before anything is written. (test_benchmarks.py's own scores are checked against an
independent computation in test_test_benchmarks.py.)
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.benchmark_scores import main_metric, task_scores
from support.config import validate_train_config
from support.metrics import METRICS_FILE, open_sinks_on_main_rank

import helpers
from helpers import (PROJECT_ROOT, copy_run_up_to, environment, final_weights, make_run, metrics_rows,
                     run_training, torchrun_command)

TASKS_DIR = PROJECT_ROOT / "tests" / "data" / "lm_eval_tasks"
# GPT-2's vocabulary (the tasks are text), everything else tiny; dropout, so that a
# generator disturbed by the scoring changes the losses that follow.
MODEL = {**helpers.MODEL, "vocab_size": 50257, "emb_dim": 16, "drop_rate": 0.1}
# 2 ranks x 2 sequences x 16 tokens = 64 tokens a step: 6 steps, checkpoints at 0, 2, 4
# and 5, benchmarks at 0 and 4 (multiples of 4) and 5 (the last step).
TRAIN = {key: value for key, value in helpers.TRAIN.items() if key not in (
    "warmup_steps", "lr_schedule", "min_learning_rate", "grad_clip")} | {"min_train_tokens": 384, "validation_batches": 2}
LIMIT = 5  # of tiny_choice's 12 examples


def benchmark_keys(run_dir):
    # Relative to the run directory, as train.json's paths are.
    return {"benchmark_tasks": ["tiny_choice"], "benchmark_interval": 4, "benchmark_limit": LIMIT,
            "benchmark_include_path": os.path.relpath(TASKS_DIR, run_dir)}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The tests are offline, with a Hugging Face cache of their own."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(tmp_path_factory.mktemp("hf-home"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, datasets_dir, offline):
    """The run with benchmarks and the same run without them (its every process logging
    its imports: -X importtime), both at once: while rank 0 of the first scores, its
    other rank waits, and the second run has that core."""
    bench_dir = tmp_path_factory.mktemp("bench") / "run"
    make_run(bench_dir, MODEL, {**TRAIN, **benchmark_keys(bench_dir)})
    plain_dir = make_run(tmp_path_factory.mktemp("plain") / "run", MODEL, TRAIN)
    started = []
    for run_dir, env in ((bench_dir, offline), (plain_dir, {"PYTHONPROFILEIMPORTTIME": "1"})):
        # Output to files: a full pipe would stop a run until the other one ends.
        with open(run_dir.parent / "stdout", "w") as stdout, open(run_dir.parent / "stderr", "w") as stderr:
            started.append(subprocess.Popen(torchrun_command(["--standalone", "--nproc_per_node=2"], run_dir,
                                                             datasets_dir),
                                            stdout=stdout, stderr=stderr, env=environment(env), cwd=PROJECT_ROOT))
    try:
        for process in started:
            process.wait(timeout=300)
    finally:
        for process in started:
            if process.poll() is None:   # a run that hung: not left behind
                process.kill()
                process.wait()
    results = []
    for process, run_dir in zip(started, (bench_dir, plain_dir)):
        stdout, stderr = ((run_dir.parent / name).read_text() for name in ("stdout", "stderr"))
        assert process.returncode == 0, stderr[-3000:]
        results.append((run_dir, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)))
    return results


@pytest.fixture(scope="module")
def bench_run(runs):
    return runs[0]


@pytest.fixture(scope="module")
def plain_run(runs):
    return runs[1]


def benchmark_rows(run_dir):
    return [row for row in metrics_rows(run_dir) if row["kind"] == "benchmark"]


def test_benchmark_rows_lines_and_chart(bench_run):
    from matplotlib.image import imread

    run_dir, result = bench_run
    rows = metrics_rows(run_dir)
    assert [(row["kind"], row["step"]) for row in rows if row["kind"] != "train"] == [
        ("validation", 0), ("benchmark", 0), ("validation", 2), ("validation", 4), ("benchmark", 4),
        ("validation", 5), ("benchmark", 5)]
    checkpoints = {row["step"]: row["checkpoint"] for row in rows if row["kind"] == "validation"}
    for row in benchmark_rows(run_dir):
        assert row["checkpoint"] == checkpoints[row["step"]]
        assert row["tasks"] == ["tiny_choice"] and row["limit"] == LIMIT and row["seconds"] > 0
        assert {key for key in row if "/" in key} == {
            f"tiny_choice/{metric}{stderr}" for metric in ("acc", "acc_norm", "acc_bytes")
            for stderr in ("", "_stderr")}
        # One line each above the progress bar, with the main score and the time taken.
        value, stderr = row["tiny_choice/acc_norm"], row["tiny_choice/acc_norm_stderr"]
        assert (f"step {row['step']}: benchmarks tiny_choice acc_norm {value:.4f} ± {stderr:.4f} "
                f"(first {LIMIT} examples of each task; {row['seconds']:.1f} s)") in result.stdout
    assert "lm-eval tiny_choice every 4 steps and at the last, 5 examples each" in result.stdout
    # lm-eval's and transformers' progress bars and notes, scoring, don't tear through the
    # training's (loading the tasks at start-up, datasets may show theirs).
    assert "loglikelihood" not in result.stderr and "Loading weights" not in result.stderr, result.stderr
    # The metrics chart has the benchmark panel: 2.5 inches taller.
    assert imread(run_dir / "training-metrics-chart.png").shape[:2] == (1250, 1200)


def test_training_is_bit_for_bit_the_same_without_benchmarks(bench_run, plain_run):
    run_dir, _ = bench_run
    plain_run, result = plain_run
    with_benchmarks = [row for row in metrics_rows(run_dir, comparable=True) if row["kind"] != "benchmark"]
    assert with_benchmarks == metrics_rows(plain_run, comparable=True)   # every loss, exactly
    ours, theirs = final_weights(run_dir), final_weights(plain_run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_without_benchmarks_lm_eval_is_never_imported(plain_run):
    _, result = plain_run
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "torch" in imported   # the log is there
    assert not imported & {"lm_eval", "transformers", "accelerate"}


def test_scores_equal_test_benchmarks_on_the_saved_checkpoint(bench_run, offline, tmp_path):
    run_dir, _ = bench_run
    [*_, last] = benchmark_rows(run_dir)
    output = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "test_benchmarks.py", str(run_dir / "model.json"),
         str(run_dir / "checkpoints" / last["checkpoint"] / "model.safetensors"), "--tasks", "tiny_choice",
         "--include-path", str(TASKS_DIR), "--limit", str(LIMIT), "--device", "cpu", "--dtype", "fp32",
         "--batch-size", str(TRAIN["minibatch_size"]), "--output", str(output)],
        cwd=PROJECT_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **offline}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(output.read_text())["results"]["tiny_choice"]
    assert {key: value for key, value in last.items() if "/" in key} == {
        f"tiny_choice/{key.removesuffix(',none')}": value for key, value in scored.items() if "," in key}


def test_a_resume_drops_the_benchmark_rows_past_its_checkpoint(bench_run, datasets_dir, tmp_path):
    # Resumed from step 2 with the benchmarks switched off: the rows of 4 and 5 go, the
    # one of step 0 stays, and training goes on as the benchmarked run did.
    run_dir, _ = bench_run
    resumed = copy_run_up_to(run_dir, tmp_path / "resumed", step=2, train=TRAIN)
    result = run_training(resumed, datasets_dir, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in benchmark_rows(resumed)] == [0]
    assert metrics_rows(resumed, comparable=True) == [
        row for row in metrics_rows(run_dir, comparable=True) if row["kind"] != "benchmark" or row["step"] <= 2]


class Sinks:
    """Rows to every sink, as training's StepMetrics hands them."""

    def __init__(self, sinks):
        self.sinks = sinks

    def write(self, row):
        for sink in self.sinks:
            sink.write(row)
            sink.flush(durable=True)

    def close(self):
        for sink in self.sinks:
            sink.close()


def test_benchmark_rows_through_the_log_rewind_rebuild_and_tensorboard(tmp_path):
    """The metrics file and sinks in this process: a resume keeps the benchmark row of its checkpoint and
    drops later ones; a garbage line costs that line, not the benchmark rows; scores go to
    TensorBoard as benchmark/TASK/METRIC."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def row(kind, step, **values):
        return {"kind": kind, "step": step, **values}

    bench = {"checkpoint": "c", "tasks": ["tiny_choice"], "limit": 5, "seconds": 1.0,
             "tiny_choice/acc": 0.4, "tiny_choice/acc_stderr": 0.2}
    rows = [row("train", 0, loss=5.0, elapsed_seconds=1.0), row("validation", 0, val_loss=5.0, checkpoint="c"),
            row("benchmark", 0, **bench), row("train", 2, loss=4.0, elapsed_seconds=2.0),
            row("validation", 2, val_loss=4.0, checkpoint="d"), row("benchmark", 2, **bench)]
    history = [{"global_step": 0, "train_loss": 5.0, "val_loss": 5.0, "is_best": True},
               {"global_step": 2, "train_loss": 4.0, "val_loss": 4.0, "is_best": True}]
    config = validate_train_config({"dataset": "toy", "min_train_tokens": 1, "start_train_token": 0,
                                    "start_val_token": 0, "minibatch_size": 1, "validation_interval": 2,
                                    "validation_batches": 1, "tensorboard": True})

    def open_log(resume_step, text):
        (tmp_path / METRICS_FILE).write_text(text)
        checkpoint = type("Checkpoint", (), {"global_step": resume_step, "name": "c"})
        training = type("Training", (), {"config": config, "run_dir": tmp_path, "resumed_from": checkpoint,
                                         "history": history[:resume_step // 2 + 1], "model_config": MODEL})
        sinks, notes, _ = open_sinks_on_main_rank(training, {0: "c", 2: "d"})
        return Sinks(sinks), notes

    lines = "".join(json.dumps(line) + "\n" for line in rows)
    log, _ = open_log(0, lines)
    log.close()
    assert metrics_rows(tmp_path) == rows[:3]

    # A torn last line costs that line only (tests/test_metrics.py); garbage inside the
    # file costs its own line, every readable row (benchmark rows too) is kept.
    middle = lines.index("\n") + 1
    log, notes = open_log(2, lines[:middle] + "{garbage\n" + lines[middle:])
    assert "is not a metrics row" in notes[0]
    log.write(row("benchmark", 4, **bench))
    log.close()
    assert metrics_rows(tmp_path) == rows + [row("benchmark", 4, **bench)]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("benchmark/tiny_choice/acc")] == [
        (4, pytest.approx(0.4))]


def test_a_failed_scoring_is_a_warning_and_puts_the_generators_back(monkeypatch, tmp_path):
    import random

    import numpy

    from support import benchmark_scores

    def out_of_memory(*arguments):
        torch.manual_seed(1234)   # as simple_evaluate seeds, then fails
        random.seed(0)
        numpy.random.seed(1234)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(benchmark_scores, "load_exported_model", out_of_memory)
    config = validate_train_config({"dataset": "toy", "min_train_tokens": 1, "start_train_token": 0,
                                    "start_val_token": 0, "minibatch_size": 2, "validation_interval": 2,
                                    "validation_batches": 1, "benchmark_tasks": ["tiny_choice"],
                                    "benchmark_interval": 4})
    benchmarks = benchmark_scores.InTrainingBenchmarks(config, tmp_path, MODEL, torch.device("cpu"), "fp32")
    assert [benchmarks.due(step, last_step=step == 5) for step in range(6)] == [True, False, False, False, True, True]

    def seed():
        torch.manual_seed(7)
        random.seed(5)
        numpy.random.seed(5)

    def draws():
        return torch.rand(3).tolist(), random.random(), numpy.random.random()

    said = []
    with benchmark_scores.kept_random_states(torch.device("cpu")):   # this process's, for the tests after
        seed()
        expected = draws()
        seed()
        benchmarks.score(4, "NAME", {}, metrics=None, say=said.append)
        assert draws() == expected
    [line] = said
    assert line.startswith("warning: benchmarks at step 4 failed after ") and line.endswith(
        " s (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB); training goes on")


def test_importing_benchmark_scores_imports_nothing_heavy():
    # chart.py imports it to read the rows, ddp_train.py with or without benchmarks.
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "from support import benchmark_scores"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "support" in imported
    assert not imported & {"torch", "numpy", "lm_eval", "transformers", "datasets", "matplotlib"}


def test_reading_scores_back():
    row = {"kind": "benchmark", "step": 3, "tasks": ["gsm8k", "hellaswag"], "hellaswag/acc": 0.3,
           "hellaswag/acc_stderr": 0.02, "hellaswag/acc_norm": 0.31, "hellaswag_other/acc": 0.9,
           "gsm8k/exact_match/strict-match": 0.05, "gsm8k/exact_match_stderr/strict-match": 0.01}
    assert task_scores(row, "hellaswag") == {"acc": (0.3, 0.02), "acc_norm": (0.31, None)}
    assert task_scores(row, "gsm8k") == {"exact_match/strict-match": (0.05, 0.01)}
    assert main_metric(["acc", "acc_norm"]) == "acc_norm" and main_metric(["perplexity", "acc"]) == "acc"
    assert main_metric(["exact_match/strict-match"]) == "exact_match/strict-match" and main_metric([]) is None


# --- mistakes: one line each, before anything is written ---

def files_in(directory):
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(directory).rglob("*")) if path.is_file()}


BAD_BENCHMARKS = {
    "unknown task": ({"benchmark_tasks": ["tiny_choice", "no_such_task"]}, MODEL,
                     "key 'benchmark_tasks': unknown task 'no_such_task': not among lm-eval's tasks"),
    "interval between checkpoints": ({"benchmark_interval": 3}, MODEL,
                                     "key 'benchmark_interval' must be a multiple of 'validation_interval' (2)"),
    "no include directory": ({"benchmark_include_path": "nowhere"}, MODEL,
                             "key 'benchmark_include_path' \"nowhere\""),
    "vocabulary too small": ({}, {**MODEL, "vocab_size": 64}, "model.json: vocab_size 64 is smaller than GPT-2's 50257"),
    "mixture of experts": ({}, {**MODEL, "moe": {"num_experts": 4, "num_active_experts": 2}},
                           "key 'benchmark_tasks' is set, but {run_dir}/model.json: key 'moe': a "
                           "mixture-of-experts model has no transformers equivalent"),
}


@pytest.mark.parametrize("case", BAD_BENCHMARKS)
def test_bad_benchmark_settings_are_one_line_and_write_nothing(case, tmp_path, datasets_dir):
    change, model, message = BAD_BENCHMARKS[case]
    run_dir = tmp_path / "run"
    make_run(run_dir, model, {**TRAIN, **benchmark_keys(run_dir), **change})
    before = files_in(run_dir)
    result = run_training(run_dir, datasets_dir, nproc=None)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    message = message.format(run_dir=run_dir)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {run_dir / 'train.json'}: ") and message in lines[0], \
        result.stderr
    if case == "no include directory":
        assert lines[0].endswith(f"({run_dir / 'nowhere'}): no such directory")
    assert files_in(run_dir) == before and sorted(os.listdir(run_dir)) == ["model.json", "train.json"]
