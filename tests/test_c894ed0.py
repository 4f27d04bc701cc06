"""train.json's c894ed0 dialect: ddp_train.py under real 2-rank torchrun in fp32 gives the
later original's numbers, against its training recomputed independently
(tests/original_c894ed0.py): every checkpoint's learning_rate and min/max/avg_train_loss
(rank 0's micro-steps), the gradient-norm statistics, the MoE routing statistics, best,
and the final weights, within 1e-5; for a plain run, weight tying, the schedule with
clipping, gradient accumulation, a mixture of experts and an explicit random_seed. Each
config has a key set of one of the original's runs/ at c894ed0."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpt import GPTModel, generate
from helpers import MODEL, SMOKE_SEPARATOR, latest, make_run, run_script, run_training
from original_c894ed0 import (C894ED0, C894ED0_LEGACY, C894ED0_TRAIN_KEY_SETS, C894ED0_VALUES, original_meta,
                              original_training, save_like_the_original)
from support import checkpointing, devices, tokenizer

DENSE = {**MODEL, "drop_rate": 0.0}
# 2 ranks x 2 sequences x 16 tokens = 64 tokens a global step: 4 steps, checkpoints at 0, 2 and 3.
NO_AMP = {"dataset": "toy", "min_train_tokens": 256, "start_train_token": 0, "start_val_token": 0,
          "microbatch_size": 2, "checkpoint_interval": 2, "use_amp": False}
CASES = {
    # The original's learning rate (0.0004): at larger ones Adam turns the last bits of a
    # gradient near zero into whole steps of the learning rate, and weights part by more.
    "plain": (DENSE, NO_AMP),
    "tie_weights": ({**DENSE, "tie_weights": True}, {**NO_AMP, "learning_rate": 0.01}),
    # runs/test's keys: the schedule (a warm-up of 25% of 8 steps: 2), clipping, accumulation 1.
    "schedule with clipping": (DENSE, {**NO_AMP, "min_train_tokens": 512, "clipping_max_norm": 0.5,
                                       "schedule_learning_rate": True, "warmup_period_percent": 25,
                                       "learning_rate": 0.02, "gradient_accumulation_steps": 1}),
    "accumulation 2": (DENSE, {**NO_AMP, "min_train_tokens": 512, "gradient_accumulation_steps": 2}),
    "moe": ({**DENSE, "moe": {"num_experts": 4, "num_active_experts": 2, "log_moe_balance_file": "moe.jsonl"}},
            {**NO_AMP, "learning_rate": 0.01, "clipping_max_norm": 1.0}),
    # With validation keys beside checkpoint_interval (not among the original's runs): unused, as there.
    "random_seed": (DENSE, {**NO_AMP, "random_seed": 67, "weight_decay": 0.0, "validation_interval": 3,
                            "validation_batches": 2}),
    # Ours in that dialect: the tied mixture of experts sharded by FSDP2, its blocks recomputed.
    "tied moe, fsdp, activation checkpointing": (
        {**DENSE, "tie_weights": True, "moe": {"num_experts": 4, "num_active_experts": 2}},
        {**NO_AMP, "clipping_max_norm": 1.0, "parallelism": "fsdp", "activation_checkpointing": True}),
    # Ours beyond the original: the Switch Transformer's load-balancing loss, logged.
    "moe balance loss": ({**DENSE, "moe": {"num_experts": 4, "num_active_experts": 2}},
                         {**NO_AMP, "moe_balance_loss_weight": 0.1}),
}


@pytest.fixture(scope="module")
def train_split_only(tmp_path_factory, datasets_dir):
    """A DATASETS_DIR whose toy dataset has no validation split: the original at c894ed0
    reads none, and neither does a checkpoint_interval run here."""
    root = tmp_path_factory.mktemp("datasets")
    (root / "toy").mkdir()
    shutil.copy(datasets_dir / "toy" / "train.safetensors", root / "toy")
    return root


@pytest.fixture(scope="module", params=CASES)
def trained_pair(request, tmp_path_factory, train_split_only):
    model, train = CASES[request.param]
    run_dir = make_run(tmp_path_factory.mktemp("c894ed0") / "run", model, train)
    result = run_training(run_dir, train_split_only)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = load_file(str(train_split_only / "toy" / "train.safetensors"))["tokens"]
    return request.param, run_dir, result, original_training(model, train, tokens, world_size=2)


def close(ours, theirs, tolerance=1e-5):
    if isinstance(theirs, list):
        return len(ours) == len(theirs) and all(close(a, b, tolerance) for a, b in zip(ours, theirs))
    if theirs is None:
        return ours is None
    return abs(ours - theirs) <= tolerance * max(1.0, abs(theirs))


def test_the_same_numbers_as_the_original(trained_pair):
    case, run_dir, _, (expected_model, expected) = trained_pair
    expected_weights = expected_model.state_dict()
    checkpoints = {c.global_step: c for c in checkpointing.list_checkpoints(run_dir / "checkpoints")}
    assert sorted(checkpoints) == sorted(expected)
    for step, theirs in expected.items():
        meta = checkpoints[step].meta
        for key, value in theirs.items():
            assert close(meta[key], value), (case, step, key, meta[key], value)
    final = load_file(str(latest(run_dir).path / "model.safetensors"))
    for key, tensor in expected_weights.items():
        if key == "tok_emb.weight" and "tie_weights" in CASES[case][0]:
            key = "out_head.weight"   # a tied model's one matrix, saved under the original's name
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-5, msg=lambda m: f"{case} {key}: {m}")


def test_meta_json_keys_and_files_are_the_originals(trained_pair):
    case, run_dir, result, _ = trained_pair
    meta = latest(run_dir).meta
    # The original's eleven keys first, in its order; ours after them.
    assert list(meta)[:11] == ["learning_rate", "min_train_loss", "max_train_loss", "avg_train_loss",
                               "max_grad_norms", "avg_grad_norms", "frac_clipped", "moe_routing_weights",
                               "moe_routing_topk_weights", "global_step", "is_best"]
    assert "val_loss" not in meta and meta["seed"] == CASES[case][1].get("random_seed", 42)
    unused = "validation_interval and validation_batches not used: checkpoint_interval checkpoints without validation"
    assert (unused in result.stdout) == ("validation_interval" in CASES[case][1]), result.stdout
    files = sorted(path.name for path in latest(run_dir).path.iterdir())
    scheduled = CASES[case][1].get("schedule_learning_rate", False)
    # No scaler without AMP, as the original; its schedule's state where it schedules.
    assert files == sorted(["meta.json", "model.safetensors", "optimizer.pt", "rng_state.pt"]
                           + (["scheduler.pt"] if scheduled else []))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "checkpoint"] == sorted(
        c.global_step for c in checkpointing.list_checkpoints(run_dir / "checkpoints"))
    train_rows = [row for row in rows if row["kind"] == "train"]
    moe = "moe" in CASES[case][0]
    # A mixture of experts' routing in every training row, and its chart beside the others.
    assert all(("moe_routing_weights" in row) == moe for row in train_rows)
    assert (run_dir / "moe-routing-chart.png").exists() == moe
    assert all(("moe_balance_loss" in row) == ("balance" in case) for row in train_rows)
    if moe:
        # The row of step 3 is its own micro-step: the checkpoint's routing statistics.
        assert close(train_rows[-1]["moe_routing_topk_weights"], meta["moe_routing_topk_weights"][-1])


NUMBERS = ("learning_rate", "min_train_loss", "max_train_loss", "avg_train_loss", "max_grad_norms",
           "avg_grad_norms", "frac_clipped", "moe_routing_weights", "moe_routing_topk_weights")


def test_our_checkpoints_resume_in_the_original(trained_pair, train_split_only):
    """The original's own way of resuming (its load_checkpoint: strict load_model,
    optimizer.pt, scheduler.pt into its SequentialLR, best from best/meta.json) continues
    our checkpoint of step 2 to our final weights and numbers."""
    case, run_dir, _, _ = trained_pair
    model_config, train = CASES[case]
    tokens = load_file(str(train_split_only / "toy" / "train.safetensors"))["tokens"]
    middle = next(c for c in checkpointing.list_checkpoints(run_dir / "checkpoints") if c.global_step == 2)
    resumed, after = original_training(model_config, train, tokens, world_size=2, resume_from=middle.name,
                                       checkpoints_dir=run_dir / "checkpoints")
    ours = {c.global_step: c.meta for c in checkpointing.list_checkpoints(run_dir / "checkpoints")}
    assert sorted(after) == [step for step in sorted(ours) if step > 2]
    for step, theirs in after.items():
        for key in NUMBERS:
            assert close(ours[step][key], theirs[key]), (case, step, key)
    final = load_file(str(latest(run_dir).path / "model.safetensors"))
    for key, tensor in resumed.state_dict().items():
        key = "out_head.weight" if key == "tok_emb.weight" and "tie_weights" in model_config else key
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-5)


# Tied, a mixture of experts, the schedule and clipping at once: 8 steps, checkpoints at 0, 2, 4, 6, 7.
RESUMED = ({**DENSE, "tie_weights": True, "moe": {"num_experts": 4, "num_active_experts": 2}},
           {**NO_AMP, "min_train_tokens": 512, "clipping_max_norm": 0.5, "schedule_learning_rate": True,
            "warmup_period_percent": 25, "learning_rate": 0.02})


def test_the_originals_checkpoints_resume_here(tmp_path, train_split_only):
    """Checkpoints written as the original writes them (no RNG states, its meta.json,
    scheduler.pt, a tied matrix once) resume here: weights, optimizer, the schedule's
    position and best by avg_train_loss, to the original's own numbers."""
    model_config, train = RESUMED
    run_dir = make_run(tmp_path / "run", model_config, train)
    tokens = load_file(str(train_split_only / "toy" / "train.safetensors"))["tokens"]
    expected_model, expected = original_training(model_config, train, tokens, world_size=2, save_at={0, 2},
                                                 checkpoints_dir=run_dir / "checkpoints")
    # What the original leaves: the checkpoints of steps 0 and 2, latest on 2.
    for extra in [c for c in checkpointing.list_checkpoints(run_dir / "checkpoints") if c.global_step > 2]:
        shutil.rmtree(extra.path)
    result = run_training(run_dir, train_split_only, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds no random-number generator states" in result.stdout and "at step 3" in result.stdout
    ours = {c.global_step: c.meta for c in checkpointing.list_checkpoints(run_dir / "checkpoints")}
    assert sorted(ours) == [0, 2, 4, 6, 7]
    for step in (4, 6, 7):
        for key in NUMBERS + ("is_best",):
            assert close(ours[step][key], expected[step][key]), (step, key)
    final = load_file(str(latest(run_dir).path / "model.safetensors"))
    assert "tok_emb.weight" not in final   # tied: one matrix, as the original saves it
    for key, tensor in expected_model.state_dict().items():
        key = "out_head.weight" if key == "tok_emb.weight" else key
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-5)


def test_an_original_amp_checkpoint_resumes_with_its_scaler(tmp_path, train_split_only):
    """The original's use_amp checkpoint has a scaler.pt; resumed here in fp16 (a GradScaler
    on the CPU too), its scale and growth interval carry on."""
    train = {key: value for key, value in NO_AMP.items() if key != "use_amp"} | {"dtype": "fp16"}
    run_dir = make_run(tmp_path / "run", DENSE, train)
    torch.manual_seed(0)
    model = GPTModel(DENSE)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    save_like_the_original(run_dir / "checkpoints", 1, model, optimizer, None, original_meta(4.0, 4.2), scaler=scaler)
    result = run_training(run_dir, train_split_only, "latest", nproc=None)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(latest(run_dir).path / "scaler.pt", weights_only=True)
    assert saved["growth_interval"] == 7 and saved["scale"] <= 1024.0
    # best by the window average: the original's 4.1 is what the next checkpoint had to beat.
    assert latest(run_dir).meta["is_best"] == (latest(run_dir).meta["avg_train_loss"] < 4.1)


# --- every key set of the original's runs/, trained as it stands ---

# CPU-sized: the original's values where they fit, 8 (accumulation: 2) global steps of one
# process; the checkpoint interval (1000) gives checkpoints at step 0 and the last.
CPU_SIZED = {"dataset": "toy", "min_train_tokens": 256, "microbatch_size": 2}
KEY_SETS = {"+".join(keys) or "required only": {**C894ED0, **CPU_SIZED, **{k: C894ED0_VALUES[k] for k in keys}}
            for keys in C894ED0_TRAIN_KEY_SETS}
KEY_SETS["the five legacy runs"] = {**C894ED0_LEGACY, **CPU_SIZED, "validation_interval": 3, "validation_batches": 2,
                                    "start_val_token": 0}


@pytest.mark.parametrize("case", KEY_SETS)
def test_every_key_set_of_the_originals_runs_trains_here(case, tmp_path, datasets_dir):
    train = KEY_SETS[case]
    run_dir = make_run(tmp_path / "run", DENSE, train)
    result = run_training(run_dir, datasets_dir, nproc=None)   # the machine's defaults: no dtype, no seed
    assert result.returncode == 0, result.stderr[-3000:]
    steps = 256 // (2 * 16 * train.get("gradient_accumulation_steps", 1))
    checkpoints = checkpointing.list_checkpoints(run_dir / "checkpoints")
    expected = list(range(0, steps, 3)) + ([steps - 1] if (steps - 1) % 3 else []) if "legacy" in case else [0, steps - 1]
    assert [c.global_step for c in checkpoints] == expected
    meta = latest(run_dir).meta
    validates = "legacy" in case
    # The later original's meta.json keys in every one; the legacy runs validate too.
    assert ("val_loss" in meta) == validates and "avg_train_loss" in meta and meta["seed"] == 42
    if "use_amp" in train:   # false in every run that has it: fp32
        assert meta["dtype"] == "fp32" and "use_amp" not in result.stdout
    else:   # the original's fp16 with a GradScaler is a GPU's: here the CPU's own precision, said in one line
        assert meta["dtype"] == devices.default_dtype_name(torch.device("cpu"))
        assert (f'note: {run_dir / "train.json"}: "use_amp": true means fp16 autocast with a GradScaler on a GPU; '
                f'on cpu this run trains in {meta["dtype"]} instead') in result.stdout
    files = {path.name for path in latest(run_dir).path.iterdir()}
    assert ("scheduler.pt" in files) == ("schedule_learning_rate" in train) and "scaler.pt" not in files
    assert "not used: checkpoint_interval" not in result.stdout


# --- the original's c894ed0 checkpoints in the other scripts ---

GPT2_SIZED = {**DENSE, "vocab_size": 50257, "emb_dim": 16, "context_length": 32}
KINDS = {"dense": GPT2_SIZED, "tied": {**GPT2_SIZED, "tie_weights": True},
         "moe": {**GPT2_SIZED, "moe": {"num_experts": 3, "num_active_experts": 2}}}


@pytest.fixture(scope="module")
def original_checkpoints(tmp_path_factory):
    """model.json + a checkpoint written as the original writes it, for a dense, a tied and
    an MoE model of GPT-2's vocabulary (the scripts use its tokenizer)."""
    root = tmp_path_factory.mktemp("original-checkpoints")
    made = {}
    for kind, config in KINDS.items():
        torch.manual_seed(1)
        model = GPTModel(config)
        optimizer = torch.optim.AdamW(model.parameters())
        (root / kind).mkdir()
        (root / kind / "model.json").write_text(json.dumps(config))
        path = save_like_the_original(root / kind / "checkpoints", 0, model, optimizer, None, original_meta(10.0, 11.0))
        made[kind] = (root / kind / "model.json", path / "model.safetensors", model.eval())
    return made


@pytest.mark.parametrize("kind", KINDS)
def test_smoke_samples_from_the_originals_checkpoints(kind, original_checkpoints):
    model_json, weights, model = original_checkpoints[kind]
    result = run_script("test_smoke.py", model_json, weights, "--temperature", 0, "--num-tokens", 5,
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    prompt = tokenizer.encode("Every effort moves you")
    expected = tokenizer.decode(generate(model, [prompt], 5)[0])
    assert result.stdout == f"Every effort moves you\n{SMOKE_SEPARATOR}\n{expected}\n"


def test_loss_of_an_original_moe_checkpoint(original_checkpoints, tmp_path):
    model_json, weights, model = original_checkpoints["moe"]
    values = torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(2))
    (tmp_path / "tokens").mkdir()
    save_file({"tokens": values.to(torch.int32)}, str(tmp_path / "tokens" / "validation.safetensors"))
    result = run_script("test_loss.py", tmp_path, model_json, weights, "--dataset", tmp_path / "tokens",
                        "--start-token", 0, "--batches", 3, "--batch-size", 2, "--device", "cpu",
                        "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = sum(F.cross_entropy(model(values[i * 64:i * 64 + 64].view(2, 32).long()).flatten(0, 1),
                                       values[i * 64 + 1:i * 64 + 65].long()).item() for i in range(3)) / 3
    loss = float(result.stdout.split("Loss against our test dataset:")[1].split()[0])
    assert loss == pytest.approx(expected, abs=6e-4)   # printed with three decimals, as the original


def test_ift_answers_with_an_original_tied_checkpoint(original_checkpoints, tmp_path):
    model_json, weights, _ = original_checkpoints["tied"]
    records = [{"instruction": f"Say {word}.", "input": "", "output": word} for word in
               ("yes", "no", "maybe", "why", "how", "when", "where", "who", "what", "which") * 2]
    (tmp_path / "instructions.json").write_text(json.dumps(records))
    result = run_script("test_ift.py", model_json, weights, "--data", tmp_path / "instructions.json",
                        "--max-epochs", 0, "--no-judge", "--max-new-tokens", 3, "--results",
                        tmp_path / "results.json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "results.json").read_text())["records"]
    assert len(saved) == 2 and all("response" in record for record in saved)
