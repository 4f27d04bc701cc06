"""A run that goes wrong, under real 2-rank torchrun: steps that are not finite (a NaN
injected into one rank's loss, or a learning rate of 1e3) are skipped by every rank,
counted, and too many in a row stop the run with one line, latest on the newest healthy
checkpoint, nothing unhealthy written, and torchrun's restart giving up at once; loss
spikes warn, or roll the run back, reproducibly (support/health.py)."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import MODEL, TRAIN, latest, make_run, metrics_rows, run_training, trained
from support import checkpointing
from support.health import DIVERGED_EXIT_CODE, LOSS_TIMES_VARIABLE

# 2 ranks x 2 sequences x 16 tokens = 64 tokens a step: 8 steps, checkpoints at 0, 3, 6 and 7.
HEALTH = {**TRAIN, "min_train_tokens": 512, "validation_interval": 3, "max_nonfinite_steps": 3}


def all_finite(checkpoint):
    return all(torch.isfinite(tensor).all() for tensor in load_file(str(checkpoint.path / "model.safetensors")).values())


def adam_steps(checkpoint):
    """How many updates AdamW applied: its step count (the same for every parameter)."""
    state = torch.load(checkpoint.path / "optimizer.pt", weights_only=True)["state"]
    return {int(entry["step"]) for entry in state.values()}


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory, datasets_dir):
    return trained(make_run(tmp_path_factory.mktemp("healthy") / "run", MODEL, HEALTH), datasets_dir)


def test_a_nan_on_one_rank_skips_that_step_on_every_rank(healthy_run, tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run", MODEL, HEALTH)
    result = run_training(run_dir, datasets_dir, env={LOSS_TIMES_VARIABLE: "1@3*nan"})
    assert result.returncode == 0, result.stderr[-3000:]
    # Step 3's checkpoint is not written: its step was not finite.
    assert "step 3: no checkpoint: its step not finite; latest stays where it was" in result.stdout
    checkpoints = {c.global_step: c for c in checkpointing.list_checkpoints(run_dir / "checkpoints")}
    assert sorted(checkpoints) == [0, 6, 7]
    final = latest(run_dir)
    # One update fewer than the healthy run's 8, the same learning rate (the schedule went on).
    assert adam_steps(final) == {7} and adam_steps(latest(healthy_run)) == {8}
    assert final.meta["learning_rate"] == latest(healthy_run).meta["learning_rate"]
    assert final.meta["nonfinite_steps"] == 1 and latest(healthy_run).meta["nonfinite_steps"] == 0
    assert "Skipped: 1 step(s) whose loss or gradient norm was not finite" in result.stdout
    rows = {row["step"]: row for row in metrics_rows(run_dir) if row["kind"] == "train"}
    assert [step for step, row in rows.items() if row["nonfinite_steps"]] == [3]
    # Before the NaN, the two runs are one.
    first, healthy_first = checkpoints[0], checkpointing.list_checkpoints(healthy_run / "checkpoints")[0]
    assert first.meta["train_loss"] == healthy_first.meta["train_loss"]
    assert all_finite(final)


def test_a_rank_that_keeps_failing_stops_the_run_and_torchrun_does_not_loop(tmp_path, datasets_dir):
    # keep_checkpoints 1: pruning must still leave the newest healthy checkpoint.
    run_dir = make_run(tmp_path / "run", MODEL, {**HEALTH, "keep_checkpoints": 1})
    result = run_training(run_dir, datasets_dir, "auto", env={LOSS_TIMES_VARIABLE: "1@4-99*nan"},
                          torchrun_options=["--max-restarts=2"])
    assert result.returncode != 0
    healthy = latest(run_dir)
    assert healthy.global_step == 3 and [c.global_step for c in checkpointing.list_checkpoints(
        run_dir / "checkpoints")] == [3]
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    # One line, said once though torchrun started the job three times: the restarts gave up at once.
    assert lines == [f"Error: steps 4 to 6 were not finite (loss and gradient norm): 3 in a row, "
                     f"max_nonfinite_steps is 3: stopped; the newest healthy checkpoint is {healthy.path} "
                     f"(step 3; latest points at it). Not restartable as it is: lower learning_rate, or "
                     f"resume from an earlier checkpoint"], result.stderr[-3000:]
    assert f"exitcode  : {DIVERGED_EXIT_CODE}" in result.stderr
    assert result.stderr.count("attempt_2") >= 1 and "Traceback" not in result.stdout


def test_a_learning_rate_of_a_thousand_diverges_and_stops(tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run", MODEL, {**HEALTH, "min_train_tokens": 64 * 30, "learning_rate": 1000.0,
                                                 "max_nonfinite_steps": 5, "grad_clip": None})
    result = run_training(run_dir, datasets_dir, nproc=None)
    assert result.returncode == DIVERGED_EXIT_CODE, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert "were not finite (gradient norm)" in line and f"is {latest(run_dir).path} " in line
    checkpoints = checkpointing.list_checkpoints(run_dir / "checkpoints")
    assert checkpoints and all(all_finite(checkpoint) for checkpoint in checkpoints)
    assert "no checkpoint: its step not finite" in result.stdout


# 24 steps, checkpoints every 3; a window of 4 steps; rank 0's loss 8 times over at step 10
# makes the mean 4.5 times over: a spike, seen at the check of step 12.
SPIKY = {**HEALTH, "min_train_tokens": 64 * 24, "loss_spike_window": 4, "learning_rate": 0.001,
         "warmup_steps": 0, "lr_schedule": "constant"}
SPIKE = {LOSS_TIMES_VARIABLE: "0@10*8"}


def test_a_loss_spike_is_a_warning_and_a_row(tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run", MODEL, SPIKY)
    result = run_training(run_dir, datasets_dir, env=SPIKE)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if "loss spike" in line]
    assert line.startswith("warning: loss spike at step 10: ") and "over 2 times the mean of the 4 steps" in line
    [row] = [row for row in metrics_rows(run_dir) if row["kind"] == "spike"]
    assert row["step"] == 10 and row["loss"] > 2 * row["mean_before"]
    assert latest(run_dir).meta["rollbacks"] == 0 and latest(run_dir).global_step == 23


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, datasets_dir):
    run_dir = make_run(tmp_path_factory.mktemp("rollback") / "run", MODEL, {**SPIKY, "on_loss_spike": "rollback"})
    result = run_training(run_dir, datasets_dir, env=SPIKE)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_rollback_goes_back_before_the_spike_and_skips_its_batches(rolled_back):
    run_dir, result = rolled_back
    assert ("rollback 1 of 3 after the loss spike at step 10: back to " in result.stdout
            and "skipping the batches of steps 10 to 10" in result.stdout)
    meta = latest(run_dir).meta
    assert meta["rollbacks"] == 1 and meta["skipped_steps"] == [[10, 10]] and latest(run_dir).global_step == 23
    # Seen at the check of step 12: steps 11 and 12 trained twice, 26 steps of 64 tokens in all.
    assert "(global steps 0 to 23; 2 of them trained again after rollbacks)" in result.stdout
    assert "Tokens seen: 1,664 this session, 1,536 in all" in result.stdout
    rows = metrics_rows(run_dir)
    [rollback] = [row for row in rows if row["kind"] == "rollback"]
    assert rollback["step"] == 10 and rollback["checkpoint"].endswith("-iteration-9")
    # Step 10 trained once (before the rollback, with the spike), then never again: after the
    # rollback, training went on at step 11, from step 9's checkpoint.
    steps_after = [row["step"] for row in rows[rows.index(rollback):] if row["kind"] == "train"]
    assert steps_after[0] == 11 and 10 not in steps_after


def test_a_rolled_back_run_is_reproducible_and_resumes_exactly(rolled_back, tmp_path, datasets_dir):
    from helpers import copy_run_up_to, final_weights
    run_dir, _ = rolled_back
    again = make_run(tmp_path / "again", MODEL, {**SPIKY, "on_loss_spike": "rollback"})
    assert run_training(again, datasets_dir, env=SPIKE).returncode == 0
    resumed = copy_run_up_to(run_dir, tmp_path / "resumed", step=15)
    assert run_training(resumed, datasets_dir, "latest", env=SPIKE).returncode == 0
    for other in (again, resumed):
        assert latest(other).meta["skipped_steps"] == [[10, 10]]
        for key, tensor in final_weights(run_dir).items():
            assert torch.equal(final_weights(other)[key], tensor), key
