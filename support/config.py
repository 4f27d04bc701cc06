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


def _warmup_percent(path, value):
    """Kept as written: the original's warm-up is (steps * percent) // 100, an int for an
    int. Below 100: the cosine that follows needs a step (at 100 torch divides by zero)."""
    if _float(path, "warmup_period_percent", value) >= 100:
        _fail(path, "warmup_period_percent", value, "a number below 100 (the cosine after the warm-up needs a step)")
    return value


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

# train.json comes in two dialects, told apart by the name of the batch key:
#   "bf269c6" (`minibatch_size`): the original as first published; validation every
#       validation_interval steps, `best` by validation loss, our defaults (an automatic
#       precision, DEFAULT_SEED with a stream per rank);
#   "c894ed0" (`microbatch_size`): the original's later main; a checkpoint every
#       checkpoint_interval steps without validation, `best` by the window's average train
#       loss, fp16 with a GradScaler unless "use_amp": false, seed 42 on every rank, its
#       learning-rate schedule and meta.json keys.
# Every key is understood in both; the dialect only decides the defaults. Two keys for
# one thing are refused.
C894ED0_RANDOM_SEED = 42
SAME_THING = [("minibatch_size", "microbatch_size"), ("seed", "random_seed"), ("grad_clip", "clipping_max_norm"),
              ("dtype", "use_amp"), ("lr_schedule", "schedule_learning_rate"),
              ("warmup_steps", "warmup_period_percent"), ("min_learning_rate", "schedule_learning_rate")]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Required in both dialects (the batch key under either name).
    dataset: str                 # Hub dataset repo id, or a local directory of split files
    min_train_tokens: int        # -1: as many whole global batches as fit
    start_train_token: int
    minibatch_size: int          # sequences per rank per micro-step (c894ed0: microbatch_size)
    checkpoint_interval: int     # global steps between checkpoints (validation_interval when validating)
    # Validation: required with validation_interval, unused with checkpoint_interval.
    validation_interval: int | None = None
    validation_batches: int | None = None
    start_val_token: int | None = None
    dialect: str = "bf269c6"               # "bf269c6" | "c894ed0": see above
    # Optional keys; the defaults reproduce the original of the config's dialect.
    learning_rate: float = 0.0004
    weight_decay: float = 0.1
    warmup_steps: int = 0
    lr_schedule: str = "constant"          # "constant" | "cosine" | "original" (schedule_learning_rate)
    min_learning_rate: float = 0.0         # floor of the cosine schedule
    warmup_percent: float = 0              # the original schedule's warm-up, in percent of the run
    grad_clip: float | None = None         # max global gradient norm (c894ed0: clipping_max_norm)
    gradient_accumulation_steps: int = 1
    dtype: str | None = None               # None: bf16 where supported, else fp16 + GradScaler
    use_amp: bool | None = None            # c894ed0's switch: fp16 + GradScaler, else plain fp32
    compile: bool = False
    seed: int = DEFAULT_SEED              # initial weights (and dropout; see seed_each_rank)
    seed_each_rank: bool = True            # ours: rank r's dropout from seed + r; c894ed0's random_seed: one stream
    keep_checkpoints: int | None = None    # newest N kept besides best and latest; None keeps all
    weight_decay_scope: str = "all"        # "all" (the original) | "matrices" (not biases/norms)
    parallelism: str = "ddp"               # "ddp" (the original) | "fsdp" (FSDP2: sharded weights, grads, AdamW)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    init_from: str | None = None           # model.safetensors to start a fresh run from
    moe_balance_loss_weight: float = 0.0   # Switch Transformer's load-balancing loss for a mixture of experts
    # A run that goes wrong (support/health.py): non-finite steps skipped, up to this many in a row.
    max_nonfinite_steps: int = 10
    loss_spike_factor: float = 2.0         # a spike: a loss this many times the mean of the window before it
    loss_spike_window: int = 100           # healthy steps that mean is over
    on_loss_spike: str = "warn"            # "warn" | "rollback" (to the newest checkpoint before, skipping its batches)
    max_rollbacks: int = 3                 # rollbacks a run may make before spikes are only warned of
    preemption_grace_seconds: float = 30   # after a SIGTERM: time to finish the step and checkpoint
    checkpoint_mirror: str | None = None   # a directory or hf://OWNER/NAME that checkpoints are copied to
    log_interval: int = 1                  # global steps per training row of metrics.jsonl
    tensorboard: bool = False              # also write metrics as TensorBoard events
    wandb_project: str | None = None       # also log metrics to this Weights & Biases project
    # lm-eval scores at checkpoints (benchmark_scores.py); no tasks: none, and lm-eval never imported.
    benchmark_tasks: tuple = ()            # lm-eval task, group or tag names
    benchmark_interval: int | None = None  # global steps, a multiple of checkpoint_interval (absent: it)
    benchmark_limit: int = 500             # examples per task: a quick look, not a score to report
    benchmark_include_path: str | None = None  # a directory of task YAML files (relative: to the run directory)
    ignored_keys: tuple = ()               # keys of the file that this config does not use (a note at start-up)

    @property
    def validates(self) -> bool:
        return self.validation_interval is not None


# The keys a file may hold, each with its check; null counts as absent. The rest of the
# function below turns them into TrainConfig's fields.
def _train_checks(path):
    number = lambda key, **kw: lambda v: _float(path, key, v, **kw)  # noqa: E731
    integer = lambda key, minimum: lambda v: _int(path, key, v, minimum=minimum)  # noqa: E731
    flag = lambda key: lambda v: _bool(path, key, v)  # noqa: E731
    text = lambda key: lambda v: _text(path, key, v)  # noqa: E731
    return {
        "dataset": text("dataset"), "min_train_tokens": integer("min_train_tokens", -1),
        "start_train_token": integer("start_train_token", 0), "start_val_token": integer("start_val_token", 0),
        "minibatch_size": integer("minibatch_size", 1), "microbatch_size": integer("microbatch_size", 1),
        "validation_interval": integer("validation_interval", 1), "validation_batches": integer("validation_batches", 1),
        "checkpoint_interval": integer("checkpoint_interval", 1),
        "learning_rate": number("learning_rate", strictly_positive=True), "weight_decay": number("weight_decay"),
        "warmup_steps": integer("warmup_steps", 0),
        "lr_schedule": lambda v: _choice(path, "lr_schedule", v, ("constant", "cosine")),
        "min_learning_rate": number("min_learning_rate"),
        "schedule_learning_rate": flag("schedule_learning_rate"),
        "warmup_period_percent": lambda v: _warmup_percent(path, v),
        "grad_clip": number("grad_clip", strictly_positive=True),
        "clipping_max_norm": number("clipping_max_norm", strictly_positive=True),
        "gradient_accumulation_steps": integer("gradient_accumulation_steps", 1),
        "dtype": lambda v: _choice(path, "dtype", v, ("bf16", "fp16", "fp32")), "use_amp": flag("use_amp"),
        "compile": flag("compile"), "seed": integer("seed", 0), "random_seed": integer("random_seed", 0),
        "keep_checkpoints": integer("keep_checkpoints", 1),
        "weight_decay_scope": lambda v: _choice(path, "weight_decay_scope", v, ("all", "matrices")),
        "parallelism": lambda v: _choice(path, "parallelism", v, ("ddp", "fsdp")),
        "activation_checkpointing": flag("activation_checkpointing"), "init_from": text("init_from"),
        "moe_balance_loss_weight": number("moe_balance_loss_weight"),
        "max_nonfinite_steps": integer("max_nonfinite_steps", 1),
        "loss_spike_factor": lambda v: _float(path, "loss_spike_factor", v, minimum=1, strictly_positive=True),
        "loss_spike_window": integer("loss_spike_window", 1),
        "on_loss_spike": lambda v: _choice(path, "on_loss_spike", v, ("warn", "rollback")),
        "max_rollbacks": integer("max_rollbacks", 0),
        "preemption_grace_seconds": number("preemption_grace_seconds", strictly_positive=True),
        "checkpoint_mirror": text("checkpoint_mirror"),
        "log_interval": integer("log_interval", 1), "tensorboard": flag("tensorboard"),
        "wandb_project": text("wandb_project"),
        "benchmark_tasks": lambda v: _task_names(path, "benchmark_tasks", v),
        "benchmark_interval": integer("benchmark_interval", 1), "benchmark_limit": integer("benchmark_limit", 1),
        "benchmark_include_path": text("benchmark_include_path"),
    }


# The bf269c6 dialect's required keys, as the original first published them.
TRAIN_REQUIRED = ("dataset", "min_train_tokens", "start_train_token", "start_val_token",
                  "minibatch_size", "validation_interval", "validation_batches")


def validate_train_config(data: dict, path="train.json") -> TrainConfig:
    checks = _train_checks(path)
    _check_keys(path, data, (), checks)   # the required keys depend on the dialect: below
    given = {key: check(data[key]) for key, check in checks.items() if data.get(key) is not None}
    # warmup_steps warms up our schedules, and the later original's when it is off (constant).
    scheduled = [("warmup_steps", "schedule_learning_rate")] if given.get("schedule_learning_rate") is True else []
    for ours, theirs in SAME_THING + scheduled:
        if ours in given and theirs in given:
            raise ConfigError(f"{path}: keys '{ours}' and '{theirs}' both set what is one setting: keep one")
    dialect = "c894ed0" if "microbatch_size" in given else "bf269c6"
    interval_key = "checkpoint_interval" if dialect == "c894ed0" else "validation_interval"
    batch_key = "microbatch_size" if dialect == "c894ed0" else "minibatch_size"
    for key in ("dataset", "min_train_tokens", "start_train_token", batch_key):
        if key not in given:
            raise ConfigError(f"{path}: missing key '{key}'")
    if "checkpoint_interval" not in given and "validation_interval" not in given:
        raise ConfigError(f"{path}: missing key '{interval_key}'")
    if given["min_train_tokens"] == 0:
        _fail(path, "min_train_tokens", 0, "-1 (use all) or a positive integer")
    values = {key: given[key] for key in ("dataset", "min_train_tokens", "start_train_token")}
    values.update(minibatch_size=given[batch_key], dialect=dialect)
    ignored = []
    if "checkpoint_interval" in given:
        # As at c894ed0: checkpoints without validation; the validation keys are not read.
        values["checkpoint_interval"] = given["checkpoint_interval"]
        ignored = [key for key in ("validation_interval", "validation_batches") if key in given]
    else:
        for key in ("validation_batches", "start_val_token"):
            if key not in given:
                raise ConfigError(f"{path}: missing key '{key}' (validation_interval asks for validation)")
        values.update(checkpoint_interval=given["validation_interval"], validation_interval=given["validation_interval"],
                      validation_batches=given["validation_batches"], start_val_token=given["start_val_token"])
    values.update(_optional_train_values(path, given, dialect))
    values["ignored_keys"] = tuple(ignored)
    return _checked_together(path, TrainConfig(**values))


# Keys that are TrainConfig fields of the same name and meaning in both dialects.
_SAME_NAMED = ("learning_rate", "weight_decay", "warmup_steps", "lr_schedule", "min_learning_rate", "grad_clip",
               "gradient_accumulation_steps", "dtype", "use_amp", "compile", "seed", "keep_checkpoints",
               "weight_decay_scope", "parallelism", "activation_checkpointing", "init_from",
               "moe_balance_loss_weight", "max_nonfinite_steps", "loss_spike_factor", "loss_spike_window",
               "on_loss_spike", "max_rollbacks", "preemption_grace_seconds", "checkpoint_mirror",
               "log_interval", "tensorboard", "wandb_project", "benchmark_tasks",
               "benchmark_interval", "benchmark_limit", "benchmark_include_path")


def _optional_train_values(path, given: dict, dialect: str) -> dict:
    values = {key: given[key] for key in _SAME_NAMED if key in given}
    if "clipping_max_norm" in given:
        values["grad_clip"] = given["clipping_max_norm"]
    if given.get("schedule_learning_rate"):
        values.update(lr_schedule="original", warmup_percent=given.get("warmup_period_percent", 0))
    elif "warmup_period_percent" in given:
        raise ConfigError(f"{path}: key 'warmup_period_percent' needs \"schedule_learning_rate\": true")
    if dialect == "c894ed0" and "dtype" not in given:
        values["use_amp"] = given.get("use_amp", True)   # the later original's default
    if "random_seed" in given or (dialect == "c894ed0" and "seed" not in given):
        # The later original: one seed for every rank (Python's `random` too).
        values.update(seed=given.get("random_seed", C894ED0_RANDOM_SEED), seed_each_rank=False)
    return values


def _checked_together(path, config: TrainConfig) -> TrainConfig:
    if config.checkpoint_mirror is not None:
        from .mirror_targets import parse_target   # no torch: the mirror's copier imports only that

        try:
            parse_target(config.checkpoint_mirror, run_dir=Path(path).parent)
        except ValueError as error:
            raise ConfigError(f"{path}: key 'checkpoint_mirror' {error}") from None
    interval = config.benchmark_interval or config.checkpoint_interval
    if interval % config.checkpoint_interval:
        # Benchmarks score the weights a checkpoint has just saved.
        key = "validation_interval" if config.validates else "checkpoint_interval"
        raise ConfigError(
            f"{path}: key 'benchmark_interval' must be a multiple of '{key}' "
            f"({config.checkpoint_interval}): benchmarks score checkpoints, got {interval}")
    config = dataclasses.replace(config, benchmark_interval=interval)
    if config.min_learning_rate > config.learning_rate:
        raise ConfigError(
            f"{path}: key 'min_learning_rate' ({config.min_learning_rate}) must not exceed "
            f"'learning_rate' ({config.learning_rate})"
        )
    if config.parallelism == "fsdp" and (config.dtype == "fp16" or config.use_amp):
        # FSDP2 mixes precision through its own policy; fp16 would also need a sharded
        # gradient scaler, which we don't carry.
        if config.dtype == "fp16":
            said, instead = "key 'dtype' is \"fp16\" (fp16 with a GradScaler)", '"dtype": "bf16" or "fp32"'
        else:   # written, or the default of a train.json with microbatch_size
            said = "key 'use_amp' is true (fp16 with a GradScaler; unset, the default where microbatch_size is used)"
            instead = '"use_amp": false (fp32) or "dtype": "bf16"'
        raise ConfigError(f"{path}: {said}, which 'parallelism' \"fsdp\" does not support; use {instead}")
    return config


def load_train_config(path) -> TrainConfig:
    return validate_train_config(read_json_object(path), path)
