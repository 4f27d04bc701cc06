"""Faults a user meets in ddp_train.py end in one true line with nothing lost: a second
trainer in the same run directory, token ids the model can't embed, Ctrl-C, and what
torchrun shows around the line. Real processes, real files."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from support.command_line import relaunch_command
from helpers import (PROJECT_ROOT, SCRIPT, TRAIN, environment, latest, make_run, one_line_error,
                     pattern_tokens, run_training)
from support.token_data import DatasetError, load_dataset


def long_dataset(root, name="long", bad_token_at=None):
    """A train split long enough for a run that lasts a while; optionally one token id
    (65535 in uint16) that no model of vocab_size 64 can embed."""
    directory = root / name
    directory.mkdir(parents=True)
    tokens = pattern_tokens(40_000, 0)
    if bad_token_at is not None:
        tokens[bad_token_at] = 65535
    save_file({"tokens": tokens}, str(directory / "train.safetensors"))
    save_file({"tokens": pattern_tokens(1024, 1)}, str(directory / "validation.safetensors"))
    return root


def snapshot(directory):
    return sorted((str(path.relative_to(directory)), path.stat().st_size if path.is_file() else None)
                  for path in directory.rglob("*") if not path.is_symlink())


def started_long_run(tmp_path, **pipes):
    """A plain one-process run of 150 global steps (checkpoints at 0 and 100, then the
    last), returned once its first checkpoint is written: (process, run_dir, datasets)."""
    datasets = long_dataset(tmp_path / "datasets")
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "dataset": "long", "min_train_tokens": 150 * 32,
                                                "validation_interval": 100, "validation_batches": 1})
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(datasets), "--device", "cpu"],
                               cwd=PROJECT_ROOT, env=environment(), text=True,
                               **{"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **pipes})
    deadline = time.monotonic() + 120
    while latest(run_dir) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("no first checkpoint")
        time.sleep(0.05)
    return process, run_dir, datasets


def test_a_second_trainer_in_the_same_run_stops_before_writing(tmp_path):
    first, run_dir, datasets = started_long_run(tmp_path)
    try:
        first.send_signal(signal.SIGSTOP)  # hold it still while the second one tries
        before = snapshot(run_dir / "checkpoints")
        second = run_training(run_dir, datasets, "latest", nproc=None)
        one_line_error(second, str(run_dir), f"pid {first.pid} on ", "started ", "is being trained by")
        assert snapshot(run_dir / "checkpoints") == before
        first.send_signal(signal.SIGCONT)
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the lock with the process: the run resumes.
    resumed = run_training(run_dir, datasets, "latest", nproc=None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert latest(run_dir).global_step == 149


def test_token_ids_past_the_vocabulary_stop_the_run_at_start_up(tmp_path):
    datasets = long_dataset(tmp_path / "datasets", bad_token_at=5 * 32 + 7)  # batch 5, position 7
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "dataset": "long"})
    result = run_training(run_dir, datasets, nproc=None)
    one_line_error(result, "train.safetensors: batch 5", "token id 65535 at position 7",
                   "vocabulary of 64")
    assert not (run_dir / "checkpoints").exists()


def test_under_torchrun_our_line_is_the_root_cause_and_the_other_rank_is_quiet(tmp_path):
    datasets = long_dataset(tmp_path / "datasets", bad_token_at=3 * 32 + 5)
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "dataset": "long"})
    result = run_training(run_dir, datasets)
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if "token id 65535" in line]
    # Our line once from rank 0, then once more as the root cause of torchrun's summary.
    assert ours[0].startswith("Error: ") and "train.safetensors: batch 3" in ours[0]
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "token id 65535" in summary
    # No rank printed a traceback (torchrun prefixes those with [rankN]:), and rank 1,
    # which only heard of the failure, said nothing.
    assert "[rank0]:" not in result.stderr and "[rank1]:" not in result.stderr


def test_each_batch_is_checked_as_it_is_read(tmp_path):
    tokens = torch.arange(1 + 4 * 2 * 8, dtype=torch.int32) % 50
    tokens[2 * 16 + 3] = -1  # batch 2, position 3
    save_file({"tokens": tokens}, str(tmp_path / "train.safetensors"))
    batches = load_dataset(tmp_path, "train", -1, 0, 1, 2, 8, vocab_size=50)
    batches[0], batches[1]
    with pytest.raises(DatasetError, match=r"batch 2: token id -1 at position 3 is outside .* of 50"):
        batches[2]


def test_ctrl_c_says_how_to_resume_with_the_command_that_was_run(tmp_path):
    process, run_dir, datasets = started_long_run(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    hint = f"interrupted: resume from the newest checkpoint with: uv run python ddp_train.py {run_dir} {datasets} auto --device cpu"
    assert hint in stderr.splitlines()   # one line
    assert "\r" not in stderr  # no progress bar when stderr is a pipe: plain lines


def test_the_resume_command_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert relaunch_command(["ddp_train.py", "my run", "data", "auto"]) == \
        "uv run torchrun --nnodes=2 --nproc_per_node=8 ddp_train.py 'my run' data auto"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert relaunch_command(["ddp_train.py", "r", "d", "auto"]) == "uv run python ddp_train.py r d auto"
