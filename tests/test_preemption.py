"""SIGTERM, as a preempted machine, `scancel`, `docker stop` or Kubernetes send it, to a
real 2-rank torchrun job: every rank finishes its step, rank 0 writes a resume point
there, the job stops saying so in one line, and `auto` then ends bit for bit as the
uninterrupted run (support/preemption.py). A second SIGTERM ends it at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import (MODEL, PROJECT_ROOT, TRAIN, environment, final_weights, latest, make_run, metrics_rows,
                     pattern_tokens, run_training, torchrun_command, trained)
from support import checkpointing
from support.preemption import PREEMPTED_EXIT_CODE

# 2 ranks x 2 sequences x 16 tokens = 64 tokens a step: 120 steps, checkpoints at 0, 100 and
# 119; the SIGTERM comes right after the first. Dropout, so that generators matter.
LONG = {**TRAIN, "dataset": "long", "min_train_tokens": 64 * 120, "validation_interval": 100}
DROPOUT_MODEL = {**MODEL, "drop_rate": 0.1}


@pytest.fixture(scope="module")
def long_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    (root / "long").mkdir()
    save_file({"tokens": pattern_tokens(64 * 130, 0)}, str(root / "long" / "train.safetensors"))
    save_file({"tokens": pattern_tokens(512, 1)}, str(root / "long" / "validation.safetensors"))
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, long_datasets):
    return trained(make_run(tmp_path_factory.mktemp("uninterrupted") / "run", DROPOUT_MODEL, LONG), long_datasets)


def start_training(run_dir, datasets_dir):
    command = torchrun_command(["--standalone", "--nproc_per_node=2"], run_dir, datasets_dir, "auto")
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for_the_first_checkpoint(run_dir, process):
    deadline = time.monotonic() + 120
    while latest(run_dir) is None:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)


def ranks_of(process):
    """The pids of the torchrun launcher's two ranks."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == process.pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return children


@pytest.mark.parametrize("whom", ["launcher", "one rank"])
def test_sigterm_then_auto_ends_as_the_uninterrupted_run(whom, uninterrupted, tmp_path, long_datasets):
    run_dir = make_run(tmp_path / "run", DROPOUT_MODEL, LONG)
    process = start_training(run_dir, long_datasets)
    wait_for_the_first_checkpoint(run_dir, process)
    if whom == "launcher":
        process.send_signal(signal.SIGTERM)          # torchrun forwards it to every rank
    else:
        os.kill(max(ranks_of(process)), signal.SIGTERM)   # rank 1 alone: the others learn of it
    _, stderr = process.communicate(timeout=120)
    # One line from us (global rank 0's), whatever torchrun adds around it.
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert len(lines) == 1, stderr[-3000:]
    point = latest(run_dir)
    assert point.meta["preempted"] and 0 < point.global_step < 100, lines
    assert f"(resume point {point.name} written); resume with: uv run torchrun --nproc_per_node=2 " in lines[0]
    if whom == "one rank":   # torchrun's summary shows the ranks' exit code; signalled, it has none
        assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in stderr
    # A resume point is never best, and has no validation of its own.
    assert checkpointing.link_target(run_dir / "checkpoints", "best").global_step == 0
    assert point.meta["val_loss"] is None and point.meta["history"][-1]["global_step"] == 0

    result = run_training(run_dir, long_datasets, "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {point.name} at step {point.global_step + 1}" in result.stdout
    for key, tensor in final_weights(uninterrupted).items():
        assert torch.equal(final_weights(run_dir)[key], tensor), key
    assert metrics_rows(run_dir, comparable=True) == metrics_rows(uninterrupted, comparable=True)
    assert latest(run_dir).meta["history"] == latest(uninterrupted).meta["history"]


def test_when_the_grace_period_runs_out_the_job_ends_at_once(tmp_path, long_datasets):
    # A grace period too short for a step: the complete checkpoint of step 0 is what is left.
    run_dir = make_run(tmp_path / "run", DROPOUT_MODEL, {**LONG, "preemption_grace_seconds": 0.001})
    process = start_training(run_dir, long_datasets)
    wait_for_the_first_checkpoint(run_dir, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert [c.global_step for c in checkpointing.list_checkpoints(run_dir / "checkpoints")] == [0]
    assert latest(run_dir).global_step == 0


SIGNALLED_TWICE = """
import os, signal, sys, time
import torch
from support.preemption import Preemption
preemption = Preemption(torch.device("cpu"), grace_seconds=60)
preemption.install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
assert preemption.requested
print("asked once, still here", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
print("still here after the second", flush=True)
"""


def test_a_second_sigterm_ends_the_process_at_once():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SIGNALLED_TWICE], cwd=PROJECT_ROOT, env=environment(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr
    assert result.stdout == "asked once, still here\n" and time.monotonic() - started < 20
