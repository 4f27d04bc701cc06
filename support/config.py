"""Reading and validating `model.json` and `train.json`: every key, type, range and default.

This is the one place that knows the config keys. Everything else receives
validated values, so a typo in a run's config fails here, at start-up, with a
message naming the file, the key and the value -- not an hour into training.
"""

import dataclasses
import json
import math
from pathlib import Path

import click

# Without "seed" a run is still reproducible: it takes PyTorch's default seed, the one
# every new torch.Generator starts from. (The original scripts never seeded; PyTorch seeds
# its global generator from the OS at start-up, so their runs began from other weights
# every time, and no default can give theirs back.)
DEFAULT_SEED = 67280421310721


class ConfigError(click.ClickException):
    """A user mistake in a config file; click prints it as one line and exits 1."""


def read_json_object(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of keys, got {type(data).__name__}")
    return data


# --- checks for one value; each returns the value or raises with file, key and value ---

def _fail(path, key, value, wanted):
    raise ConfigError(f"{path}: key '{key}' must be {wanted}, got {json.dumps(value)}")


def _int(path, key, value, minimum=None):
    # JSON true/false arrive as bool, which Python counts as int: refuse them.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, key, value, "an integer")
    if minimum is not None and value < minimum:
        _fail(path, key, value, f"an integer >= {minimum}")
    return value


def _float(path, key, value, minimum=0.0, strictly_positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(path, key, value, "a number")
    if value < minimum or (strictly_positive and value <= 0):
        _fail(path, key, value, f"a number {'>' if strictly_positive else '>='} {minimum}")
    return float(value)


def _bool(path, key, value):
    if not isinstance(value, bool):
        _fail(path, key, value, "true or false")
    return value


def _choice(path, key, value, choices):
    if value not in choices:
        _fail(path, key, value, "one of " + ", ".join(json.dumps(c) for c in choices))
    return value


def _text(path, key, value):
    if not isinstance(value, str) or not value.strip():
        _fail(path, key, value, "a non-empty string")
    return value


def _task_names(path, key, value):
    """A list of lm-eval task names, one a string, each once."""
    if not isinstance(value, list) or not all(isinstance(name, str) and name.strip() for name in value):
        _fail(path, key, value, "a list of lm-eval task names (strings)")
    names = [name.strip() for name in value]
    for name in names:
        if "," in name:
            # test_benchmarks.py's --tasks takes "a,b"; here each name is an entry of its own.
            _fail(path, key, value, f"one task name per entry (split {json.dumps(name)} into several)")
    repeated = [name for index, name in enumerate(names) if name in names[:index]]
    if repeated:
        _fail(path, key, value, f"a list that names each task once ({json.dumps(repeated[0])} is there twice)")
    return tuple(names)


def _check_keys(path, data, required, optional=()):
    missing = [key for key in required if key not in data]
    if missing:
        raise ConfigError(f"{path}: missing key '{missing[0]}'")
    known = set(required) | set(optional)
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(
            f"{path}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(known))})"
        )


# --- model.json ---

MODEL_KEYS = ("vocab_size", "emb_dim", "context_length", "n_heads", "n_layers", "drop_rate", "qkv_bias")
# The later original's options (c894ed0); absent, or null, they are off. They are kept in
# the config only when the file gives them, so that a plain model's config stays as it was.
OPTIONAL_MODEL_KEYS = ("tie_weights", "moe")
MOE_KEYS = ("num_experts", "num_active_experts")
IGNORED_MOE_KEYS = ("log_moe_balance_file",)   # read but unused by the original at c894ed0


def validate_model_config(data: dict, path="model.json") -> dict:
    """The model keys, checked; returns the plain dict GPTModel(cfg) takes."""
    _check_keys(path, data, MODEL_KEYS, OPTIONAL_MODEL_KEYS)
    cfg = {key: _int(path, key, data[key], minimum=1)
           for key in ("vocab_size", "emb_dim", "context_length", "n_heads", "n_layers")}
    drop_rate = data["drop_rate"]
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
        _fail(path, "drop_rate", drop_rate, "a number in [0, 1)")
    cfg["drop_rate"] = float(drop_rate)
    cfg["qkv_bias"] = _bool(path, "qkv_bias", data["qkv_bias"])
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ConfigError(
            f"{path}: key 'emb_dim' ({cfg['emb_dim']}) must be divisible by "
            f"'n_heads' ({cfg['n_heads']})"
        )
    if data.get("tie_weights") is not None:
        cfg["tie_weights"] = _bool(path, "tie_weights", data["tie_weights"])
    if data.get("moe") is not None:
        cfg["moe"] = _moe(path, data["moe"])
    return cfg


def _moe(path, value) -> dict:
    """model.json's "moe" block: every block's feed-forward a mixture of num_experts
    experts, num_active_experts of them per token (the original's checks: 2 <= k <= E)."""
    if not isinstance(value, dict):
        _fail(path, "moe", value, 'an object like {"num_experts": 8, "num_active_experts": 2}')
    where = f"{path}: key 'moe'"
    _check_keys(where, value, MOE_KEYS, IGNORED_MOE_KEYS)
    moe = {key: _int(where, key, value[key], minimum=1) for key in MOE_KEYS}
    experts, active = moe["num_experts"], moe["num_active_experts"]
    if active < 2:
        raise ConfigError(f"{where}: 'num_active_experts' must be at least 2, got {active} "
                          f"(with one, the router would never learn)")
    if active > experts:
        raise ConfigError(f"{where}: 'num_active_experts' ({active}) is larger than 'num_experts' ({experts})")
    if value.get("log_moe_balance_file") is not None:
        moe["log_moe_balance_file"] = _text(where, "log_moe_balance_file", value["log_moe_balance_file"])
    return moe


def load_model_config(path) -> dict:
    return validate_model_config(read_json_object(path), path)


# --- train.json ---

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # The seed's keys, all required as in the seed.
    dataset: str                 # Hub dataset repo id, or a local directory of split files
    min_train_tokens: int        # -1: as many whole global batches as fit
    start_train_token: int
    start_val_token: int
    minibatch_size: int          # sequences per rank per micro-step
    validation_interval: int     # global steps between validation + checkpoint
    validation_batches: int
    # Optional keys; the defaults reproduce the seed.
    learning_rate: float = 0.0004
    weight_decay: float = 0.1
    warmup_steps: int = 0
    lr_schedule: str = "constant"          # "constant" | "cosine"
    min_learning_rate: float = 0.0         # floor of the cosine schedule
    grad_clip: float | None = None         # max global gradient norm
    gradient_accumulation_steps: int = 1
    dtype: str | None = None               # None: bf16 where supported, else fp16 + GradScaler
    compile: bool = False
    seed: int = DEFAULT_SEED              # initial weights; seed + rank drives each rank's dropout
    keep_checkpoints: int | None = None    # newest N kept besides best and latest; None keeps all
    weight_decay_scope: str = "all"        # "all" (the seed) | "matrices" (not biases/norms)
    parallelism: str = "ddp"               # "ddp" (the seed) | "fsdp" (FSDP2: sharded weights, grads, AdamW)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    init_from: str | None = None           # model.safetensors to start a fresh run from
    log_interval: int = 1                  # global steps per training row of metrics.jsonl
    tensorboard: bool = False              # also write metrics as TensorBoard events
    wandb_project: str | None = None       # also log metrics to this Weights & Biases project
    # lm-eval scores at checkpoints (benchmark_scores.py); no tasks: none, and lm-eval never imported.
    benchmark_tasks: tuple = ()            # lm-eval task, group or tag names
    benchmark_interval: int | None = None  # global steps, a multiple of validation_interval (absent: it)
    benchmark_limit: int = 500             # examples per task: a quick look, not a score to report
    benchmark_include_path: str | None = None  # a directory of task YAML files (relative: to the run directory)


TRAIN_REQUIRED = ("dataset", "min_train_tokens", "start_train_token", "start_val_token",
                  "minibatch_size", "validation_interval", "validation_batches")
TRAIN_OPTIONAL = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in TRAIN_REQUIRED)


def validate_train_config(data: dict, path="train.json") -> TrainConfig:
    _check_keys(path, data, TRAIN_REQUIRED, TRAIN_OPTIONAL)
    values = {
        "dataset": _text(path, "dataset", data["dataset"]),
        "min_train_tokens": _int(path, "min_train_tokens", data["min_train_tokens"], minimum=-1),
        "start_train_token": _int(path, "start_train_token", data["start_train_token"], minimum=0),
        "start_val_token": _int(path, "start_val_token", data["start_val_token"], minimum=0),
        "minibatch_size": _int(path, "minibatch_size", data["minibatch_size"], minimum=1),
        "validation_interval": _int(path, "validation_interval", data["validation_interval"], minimum=1),
        "validation_batches": _int(path, "validation_batches", data["validation_batches"], minimum=1),
    }
    if values["min_train_tokens"] == 0:
        _fail(path, "min_train_tokens", 0, "-1 (use all) or a positive integer")
    # Optional keys: null counts as absent.
    checks = {
        "learning_rate": lambda v: _float(path, "learning_rate", v, strictly_positive=True),
        "weight_decay": lambda v: _float(path, "weight_decay", v),
        "warmup_steps": lambda v: _int(path, "warmup_steps", v, minimum=0),
        "lr_schedule": lambda v: _choice(path, "lr_schedule", v, ("constant", "cosine")),
        "min_learning_rate": lambda v: _float(path, "min_learning_rate", v),
        "grad_clip": lambda v: _float(path, "grad_clip", v, strictly_positive=True),
        "gradient_accumulation_steps": lambda v: _int(path, "gradient_accumulation_steps", v, minimum=1),
        "dtype": lambda v: _choice(path, "dtype", v, ("bf16", "fp16", "fp32")),
        "compile": lambda v: _bool(path, "compile", v),
        "seed": lambda v: _int(path, "seed", v, minimum=0),
        "keep_checkpoints": lambda v: _int(path, "keep_checkpoints", v, minimum=1),
        "weight_decay_scope": lambda v: _choice(path, "weight_decay_scope", v, ("all", "matrices")),
        "parallelism": lambda v: _choice(path, "parallelism", v, ("ddp", "fsdp")),
        "activation_checkpointing": lambda v: _bool(path, "activation_checkpointing", v),
        "init_from": lambda v: _text(path, "init_from", v),
        "log_interval": lambda v: _int(path, "log_interval", v, minimum=1),
        "tensorboard": lambda v: _bool(path, "tensorboard", v),
        "wandb_project": lambda v: _text(path, "wandb_project", v),
        "benchmark_tasks": lambda v: _task_names(path, "benchmark_tasks", v),
        "benchmark_interval": lambda v: _int(path, "benchmark_interval", v, minimum=1),
        "benchmark_limit": lambda v: _int(path, "benchmark_limit", v, minimum=1),
        "benchmark_include_path": lambda v: _text(path, "benchmark_include_path", v),
    }
    for key, check in checks.items():
        if data.get(key) is not None:
            values[key] = check(data[key])
    interval = values.setdefault("benchmark_interval", values["validation_interval"])
    if interval % values["validation_interval"]:
        # Benchmarks score the weights a checkpoint has just saved.
        raise ConfigError(
            f"{path}: key 'benchmark_interval' must be a multiple of 'validation_interval' "
            f"({values['validation_interval']}): benchmarks score checkpoints, got {interval}")
    config = TrainConfig(**values)
    if config.min_learning_rate > config.learning_rate:
        raise ConfigError(
            f"{path}: key 'min_learning_rate' ({config.min_learning_rate}) must not exceed "
            f"'learning_rate' ({config.learning_rate})"
        )
    if config.parallelism == "fsdp" and config.dtype == "fp16":
        # FSDP2 mixes precision through its own policy; fp16 would also need a sharded
        # gradient scaler, which we don't carry.
        raise ConfigError(f"{path}: key 'dtype' is \"fp16\", which 'parallelism' \"fsdp\" does "
                          f"not support; use \"bf16\" or \"fp32\"")
    return config


def load_train_config(path) -> TrainConfig:
    return validate_train_config(read_json_object(path), path)
