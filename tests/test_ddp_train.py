"""ddp_train.py end to end: real torchrun subprocesses on CPU/gloo with a tiny model.

One uninterrupted 2-rank run is the reference point: it is checked against an
independent re-computation (the same batches, gradients averaged over ranks), and a
second 2-rank run, SIGKILLed mid-save and resumed, must end bitwise identical to it.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gpt import GPTModel
from support import charts as chart
from support import checkpointing
from support import weights as weight_files
from support.config import TRAIN_REQUIRED, validate_train_config
from support.optimizer import learning_rate_at

import helpers
from helpers import PROJECT_ROOT, run_training, write_original_checkpoint

MODEL = {**helpers.MODEL, "drop_rate": 0.1}
# 2 ranks x 2 sequences x 16 tokens = 64 tokens a global step: 512 tokens make 8 steps,
# checkpoints at steps 0, 3, 6 and 7. Every optional feature is switched on.
TRAIN = {**helpers.TRAIN, "min_train_tokens": 512, "validation_interval": 3, "warmup_steps": 2,
         "keep_checkpoints": 2}
STEPS = 8


def make_run(path, model=None, train=None):
    return helpers.make_run(path, model or MODEL, train or TRAIN)


def weights(checkpoint_dir):
    return load_file(str(Path(checkpoint_dir) / "model.safetensors"))


def reference_training(tokens, steps, world_size):
    """What DDP must compute, written out plainly in one process: in each step rank r's
    batch is step * W + r, run with rank r's own dropout generator (seed + r), the
    gradients averaged over ranks, clipped, and AdamW stepped at the scheduled rate.
    Returns the final state dict and each step's per-rank losses."""
    config = validate_train_config(TRAIN)
    batch, length = config.minibatch_size, MODEL["context_length"]
    torch.manual_seed(config.seed)
    model = GPTModel(MODEL)
    generators = []
    for rank in range(world_size):
        torch.manual_seed(config.seed + rank)
        generators.append(torch.get_rng_state())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, config)
        step_losses = []
        for rank in range(world_size):
            start = (step * world_size + rank) * batch * length
            chunk = tokens[start:start + batch * length + 1].long()
            torch.set_rng_state(generators[rank])
            loss = model(chunk[:-1].view(batch, length), targets=chunk[1:].view(batch, length))
            (loss / world_size).backward()
            generators[rank] = torch.get_rng_state()
            step_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_losses)
    return model.state_dict(), losses


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, datasets_dir):
    run_dir = make_run(tmp_path_factory.mktemp("runs") / "full")
    result = run_training(run_dir, datasets_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_two_ranks_end_to_end(full_run, datasets_dir):
    run_dir, result = full_run
    checkpoints_dir = run_dir / "checkpoints"
    listed = checkpointing.list_checkpoints(checkpoints_dir)
    latest = checkpointing.link_target(checkpoints_dir, "latest")
    best = checkpointing.link_target(checkpoints_dir, "best")
    # keep_checkpoints 2: the newest two, plus best if it is older.
    assert [c.global_step for c in listed][-2:] == [6, 7] and len(listed) <= 3
    assert latest.global_step == 7 and os.readlink(checkpoints_dir / "latest") == latest.name
    assert not os.path.isabs(os.readlink(checkpoints_dir / "best"))
    history = latest.meta["history"]
    assert [p["global_step"] for p in history] == [0, 3, 6, 7]
    assert best.meta["val_loss"] == min(p["val_loss"] for p in history)
    assert latest.meta["tokens_seen"] == 512 and latest.meta["world_size"] == 2
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # it learns
    for png in ("big-training-run-chart.png", "training-metrics-chart.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))

    summary = result.stdout
    assert "Training finished" in summary and "Tokens seen: 512 this session, 512 in all" in summary
    assert f"Final train loss: {latest.meta['train_loss']:.4f}, validation loss: " \
           f"{latest.meta['val_loss']:.4f}" in summary

    # The weights load strictly into the model; validation loss is the original's
    # number: the mean over validation batches 0..2, one batch at a time.
    (run_dir / "model.json").write_text(json.dumps(MODEL))
    model = weight_files.load_model(run_dir / "model.json", latest.path / "model.safetensors")
    validation = load_file(str(datasets_dir / "toy" / "validation.safetensors"))["tokens"].long()
    total = 0.0
    with torch.no_grad():
        for index in range(3):
            chunk = validation[index * 32:index * 32 + 33]
            logits = model(chunk[:-1].view(2, 16))
            total += F.cross_entropy(logits.flatten(0, 1), chunk[1:].flatten()).item()
    assert latest.meta["val_loss"] == pytest.approx(total / 3, abs=1e-6)


def test_ddp_equals_one_process_with_averaged_gradients(full_run, datasets_dir):
    run_dir, _ = full_run
    tokens = load_file(str(datasets_dir / "toy" / "train.safetensors"))["tokens"]
    expected, losses = reference_training(tokens, STEPS, world_size=2)
    latest = checkpointing.link_target(run_dir / "checkpoints", "latest")
    actual = weights(latest.path)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=1e-6, msg=key)
    # A checkpoint's train loss is the mean over ranks and steps since the one before.
    history = {p["global_step"]: p for p in latest.meta["history"]}
    assert history[0]["train_loss"] == pytest.approx(sum(losses[0]) / 2, abs=1e-6)
    assert history[6]["train_loss"] == pytest.approx(sum(losses[4] + losses[5] + losses[6]) / 6, abs=1e-6)
    assert history[7]["train_loss"] == pytest.approx(sum(losses[7]) / 2, abs=1e-6)

    # metrics.jsonl: a training row per step (log_interval's default, 1) with the mean
    # loss over both ranks, and a validation row after each checkpoint's step.
    rows = helpers.metrics_rows(run_dir)
    assert [(row["kind"], row["step"]) for row in rows] == [
        ("train", 0), ("validation", 0), ("train", 1), ("train", 2), ("train", 3), ("validation", 3),
        ("train", 4), ("train", 5), ("train", 6), ("validation", 6), ("train", 7), ("validation", 7)]
    config = validate_train_config(TRAIN)
    names = {checkpoint.global_step: checkpoint.name
             for checkpoint in checkpointing.list_checkpoints(run_dir / "checkpoints")}
    for row in rows:
        step = row["step"]
        if row["kind"] == "validation":
            point = history[step]
            assert (row["train_loss"], row["val_loss"], row["is_best"]) == (
                point["train_loss"], point["val_loss"], point["is_best"])
            assert row["checkpoint"] == names.get(step, row["checkpoint"])  # older ones were pruned
            continue
        assert row["loss"] == pytest.approx(sum(losses[step]) / 2, abs=1e-6)
        assert row["learning_rate"] == learning_rate_at(step, STEPS, config)
        assert row["tokens_seen"] == (step + 1) * 64
        assert 0 < row["grad_norm"] and row["clipped_fraction"] == float(row["grad_norm"] > TRAIN["grad_clip"])
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1 and row["cpu_rss_bytes"] > 10_000_000
    elapsed = [row["elapsed_seconds"] for row in rows if row["kind"] == "train"]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # TensorBoard and W&B are off by default and leave nothing behind.
    assert not any((run_dir / name).exists() for name in ("tensorboard", "wandb", "wandb-run-id"))


def test_sigkilled_twice_then_resumed_is_bitwise_identical(full_run, tmp_path, datasets_dir):
    full_dir, _ = full_run
    run_dir = make_run(tmp_path / "crashed")
    checkpoints_dir = run_dir / "checkpoints"

    # 1. Rank 0 dies in the middle of writing the step-3 checkpoint; torchrun takes rank 1 down.
    crashed = run_training(run_dir, datasets_dir, env={checkpointing.KILL_AT_VARIABLE: "partial@3"})
    assert crashed.returncode != 0
    assert [c.global_step for c in checkpointing.list_checkpoints(checkpoints_dir)] == [0]
    assert checkpointing.link_target(checkpoints_dir, "latest").global_step == 0
    assert any(name.startswith(".partial-") for name in os.listdir(checkpoints_dir))
    assert [p["global_step"] for p in chart.chart_points(checkpoints_dir)[0]] == [0]

    # 2. Resumed, it dies again just after the step-6 checkpoint got its name, before
    #    `latest` moved: a complete checkpoint newer than the one `latest` names.
    crashed = run_training(run_dir, datasets_dir, "latest",
                           env={checkpointing.KILL_AT_VARIABLE: "after-rename@6"})
    assert crashed.returncode != 0 and "at step 1" in crashed.stdout
    assert [c.global_step for c in checkpointing.list_checkpoints(checkpoints_dir)] == [0, 3, 6]
    assert checkpointing.link_target(checkpoints_dir, "latest").global_step == 3
    assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))

    # 3. Resumed from latest, it goes over steps 4-6 again and finishes.
    resumed = run_training(run_dir, datasets_dir, "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at step 4" in resumed.stdout
    assert "Tokens seen: 256 this session, 512 in all" in resumed.stdout
    assert [c.global_step for c in checkpointing.list_checkpoints(checkpoints_dir)][-2:] == [6, 7]

    # Every loss logged after the resumes and every final weight: bit for bit.
    ours = checkpointing.link_target(checkpoints_dir, "latest")
    reference = checkpointing.link_target(full_dir / "checkpoints", "latest")
    assert ours.meta["history"] == reference.meta["history"]
    assert chart.chart_points(checkpoints_dir) == chart.chart_points(full_dir / "checkpoints")
    for key, tensor in weights(reference.path).items():
        assert torch.equal(weights(ours.path)[key], tensor), key
    # metrics.jsonl: the rows the crashed sessions wrote past their checkpoints are gone;
    # what is left is what the uninterrupted run logged.
    assert helpers.metrics_rows(run_dir, comparable=True) == helpers.metrics_rows(full_dir, comparable=True)
    ours_optimizer = torch.load(ours.path / "optimizer.pt", weights_only=True)
    reference_optimizer = torch.load(reference.path / "optimizer.pt", weights_only=True)
    for index, state in reference_optimizer["state"].items():
        assert torch.equal(ours_optimizer["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_one_process_resumes_a_checkpoint_of_the_original_scripts(tmp_path, datasets_dir):
    # Plain `python ddp_train.py` (world size 1), gradient accumulation, and the original's
    # fp16 autocast with a GradScaler, whose saved state is carried on.
    train = {key: value for key, value in TRAIN.items() if key != "keep_checkpoints"}
    train.update(min_train_tokens=256, validation_interval=2, gradient_accumulation_steps=2,
                 dtype="fp16")
    run_dir = make_run(tmp_path / "original", train=train)
    # A scale and growth interval of its own, to see them carried on.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    for step, val_loss in ((0, 9.0), (1, 8.0)):
        write_original_checkpoint(run_dir / "checkpoints", step, {"train_loss": val_loss + 0.1, "val_loss": val_loss,
                                                                  "is_best": True},
                                  model_config=MODEL, written_at=f"20250101Z00000{step}", scaler=scaler)

    result = run_training(run_dir, datasets_dir, "latest", nproc=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds no random-number generator states" in result.stdout
    checkpoints_dir = run_dir / "checkpoints"
    latest = checkpointing.link_target(checkpoints_dir, "latest")
    assert latest.global_step == 3
    assert [p["global_step"] for p in latest.meta["history"]] == [0, 1, 2, 3]
    assert latest.meta["gradient_accumulation_steps"] == 2 and latest.meta["world_size"] == 1
    assert latest.meta["dtype"] == "fp16"
    scaler_state = torch.load(latest.path / "scaler.pt", weights_only=True)
    assert scaler_state["growth_interval"] == 7 and scaler_state["scale"] in (1024.0, 512.0, 256.0)
    assert math.isfinite(latest.meta["train_loss"]) and math.isfinite(latest.meta["val_loss"])
    assert [c.global_step for c in checkpointing.list_checkpoints(checkpoints_dir)] == [0, 1, 2, 3]
    weight_files.load_model(run_dir / "model.json", latest.path / "model.safetensors")


# --- bad inputs: one line, exit code 1, nothing in the run directory touched ---

def snapshot(directory):
    state = {}
    for path in sorted(Path(directory).rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            state[key] = "-> " + os.readlink(path)
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def with_checkpoint(run_dir):
    torch.manual_seed(0)
    model = GPTModel(MODEL)
    checkpointing.save_checkpoint(
        run_dir / "checkpoints", model_state=model.state_dict(),
        optimizer_state=torch.optim.AdamW(model.parameters()).state_dict(), scaler_state={},
        rng_state=None, meta={"train_loss": 5.0, "val_loss": 5.0, "global_step": 3, "is_best": True})
    return run_dir


BAD_INPUTS = {
    "no such run": (lambda d: d, [], "no run directory"),
    "missing key": (lambda d: make_run(d, train={k: v for k, v in TRAIN.items() if k != "validation_batches"}),
                    [], "train.json: missing key 'validation_batches'"),
    "invalid value": (lambda d: make_run(d, train={**TRAIN, "minibatch_size": 0}),
                      [], "train.json: key 'minibatch_size' must be an integer >= 1, got 0"),
    "invalid model": (lambda d: make_run(d, model={**MODEL, "n_heads": 3}),
                      [], "model.json: key 'emb_dim' (32) must be divisible by 'n_heads' (3)"),
    "dataset too small": (lambda d: make_run(d, train={**TRAIN, "min_train_tokens": 10 ** 6}),
                          [], "not enough tokens"),
    "no dataset": (lambda d: make_run(d, train={**TRAIN, "dataset": "absent"}), [], "absent does not exist"),
    "unknown checkpoint": (lambda d: with_checkpoint(make_run(d)), ["nope"], "'nope' is not a checkpoint name"),
    "missing checkpoint": (lambda d: with_checkpoint(make_run(d)), ["20250101Z000000-iteration-9"],
                           "iteration-9 does not exist"),
    "no best yet": (lambda d: make_run(d), ["best"], "there are no complete checkpoints"),
    "fresh start over checkpoints": (lambda d: with_checkpoint(make_run(d)), [],
                                     "already holds 1 checkpoint(s)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_destroys_nothing(case, tmp_path, datasets_dir):
    prepare, arguments, message = BAD_INPUTS[case]
    run_dir = prepare(tmp_path / "run")
    before = snapshot(tmp_path)
    result = run_training(run_dir, datasets_dir, *arguments, nproc=None)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert snapshot(tmp_path) == before


def test_bad_input_in_a_real_process(tmp_path, datasets_dir):
    run_dir = with_checkpoint(make_run(tmp_path / "run"))
    before = snapshot(run_dir)
    result = run_training(run_dir, datasets_dir, nproc=None)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "already holds 1 checkpoint(s)" in result.stderr
    assert snapshot(run_dir) == before


# --- pieces ---

def test_learning_rate_schedule():
    seed_default = validate_train_config({key: TRAIN[key] for key in TRAIN_REQUIRED})
    assert {learning_rate_at(step, 100, seed_default) for step in range(100)} == {0.0004}
    cosine = validate_train_config({**TRAIN, "warmup_steps": 10, "learning_rate": 1.0, "min_learning_rate": 0.1})
    rates = [learning_rate_at(step, 110, cosine) for step in range(110)]
    assert rates[:10] == pytest.approx([0.1 * (step + 1) for step in range(10)])
    assert rates[10] == 1.0 and rates[-1] == pytest.approx(0.1)
    assert rates[60] == pytest.approx(0.55, abs=0.01)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_run_name_or_path(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path / "somewhere")
    runs_dir = PROJECT_ROOT / "runs"
    assert checkpointing.find_run_dir(runs_dir, str(run_dir)) == run_dir
    monkeypatch.chdir(tmp_path)
    assert checkpointing.find_run_dir(runs_dir, "somewhere") == Path("somewhere")
    example = next(path for path in (PROJECT_ROOT / "runs").iterdir() if path.is_dir())
    assert checkpointing.find_run_dir(runs_dir, example.name) == example


def test_a_resume_says_which_optimisation_setting_changed(full_run, tmp_path, datasets_dir):
    run_dir, _ = full_run
    resumed = helpers.copy_run_up_to(run_dir, tmp_path / "resumed", step=6,
                                     train={**TRAIN, "learning_rate": 0.02, "grad_clip": 1.0})
    middle = checkpointing.link_target(resumed / "checkpoints", "latest").name
    result = run_training(resumed, datasets_dir, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: train.json's")]
    assert notes == [f"note: train.json's learning_rate is now 0.02; {middle} was trained with 0.01: going on "
                     f"with the new value",
                     f"note: train.json's grad_clip is now 1.0; {middle} was trained with 0.5: going on with "
                     f"the new value"], result.stdout
