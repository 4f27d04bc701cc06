"""ddp_train.py --preflight and -f/--find-max-microbatch-size (preflight.py) under a real
2-rank torchrun on CPU: the numbers they print are there and add up, they exit 0, and
the run directory is exactly as it was, down to the directories' modification times."""

import math
import os
import re
from pathlib import Path

import pytest
import torch

from support import checkpointing
from gpt import GPTModel
from support.preflight import INJECT_OOM_VARIABLE, extrapolated_growth, microbatch_advice

from helpers import MODEL, SCRIPT, TRAIN, make_run, run_script, run_training

TOKENS_PER_STEP = 2 * TRAIN["minibatch_size"] * MODEL["context_length"]   # 2 ranks: 64


def snapshot(directory):
    """Every entry under directory (itself included): its kind, its bytes or link target,
    and its modification time, so that even a file created and removed again shows."""
    state = {}
    for path in [Path(directory), *sorted(Path(directory).rglob("*"))]:
        key, info = str(path.relative_to(directory)), os.lstat(path)
        if path.is_symlink():
            state[key] = ("link", os.readlink(path), info.st_mtime_ns)
        elif path.is_dir():
            state[key] = ("dir", info.st_mtime_ns)
        else:
            state[key] = ("file", path.read_bytes(), info.st_mtime_ns)
    return state


def write_checkpoint(run_dir, step):
    """A real checkpoint (checkpointing.save_checkpoint) of the tiny model after an AdamW
    step, as a 2-rank run would have written it at global step `step`."""
    torch.manual_seed(0)
    model = GPTModel(MODEL)
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = torch.randint(0, MODEL["vocab_size"], (2, MODEL["context_length"]))
    model(inputs, targets=inputs).backward()
    optimizer.step()
    history = [{"global_step": step, "train_loss": 4.0, "val_loss": 4.1, "is_best": True}]
    meta = {"global_step": step, "train_loss": 4.0, "val_loss": 4.1, "is_best": True, "history": history,
            "learning_rate": 0.01, "grad_norm": None, "tokens_seen": (step + 1) * TOKENS_PER_STEP, "world_size": 2,
            "gradient_accumulation_steps": 1, "minibatch_size": TRAIN["minibatch_size"],
            "context_length": MODEL["context_length"], "dtype": "fp32", "seed": TRAIN["seed"],
            "parallelism": "ddp", "activation_checkpointing": False}
    return checkpointing.save_checkpoint(
        Path(run_dir) / "checkpoints", model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
        scaler_state={}, rng_state={"world_size": 2, "cpu": [torch.get_rng_state()] * 2}, meta=meta,
        model_config=MODEL)


def number(text):
    return float(text.replace(",", ""))


def test_preflight_of_a_resumed_run_reports_speed_and_duration_and_writes_nothing(tmp_path, datasets_dir):
    # 512 tokens: 8 global steps of 64; resuming the checkpoint of step 2 leaves 5. With a
    # logger on, which a training run would start in the run directory.
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "min_train_tokens": 512, "tensorboard": True})
    checkpoint = write_checkpoint(run_dir, step=2)
    # What an interrupted save leaves: a real run's rank 0 clears it away, a preflight must not.
    leftover = run_dir / "checkpoints" / f"{checkpointing.PARTIAL_PREFIX}20250101Z000000-iteration-5"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    before = snapshot(run_dir)

    result = run_training(run_dir, datasets_dir, checkpoint.name, "--preflight", "--preflight-steps", "2",
                          "--deadline", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert snapshot(run_dir) == before
    output = result.stdout

    rows = re.findall(r"^\s*(\d)\s+\S+\s+cpu\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+) (bytes|kB|MB|GB) RSS\s+([\d.]+)$",
                      output, re.MULTILINE)
    assert [row[0] for row in rows] == ["0", "1"], output
    for _, tokens_per_second, mfu, memory, unit, loss in rows:
        assert number(tokens_per_second) > 0 and 0 < float(mfu) < 100
        assert float(memory) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit] > 50e6  # torch alone takes more
        assert 0 < float(loss) < 2 * math.log(MODEL["vocab_size"])
    assert "tokens/s" in output and "MFU is against" in output

    everyone = re.search(r"all 2 rank\(s\): ([\d,]+) tokens/s, ([\d.,]+) global steps/s", output)
    tokens_per_second, steps_per_second = number(everyone[1]), number(everyone[2])
    assert tokens_per_second == pytest.approx(steps_per_second * TOKENS_PER_STEP, rel=1e-3, abs=1)
    # Ranks step in lockstep: the job's speed is at most the sum of the ranks' own.
    assert tokens_per_second <= sum(number(row[1]) for row in rows) * 1.01 + 1

    whole_run = re.search(r"the whole run: (\d+) of (\d+) global steps left \(from step 3, resuming (\S+)\) "
                          r"take [\d:]+ at this speed \(([\d.,]+) s;", output)
    assert whole_run, output
    assert (int(whole_run[1]), int(whole_run[2]), whole_run[3]) == (5, 8, checkpoint.name)
    assert number(whole_run[4]) == pytest.approx(5 / steps_per_second, rel=2e-3, abs=0.01)

    deadline = re.search(r"deadline 0.5 h: needs ([\d.,]+) tokens/s; on time", output)
    assert deadline, output
    assert number(deadline[1]) == pytest.approx(5 * TOKENS_PER_STEP / 1800, abs=0.05)


def test_search_for_the_largest_minibatch_finds_the_injected_limit(tmp_path, datasets_dir):
    # 8 sequences per rank per global step (2 x 4 micro-steps); above 5 a trial "runs out of memory".
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "gradient_accumulation_steps": 4})
    before = snapshot(run_dir)
    result = run_training(run_dir, datasets_dir, "-f", env={INJECT_OOM_VARIABLE: "5"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert snapshot(run_dir) == before   # no checkpoints directory, no lock
    output = result.stdout

    trials = re.findall(r"minibatch_size\s+(\d+): (fits|out of memory on rank\(s\) 0, 1)", output)
    assert trials == [("1", "fits"), ("2", "fits"), ("4", "fits"), ("8", "out of memory on rank(s) 0, 1"),
                      ("6", "out of memory on rank(s) 0, 1"), ("5", "fits")], output
    # The trials that ran were judged against the CPU budget, by the RSS growth measured.
    assert re.search(r"budget per rank: [\d.]+ [kMG]B of RSS growth", output), output
    assert len(re.findall(r"fits, RSS grew by ", output)) == 4, output
    assert "largest minibatch_size that fits: 5\n" in output
    advice = re.search(r'to keep the global batch of 16 sequences \(2 rank\(s\) x 8\): '
                       r'"minibatch_size": (\d+), "gradient_accumulation_steps": (\d+)', output)
    assert advice, output
    minibatch, accumulation = int(advice[1]), int(advice[2])
    assert minibatch <= 5 and minibatch * accumulation == 8


@pytest.mark.parametrize("largest_fit, per_rank, world_size, exact, expected", [
    (5, 8, 2, True, (4, 2)),      # 2 micro-steps; 4 divides 8
    (64, 6, 8, True, (6, 1)),     # more fits than a global step needs
    (6, 7, 1, False, (4, 2)),     # 7 is prime: 4 x 2 = 8, or exactly 1 x 7
    (4, 10, 1, False, (3, 3)),    # 3 micro-steps: 3 x 3 = 9 is nearest; exactly 2 x 5
])
def test_microbatch_advice_keeps_the_global_batch_as_nearly_as_integers_allow(
        largest_fit, per_rank, world_size, exact, expected):
    advice = microbatch_advice(largest_fit, per_rank, world_size)
    keys = [tuple(map(int, pair)) for pair in
            re.findall(r'"minibatch_size": (\d+), "gradient_accumulation_steps": (\d+)', advice)]
    assert keys[0] == expected and keys[0][0] <= largest_fit
    assert ("can't be kept exactly" not in advice) == exact
    if not exact:
        minibatch, accumulation = keys[1]
        assert minibatch <= largest_fit and minibatch * accumulation == per_rank
        change = expected[0] * expected[1] / per_rank - 1
        assert f"({change:+.1%})" in advice


def test_a_cpu_trial_is_judged_before_it_runs_from_the_growth_measured_below_it():
    assert extrapolated_growth({}, 1) == 0                                    # the first trial always runs
    assert extrapolated_growth({1: 100}, 2) == 200                            # one point: proportional
    assert extrapolated_growth({1: 100, 2: 150}, 4) == 250                    # 50 fixed + 50 a sequence
    assert extrapolated_growth({1: 100, 2: 150, 8: 10 ** 9}, 6) == 350        # only sizes below count
    assert extrapolated_growth({2: 150, 4: 140}, 8) == 280                    # shrank: proportional again


def test_a_deadline_must_be_positive_and_is_refused_before_torch_is_imported(tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run")
    result = run_script(SCRIPT.name, run_dir, datasets_dir, "--preflight", "--deadline", "0", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: Invalid value for '--deadline': 0.0 is not in the range x>0."], result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--preflight", "-f"], "--preflight and -f/--find-max-microbatch-size are separate runs"),
    (["--deadline", "3"], "--preflight-steps and --deadline go with --preflight"),
])
def test_options_that_do_not_go_together_are_usage_errors(arguments, message, tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run")
    before = snapshot(run_dir)
    result = run_training(run_dir, datasets_dir, *arguments, nproc=None)
    assert result.returncode == 2, result.stderr
    assert f"Error: {message}" in result.stderr
    assert snapshot(run_dir) == before
