"""Runs left alone: the defaults reproduce, `auto` with torchrun --max-restarts picks a run
up after a rank dies, and ranks die with their launcher. Real torchrun, two CPU ranks.

Unlike the other tests, these use what a user gets without "seed" and "dtype" in
train.json: PyTorch's default seed and this machine's default precision (bf16 on a CPU
with native bf16, fp32 elsewhere)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support import checkpointing
from support import devices
from support.config import DEFAULT_SEED
from helpers import (MODEL, PROJECT_ROOT, TRAIN, copy_run_up_to, environment, final_weights, latest,
                     make_run, metrics_rows, pattern_tokens, run_training, torchrun_command, trained)

DROPOUT_MODEL = {**MODEL, "drop_rate": 0.1}
DEFAULTS = {key: value for key, value in TRAIN.items() if key not in ("seed", "dtype")}
DEFAULT_DTYPE = devices.default_dtype_name(torch.device("cpu"))


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, datasets_dir):
    return trained(make_run(tmp_path_factory.mktemp("defaults") / "run", DROPOUT_MODEL, DEFAULTS),
                   datasets_dir)


def test_the_default_seed_is_pytorchs():
    # What every new torch.Generator starts from. (Not what an unseeded process starts
    # from: PyTorch seeds its global generator from the OS, which is why the original
    # scripts' runs did not reproduce.)
    assert DEFAULT_SEED == torch.Generator().initial_seed() == 67280421310721


def test_two_runs_with_the_defaults_end_bitwise_equal(default_run, tmp_path, datasets_dir):
    again = trained(make_run(tmp_path / "again", DROPOUT_MODEL, DEFAULTS), datasets_dir)
    assert_same_weights(final_weights(again), final_weights(default_run))
    meta = latest(default_run).meta
    assert meta["seed"] == DEFAULT_SEED and meta["dtype"] == DEFAULT_DTYPE


def test_resume_with_the_defaults_is_exact(default_run, tmp_path, datasets_dir):
    run_dir = copy_run_up_to(default_run, tmp_path / "resumed", step=2)
    result = run_training(run_dir, datasets_dir, "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "at step 3" in result.stdout
    assert_same_weights(final_weights(run_dir), final_weights(default_run))


def test_auto_with_max_restarts_survives_a_killed_rank(default_run, tmp_path, datasets_dir):
    # This machine's default precision (fp32 or bf16, as the CPU has it); fp32 resumes after
    # a SIGKILL are tested in test_ddp_train.py.
    uninterrupted = default_run
    run_dir = make_run(tmp_path / "restarted", DROPOUT_MODEL, DEFAULTS)
    # Rank 0 is SIGKILLed right after `latest` points at the first checkpoint (step 0);
    # torchrun restarts both ranks with the same command line, and `auto` resumes.
    command = torchrun_command(["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                               run_dir, datasets_dir, "auto")
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                            env=environment({checkpointing.KILL_AT_VARIABLE: "after-latest@0"}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto: no checkpoint yet, starting fresh" in result.stdout
    assert "-iteration-0 at step 1" in result.stdout, result.stdout
    assert_same_weights(final_weights(run_dir), final_weights(uninterrupted))
    assert [point["global_step"] for point in latest(run_dir).meta["history"]] == [0, 2, 3]
    assert metrics_rows(run_dir, comparable=True) == metrics_rows(uninterrupted, comparable=True)


def process_state(pid) -> str | None:
    """The state letter of a process (R, S, Z, ...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children_of(parent) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc (Linux)")
def test_ranks_die_with_their_launcher(tmp_path):
    # A run long enough to be killed mid-way: 400 global steps, checkpoints every 100.
    data = tmp_path / "datasets" / "long"
    data.mkdir(parents=True)
    save_file({"tokens": pattern_tokens(40_000, 0)}, str(data / "train.safetensors"))
    save_file({"tokens": pattern_tokens(1024, 1)}, str(data / "validation.safetensors"))
    run_dir = make_run(tmp_path / "run", MODEL, {**DEFAULTS, "dataset": "long", "min_train_tokens": 400 * 64,
                                                 "validation_interval": 100, "validation_batches": 1})
    launcher = subprocess.Popen(torchrun_command(["--standalone", "--nproc_per_node=2"], run_dir,
                                                 tmp_path / "datasets"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(),
                                cwd=PROJECT_ROOT)
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while latest(run_dir) is None:
            assert launcher.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.05)
        ranks = children_of(launcher.pid)
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 15
        while any(process_state(pid) not in (None, "Z") for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(process_state(pid) in (None, "Z") for pid in ranks), "ranks outlived their launcher"
    finally:
        for pid in [launcher.pid, *ranks]:
            if process_state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
    checkpoint = latest(run_dir)
    assert checkpoint is not None and checkpoint.global_step < 399
    result = run_training(run_dir, tmp_path / "datasets", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert latest(run_dir).global_step == 399
    assert not [entry for entry in (run_dir / "checkpoints").iterdir() if entry.name.startswith(".")]


def test_a_mistake_no_restart_can_fix_is_said_once(tmp_path, datasets_dir):
    # torchrun --max-restarts=2 runs the job three times; the same mistake each time is
    # one line, from the first attempt.
    run_dir = make_run(tmp_path / "run", MODEL, {**TRAIN, "minibatch_size": 0})
    result = run_training(run_dir, datasets_dir, "auto", torchrun_options=["--max-restarts=2"])
    assert result.returncode == 1
    mistakes = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert mistakes == [f"Error: {run_dir / 'train.json'}: key 'minibatch_size' must be an integer >= 1, got 0"]
    assert "attempt_2" in result.stderr   # three attempts, as torchrun was told
