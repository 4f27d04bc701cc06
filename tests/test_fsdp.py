"""FSDP2 ("parallelism": "fsdp") against DDP: real torchrun, two CPU processes (gloo),
a tiny fp32 model without dropout. The checkpoints of both are interchangeable."""

import pytest
import torch

from support import checkpointing

from support import weights as weight_files
from gpt import GPTModel
from helpers import (MODEL, TRAIN, assert_close_weights, copy_run_up_to, final_weights, latest, make_run,
                     run_training, trained)

FSDP = {**TRAIN, "parallelism": "fsdp"}
# ddp_run and fsdp_run (conftest.py): the same 2-rank fp32 run under DDP and under FSDP.


def test_fsdp_ends_with_ddps_weights(fsdp_run, ddp_run):
    assert latest(fsdp_run).meta["parallelism"] == "fsdp" and latest(ddp_run).meta["parallelism"] == "ddp"
    assert_close_weights(final_weights(fsdp_run), final_weights(ddp_run), atol=1e-5)
    for ours, theirs in zip(latest(fsdp_run).meta["history"], latest(ddp_run).meta["history"], strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)


def test_fsdp_checkpoint_is_the_seed_layout(fsdp_run):
    checkpoint = latest(fsdp_run)
    # The full, unsharded weights in the seed's names (causal-mask buffers included),
    # loading strictly into the plain model.
    weights = weight_files.read_weights(checkpoint.path / checkpointing.MODEL_FILE)
    model = GPTModel(MODEL)
    assert weights.keys() == model.state_dict().keys()
    model.load_state_dict(weights, strict=True)
    # The optimizer state is torch's index-keyed AdamW state of the whole model, each
    # group naming its parameters; it loads into a plain AdamW as the seed's does.
    saved = torch.load(checkpoint.path / checkpointing.OPTIMIZER_FILE, weights_only=True)
    names = [name for name, _ in model.named_parameters()]
    assert saved["param_groups"][0]["param_names"] == names
    for index, parameter in enumerate(model.parameters()):
        assert saved["state"][index]["exp_avg"].shape == parameter.shape
    torch.optim.AdamW(model.parameters()).load_state_dict(saved)


def test_fsdp_resume_is_bitwise_identical(fsdp_run, tmp_path, datasets_dir):
    run_dir = copy_run_up_to(fsdp_run, tmp_path / "resumed", step=2)
    result = run_training(run_dir, datasets_dir, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3" in result.stdout
    assert latest(run_dir).meta["history"] == latest(fsdp_run).meta["history"]
    expected = final_weights(fsdp_run)
    for key, tensor in final_weights(run_dir).items():
        assert torch.equal(tensor, expected[key]), key


def test_ddp_checkpoint_resumes_under_fsdp(ddp_run, tmp_path, datasets_dir):
    run_dir = copy_run_up_to(ddp_run, tmp_path / "to-fsdp", step=2, train=FSDP)
    trained(run_dir, datasets_dir, "latest")
    assert latest(run_dir).meta["parallelism"] == "fsdp"
    assert_close_weights(final_weights(run_dir), final_weights(ddp_run), atol=1e-5)


def test_fsdp_checkpoint_resumes_under_ddp(fsdp_run, ddp_run, tmp_path, datasets_dir):
    run_dir = copy_run_up_to(fsdp_run, tmp_path / "to-ddp", step=2, train=TRAIN)
    trained(run_dir, datasets_dir, "latest")
    assert latest(run_dir).meta["parallelism"] == "ddp"
    assert_close_weights(final_weights(run_dir), final_weights(ddp_run), atol=1e-5)


def test_fp16_is_refused_under_fsdp(tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run", train={**FSDP, "dtype": "fp16"})
    result = run_training(run_dir, datasets_dir, nproc=None)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "'dtype' is \"fp16\"" in result.stderr, result.stderr


def test_fsdp_gradient_accumulation_matches_one_big_micro_batch(ddp_run, tmp_path, datasets_dir):
    # Two micro-steps of one sequence per rank cover the same four sequences a global
    # step as one micro-step of two: with gradients reduced once, on the last micro-step,
    # and averaged over the micro-steps, the weights are the same.
    run_dir = trained(make_run(tmp_path / "accumulated", train={
        **FSDP, "minibatch_size": 1, "gradient_accumulation_steps": 2}), datasets_dir)
    assert latest(run_dir).global_step == latest(ddp_run).global_step == 3
    assert_close_weights(final_weights(run_dir), final_weights(ddp_run), atol=1e-5)
