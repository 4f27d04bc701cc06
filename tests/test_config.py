import json
import re

import pytest

from original_c894ed0 import C894ED0, C894ED0_TRAIN_KEY_SETS, C894ED0_VALUES
from support.config import ConfigError, load_model_config, load_train_config

GOOD_MODEL = dict(vocab_size=50257, emb_dim=768, context_length=1024, n_heads=12, n_layers=12,
                  drop_rate=0.1, qkv_bias=False)
GOOD_TRAIN = dict(dataset="gpjt/fineweb-edu-gpt2-tokens", min_train_tokens=-1, start_train_token=0,
                  start_val_token=50000000, minibatch_size=6, validation_interval=100,
                  validation_batches=100)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_seed_configs_load(tmp_path):
    assert load_model_config(write(tmp_path, "model.json", GOOD_MODEL)) == GOOD_MODEL
    train = load_train_config(write(tmp_path, "train.json", GOOD_TRAIN))
    assert train.minibatch_size == 6 and train.learning_rate == 0.0004 and train.weight_decay == 0.1
    assert train.lr_schedule == "constant" and train.dtype is None and train.grad_clip is None
    # No benchmarks unless asked for; asked for, every checkpoint is scored on 500 examples a task.
    assert train.benchmark_tasks == () and train.benchmark_limit == 500 and train.benchmark_include_path is None
    assert train.benchmark_interval == train.validation_interval
    benchmarked = load_train_config(write(tmp_path, "train.json", {**GOOD_TRAIN, "benchmark_tasks": [" hellaswag"],
                                                                   "benchmark_interval": 300}))
    assert benchmarked.benchmark_tasks == ("hellaswag",) and benchmarked.benchmark_interval == 300


@pytest.mark.parametrize("change, fragment", [
    ({"emb_dim": None}, "missing key 'emb_dim'"),
    ({"n_embd": 768}, "unknown key 'n_embd'"),
    ({"emb_dim": "768"}, "key 'emb_dim' must be an integer, got \"768\""),
    ({"n_layers": True}, "key 'n_layers' must be an integer, got true"),
    ({"n_heads": 0}, "key 'n_heads' must be an integer >= 1, got 0"),
    ({"vocab_size": 3.5}, "key 'vocab_size' must be an integer, got 3.5"),
    ({"n_heads": 5}, "key 'emb_dim' (768) must be divisible by 'n_heads' (5)"),
    ({"drop_rate": 1.0}, "key 'drop_rate' must be a number in [0, 1), got 1.0"),
    ({"drop_rate": -0.1}, "key 'drop_rate' must be a number in [0, 1), got -0.1"),
    ({"qkv_bias": "no"}, "key 'qkv_bias' must be true or false, got \"no\""),
])
def test_model_config_errors_name_file_key_and_value(tmp_path, change, fragment):
    data = {**GOOD_MODEL, **change}
    data = {key: value for key, value in data.items() if value is not None}
    path = write(tmp_path, "model.json", data)
    with pytest.raises(ConfigError) as error:
        load_model_config(path)
    assert error.value.message.startswith(f"{path}: ")
    assert fragment in error.value.message


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_unreadable_config_files(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_model_config(write(tmp_path, "model.json", text))
    with pytest.raises(ConfigError, match="file not found"):
        load_model_config(tmp_path / "absent.json")


@pytest.mark.parametrize("change, fragment", [
    ({"minibatch_size": None}, "missing key 'minibatch_size'"),
    ({"min_train_tokens": 0}, "key 'min_train_tokens' must be -1 (use all) or a positive integer"),
    ({"min_train_tokens": -2}, "key 'min_train_tokens' must be an integer >= -1, got -2"),
    ({"dataset": ""}, "key 'dataset' must be a non-empty string"),
    ({"learning_rate": 0}, "key 'learning_rate' must be a number > 0.0, got 0"),
    ({"lr_schedule": "linear"}, "key 'lr_schedule' must be one of \"constant\", \"cosine\""),
    ({"dtype": "float16"}, "key 'dtype' must be one of \"bf16\", \"fp16\", \"fp32\""),
    ({"min_learning_rate": 0.01}, "key 'min_learning_rate' (0.01) must not exceed 'learning_rate'"),
    ({"gradient_accumulation_steps": 0}, "must be an integer >= 1, got 0"),
    ({"validation_intervall": 5}, "unknown key 'validation_intervall'"),
    ({"benchmark_tasks": "hellaswag"}, "key 'benchmark_tasks' must be a list of lm-eval task names (strings), "
                                       "got \"hellaswag\""),
    ({"benchmark_tasks": ["hellaswag", ""]}, "key 'benchmark_tasks' must be a list of lm-eval task names"),
    ({"benchmark_tasks": ["hellaswag,arc_easy"]}, "must be one task name per entry (split \"hellaswag,arc_easy\""),
    ({"benchmark_tasks": ["piqa", " piqa"]}, "a list that names each task once (\"piqa\" is there twice)"),
    ({"benchmark_interval": 0}, "key 'benchmark_interval' must be an integer >= 1, got 0"),
    ({"benchmark_interval": 150}, "key 'benchmark_interval' must be a multiple of 'validation_interval' (100): "
                                  "benchmarks score checkpoints, got 150"),
    ({"benchmark_limit": 0}, "key 'benchmark_limit' must be an integer >= 1, got 0"),
    ({"benchmark_include_path": ""}, "key 'benchmark_include_path' must be a non-empty string"),
])
def test_train_config_errors_name_file_key_and_value(tmp_path, change, fragment):
    data = {**GOOD_TRAIN, **change}
    data = {key: value for key, value in data.items() if value is not None}
    path = write(tmp_path, "train.json", data)
    with pytest.raises(ConfigError) as error:
        load_train_config(path)
    assert error.value.message.startswith(f"{path}: ")
    assert fragment in error.value.message


# --- the later original's dialect (c894ed0: microbatch_size) ---

@pytest.mark.parametrize("keys", C894ED0_TRAIN_KEY_SETS, ids=lambda keys: "+".join(keys) or "required only")
def test_every_key_set_of_the_originals_runs_means_what_it_meant_there(keys, tmp_path):
    config = load_train_config(write(tmp_path, "train.json", {**C894ED0, **{key: C894ED0_VALUES[key] for key in keys}}))
    given = set(keys)
    assert config.dialect == "c894ed0" and config.minibatch_size == 13 and not config.validates
    assert config.checkpoint_interval == 1000 and config.validation_batches is None
    assert config.learning_rate == (0.0014 if "learning_rate" in given else 0.0004)
    assert config.weight_decay == (0.05 if "weight_decay" in given else 0.1)
    assert config.gradient_accumulation_steps == (4 if "gradient_accumulation_steps" in given else 1)
    assert config.grad_clip == (1.0 if "clipping_max_norm" in given else None)
    assert (config.lr_schedule, config.warmup_percent) == (("original", 5) if "schedule_learning_rate" in given
                                                           else ("constant", 0))
    assert config.use_amp is ("use_amp" not in given)          # the original's default: fp16 with a scaler
    assert config.dtype is None and (config.seed, config.seed_each_rank) == (42, False)


def test_the_five_legacy_runs_validate_as_the_first_original_did(tmp_path):
    # microbatch_size but validation_interval: these crash in the original at c894ed0.
    legacy = {key: value for key, value in C894ED0.items() if key != "checkpoint_interval"}
    config = load_train_config(write(tmp_path, "train.json", {**legacy, "validation_interval": 100,
                                                              "validation_batches": 100}))
    assert config.dialect == "c894ed0" and config.validates
    assert (config.checkpoint_interval, config.validation_batches, config.start_val_token) == (100, 100, 50_000_000)
    with pytest.raises(ConfigError, match="missing key 'validation_batches'"):
        load_train_config(write(tmp_path, "train.json", {**legacy, "validation_interval": 100}))
    with pytest.raises(ConfigError, match=r"train.json: missing key 'checkpoint_interval'$"):
        load_train_config(write(tmp_path, "train.json", legacy))


def test_the_models_of_the_originals_runs(tmp_path):
    dense = {**GOOD_MODEL, "context_length": 1024}
    assert load_model_config(write(tmp_path, "model.json", dense)) == dense
    tied = load_model_config(write(tmp_path, "model.json", {**dense, "tie_weights": True}))
    assert tied["tie_weights"] is True
    moe = {"num_experts": 8, "num_active_experts": 2, "log_moe_balance_file": "runs/x/balance.jsonl"}
    assert load_model_config(write(tmp_path, "model.json", {**dense, "moe": moe}))["moe"] == moe
    for bad, message in (({"num_experts": 8, "num_active_experts": 1}, "must be at least 2, got 1"),
                         ({"num_experts": 2, "num_active_experts": 3}, "(3) is larger than 'num_experts' (2)"),
                         ({"num_experts": 8}, "missing key 'num_active_experts'"),
                         ([8, 2], "must be an object")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_model_config(write(tmp_path, "model.json", {**dense, "moe": bad}))


@pytest.mark.parametrize("ours, theirs", [("minibatch_size", "microbatch_size"), ("seed", "random_seed"),
                                          ("grad_clip", "clipping_max_norm"), ("dtype", "use_amp"),
                                          ("lr_schedule", "schedule_learning_rate"),
                                          ("warmup_steps", "warmup_period_percent"),
                                          ("warmup_steps", "schedule_learning_rate")])
def test_two_keys_for_one_thing_are_refused(ours, theirs, tmp_path):
    values = {"minibatch_size": 13, "microbatch_size": 13, "seed": 1, "random_seed": 1, "grad_clip": 1.0,
              "clipping_max_norm": 1.0, "dtype": "fp32", "use_amp": False, "lr_schedule": "cosine",
              "schedule_learning_rate": True, "warmup_steps": 10, "warmup_period_percent": 5}
    data = {**C894ED0, ours: values[ours], theirs: values[theirs]}
    if theirs == "warmup_period_percent":
        data["schedule_learning_rate"] = True
    with pytest.raises(ConfigError, match=f"keys '{ours}' and '{theirs}' both set what is one setting"):
        load_train_config(write(tmp_path, "train.json", data))


def test_warmup_steps_beside_the_originals_schedule_switched_off_is_ours(tmp_path):
    # "schedule_learning_rate": false is a constant learning rate, which warmup_steps warms up.
    config = load_train_config(write(tmp_path, "train.json", {**C894ED0, "schedule_learning_rate": False,
                                                              "warmup_steps": 3}))
    assert (config.lr_schedule, config.warmup_steps) == ("constant", 3)


@pytest.mark.parametrize("percent", [100, 150.0])
def test_a_warmup_of_the_whole_run_is_refused(percent, tmp_path):
    # At 100 the original's cosine has no step left: torch divided by zero after the last step.
    with pytest.raises(ConfigError, match=re.escape(f"key 'warmup_period_percent' must be a number below 100 "
                                                    f"(the cosine after the warm-up needs a step), got {percent}")):
        load_train_config(write(tmp_path, "train.json", {**C894ED0, "schedule_learning_rate": True,
                                                         "warmup_period_percent": percent}))
    assert load_train_config(write(tmp_path, "train.json", {**C894ED0, "schedule_learning_rate": True,
                                                            "warmup_period_percent": 0})).warmup_percent == 0


def test_our_keys_work_in_the_later_dialect(tmp_path):
    config = load_train_config(write(tmp_path, "train.json", {**C894ED0, "dtype": "bf16", "seed": 7,
                                                              "grad_clip": 0.5, "keep_checkpoints": 3}))
    # Our seed keeps its meaning (a stream per rank); dtype replaces use_amp's default.
    assert (config.dtype, config.use_amp, config.seed, config.seed_each_rank) == ("bf16", None, 7, True)
    assert config.grad_clip == 0.5 and config.keep_checkpoints == 3
    # And the later original's in the first: random_seed means one seed for every rank.
    first = load_train_config(write(tmp_path, "train.json", {**GOOD_TRAIN, "random_seed": 3}))
    assert first.dialect == "bf269c6" and (first.seed, first.seed_each_rank) == (3, False) and first.use_amp is None


def test_fsdp_refuses_fp16_naming_where_it_came_from(tmp_path):
    # The later dialect's use_amp defaults to true: the line says so, and what to write instead.
    with pytest.raises(ConfigError, match=re.escape(
            "key 'use_amp' is true (fp16 with a GradScaler; unset, the default where microbatch_size is used), "
            "which 'parallelism' \"fsdp\" does not support; use \"use_amp\": false (fp32) or \"dtype\": \"bf16\"")):
        load_train_config(write(tmp_path, "train.json", {**C894ED0, "parallelism": "fsdp"}))
    with pytest.raises(ConfigError, match=re.escape("key 'dtype' is \"fp16\" (fp16 with a GradScaler), which")):
        load_train_config(write(tmp_path, "train.json", {**GOOD_TRAIN, "parallelism": "fsdp", "dtype": "fp16"}))
    assert load_train_config(write(tmp_path, "train.json", {**C894ED0, "parallelism": "fsdp",
                                                            "use_amp": False})).parallelism == "fsdp"
