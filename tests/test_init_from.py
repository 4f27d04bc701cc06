"""train.json's init_from: a fresh run starts from a model.safetensors whose sibling
model.json matches the run's; a mismatch is one line."""


import torch

from support import checkpointing

from support import weights as weight_files
from gpt import GPTModel
from helpers import MODEL, TRAIN, latest, make_run, run_training, write_tiny_checkpoint, write_toy_dataset


def test_a_fresh_run_starts_from_the_files_weights(tmp_path):
    write_toy_dataset(tmp_path / "datasets" / "toy")
    # A learning rate of 1e-30 and no decay: the first AdamW step moves each weight by
    # about 1e-30 (nothing at all for any weight that isn't zero), so the step-0
    # checkpoint shows the weights training started from.
    frozen = {**TRAIN, "learning_rate": 1e-30, "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": None,
              "lr_schedule": "constant", "min_learning_rate": 0.0, "min_train_tokens": 64,
              "init_from": "../imported/model.safetensors"}
    (tmp_path / "imported").mkdir()
    imported = write_tiny_checkpoint(tmp_path / "imported", {**MODEL, "drop_rate": 0.1}, seed=123).state_dict()
    run_dir = make_run(tmp_path / "run", train=frozen)
    result = run_training(run_dir, tmp_path / "datasets", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting from" in result.stdout
    started = weight_files.read_weights(latest(run_dir).path / checkpointing.MODEL_FILE)
    torch.manual_seed(TRAIN["seed"])
    own_init = GPTModel(MODEL).state_dict()
    assert not torch.equal(own_init["tok_emb.weight"], imported["tok_emb.weight"])
    assert started.keys() == imported.keys()
    for key, tensor in imported.items():
        torch.testing.assert_close(started[key], tensor, rtol=0, atol=1e-28, msg=key)


def test_a_mismatched_model_json_is_refused_in_one_line(tmp_path):
    (tmp_path / "imported").mkdir()
    write_tiny_checkpoint(tmp_path / "imported", {**MODEL, "emb_dim": 64}, seed=0)
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "init_from": str(tmp_path / "imported" / "model.safetensors")})
    result = run_training(run_dir, tmp_path / "datasets", nproc=None)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "key 'init_from'" in lines[0] and "has emb_dim 64" in lines[0], result.stderr
    assert not (run_dir / "checkpoints").exists()
