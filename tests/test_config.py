import json

import pytest

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
