"""Elastic resume: a checkpoint resumes on another number of ranks when world_size x
gradient_accumulation_steps stays the same, since global step s then trains on the same
batches s*W*A ... s*W*A + W*A - 1. Real torchrun, CPU ranks, fp32, no dropout, DDP and
FSDP. Not bitwise: gradients are summed in another order (and the generator states of
another world size are not restored), so the weights end within ELASTIC_TOLERANCE."""

import pytest

from helpers import (TRAIN, assert_close_weights, copy_run_up_to, final_weights, latest, make_run,
                     run_training)

# Measured on 2026-12-02 (AMD EPYC, torch 2.15): DDP ended bit for bit equal here (two
# ranks' gradients summed by gloo round like one rank's two micro-steps), FSDP at most
# 1.5e-7 apart (reduce-scatter sums in another order). The bound leaves room for other
# CPUs' kernels and for dropout, whose masks differ after an elastic resume.
ELASTIC_TOLERANCE = 1e-5


def finished_run(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_resume_on_one_with_two_accumulation_steps(parallelism, ddp_run, fsdp_run, tmp_path,
                                                             datasets_dir):
    two_ranks = {"ddp": ddp_run, "fsdp": fsdp_run}[parallelism]
    run_dir = copy_run_up_to(two_ranks, tmp_path / "one-rank", step=2, train={
        **TRAIN, "parallelism": parallelism, "gradient_accumulation_steps": 2})
    result = finished_run(run_training(run_dir, datasets_dir, "latest", nproc=1))
    assert "no random-number generator states for 1 rank(s)" in result.stdout
    meta = latest(run_dir).meta
    assert (meta["world_size"], meta["gradient_accumulation_steps"], meta["global_step"]) == (1, 2, 3)
    assert_close_weights(final_weights(run_dir), final_weights(two_ranks), atol=ELASTIC_TOLERANCE)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_one_rank_with_two_accumulation_steps_resumes_on_two(parallelism, ddp_run, fsdp_run, tmp_path,
                                                             datasets_dir):
    two_ranks = {"ddp": ddp_run, "fsdp": fsdp_run}[parallelism]
    one_rank = make_run(tmp_path / "one-rank", train={
        **TRAIN, "parallelism": parallelism, "gradient_accumulation_steps": 2})
    finished_run(run_training(one_rank, datasets_dir, nproc=1))
    # The same batches per global step from the start: close to the 2-rank run already.
    assert_close_weights(final_weights(one_rank), final_weights(two_ranks), atol=ELASTIC_TOLERANCE)
    run_dir = copy_run_up_to(one_rank, tmp_path / "two-ranks", step=2,
                             train={**TRAIN, "parallelism": parallelism})
    finished_run(run_training(run_dir, datasets_dir, "latest"))
    assert latest(run_dir).meta["world_size"] == 2
    assert_close_weights(final_weights(run_dir), final_weights(two_ranks), atol=ELASTIC_TOLERANCE)


def test_another_global_batch_is_refused_with_what_would_work(ddp_run, tmp_path, datasets_dir):
    # One rank with one accumulation step would train on half the batches of each step.
    run_dir = copy_run_up_to(ddp_run, tmp_path / "one-rank", step=2)
    result = run_training(run_dir, datasets_dir, "latest", nproc=None)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "written by 2 rank(s) x 1 accumulation step(s), this run has 1 x 1" in lines[0]
    assert lines[0].endswith("with 1 rank(s) set gradient_accumulation_steps to 2")
