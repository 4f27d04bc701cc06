"""model.safetensors in and out: reading weights with clear errors, checking them against
model.json, loading them into a GPTModel; and .pt files read without running pickled code.

model.safetensors records the model config it was written for in its metadata (JSON
under "model_config"), so weights are refused by a model.json of another architecture
even where the tensor shapes agree (another n_heads); files without it (the original
scripts', import_hf.py's) still load, checked by their tensors' names and shapes.

Nothing here needs pickle to run code: `.pt` files hold only tensors and plain values
and are read with `torch.load(..., weights_only=True)`; a damaged one is called corrupt,
never answered with torch's advice to load it with weights_only=False.
"""

import errno
import json
import re
from pathlib import Path

import click
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gpt import GPTModel

from .config import MODEL_KEYS, OPTIONAL_MODEL_KEYS, ConfigError, load_model_config


class CheckpointError(click.ClickException):
    """A missing, corrupt or mismatched weights/checkpoint file; printed as one line, exit 1."""


MODEL_FILE = "model.safetensors"
# model.safetensors' metadata key holding the model config (as JSON) the weights were
# written for; the model.json keys the weights depend on (dropout is no part of them).
CONFIG_METADATA_KEY = "model_config"
WEIGHT_CONFIG_KEYS = tuple(key for key in MODEL_KEYS if key != "drop_rate") + OPTIONAL_MODEL_KEYS
# A tied model's one matrix is saved once, under the name safetensors' save_model keeps
# (the alphabetically first), with its metadata naming the other: as the original saves it.
TIED_PAIR = ("tok_emb.weight", "out_head.weight")
SAVED_TIED_NAME, DROPPED_TIED_NAME = "out_head.weight", "tok_emb.weight"


def weight_config_value(model_config: dict, key):
    """What a model config says of a key the weights depend on: absent options are off,
    and of a mixture of experts only its shape counts (the original's log file does not)."""
    value = model_config.get(key)
    if key == "tie_weights":
        return bool(value)
    if key == "moe" and value is not None:
        return {name: value.get(name) for name in ("num_experts", "num_active_experts")}
    return value


def tensors_to_save(state_dict: dict, model_config: dict) -> tuple[dict, dict]:
    """(tensors, metadata entries) of a model.safetensors for this state dict: a tied
    model's shared matrix once, as out_head.weight, with the original's alias entry."""
    if not model_config.get("tie_weights"):
        return state_dict, {}
    tensors = {key: tensor for key, tensor in state_dict.items() if key != DROPPED_TIED_NAME}
    return tensors, {DROPPED_TIED_NAME: SAVED_TIED_NAME}


def with_tied_names(state_dict: dict, model_config: dict, path) -> dict:
    """A state dict read from a file, with both names of a tied model's matrix (a tied file
    holds it once); a file of tied weights for an untied model.json is refused by name."""
    has = [name in state_dict for name in TIED_PAIR]
    if model_config.get("tie_weights"):
        if all(has) and not torch.equal(state_dict[TIED_PAIR[0]], state_dict[TIED_PAIR[1]]):
            raise CheckpointError(f"{path}: tok_emb.weight and out_head.weight differ, but the model config "
                                  f"ties them (\"tie_weights\": true): these are an untied model's weights")
        if any(has) and not all(has):
            present = TIED_PAIR[has.index(True)]
            state_dict = {**state_dict, TIED_PAIR[has.index(False)]: state_dict[present]}
    elif has == [False, True] and len(state_dict) > 1:
        raise CheckpointError(f"{path}: holds out_head.weight but no tok_emb.weight: the weights of a tied "
                              f"model (set \"tie_weights\": true in its model.json)")
    return state_dict


def read_weights(path) -> dict:
    """The tensors of a safetensors file, with errors a user understands."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def check_state_dict(state_dict: dict, shapes: dict, path, may_be_missing=()) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor.

    `shapes` maps every tensor name of the model to its shape: read off a model, or
    worked out from its config where building the model just to check would be slow.
    """
    for key, shape in shapes.items():
        if key not in state_dict:
            if key in may_be_missing:
                continue
            raise CheckpointError(f"{path}: tensor '{key}' is missing")
        if tuple(state_dict[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor '{key}' has shape {tuple(state_dict[key].shape)}, "
                f"but the model config needs {tuple(shape)}"
            )
    for key in state_dict:
        if key not in shapes:
            raise CheckpointError(f"{path}: unexpected tensor '{key}' for this model config")


def model_shapes(model: torch.nn.Module) -> dict:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def weights_model_config(weights_path) -> dict | None:
    """The model config a safetensors file was written for (kept in its metadata since
    checkpoints record it), or None for a file without one: the original scripts',
    import_hf.py's, and ours from before."""
    path = Path(weights_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: metadata '{CONFIG_METADATA_KEY}' is not a JSON object")
    return config


def check_weights_config(weights_path, model_config: dict, model_config_path=None) -> None:
    """Refuse weights written for another model than `model_config` (read from
    model_config_path, named in the message). Tensor shapes can't tell every difference:
    other n_heads over the same emb_dim have the same shapes and give other text."""
    written_for = weights_model_config(weights_path)
    if written_for is None:
        return  # nothing recorded: the shapes are all there is to check
    for key in WEIGHT_CONFIG_KEYS:
        theirs, ours = weight_config_value(written_for, key), weight_config_value(model_config, key)
        if (key in written_for or key in OPTIONAL_MODEL_KEYS) and theirs != ours:
            where = model_config_path if model_config_path is not None else "the model"
            raise CheckpointError(f"{weights_path} was written for {key} {json.dumps(theirs)}, "
                                  f"{where} has {json.dumps(ours)}")


def load_weights_into(model: GPTModel, weights_path, *, model_config_path=None) -> None:
    """Load a model.safetensors strictly into `model`, naming the file and tensor on mismatch.

    Weights that record the model config they were written for are refused by a model
    of another config; model_config_path, the model.json `model` was built from, is named
    in that message."""
    state_dict = read_weights(weights_path)
    if getattr(model, "cfg", None) is not None:
        check_weights_config(weights_path, model.cfg, model_config_path)
        state_dict = with_tied_names(state_dict, model.cfg, weights_path)
    # A file without the causal-mask buffers (ours always write them) is still usable.
    for key, buffer in model.state_dict().items():
        if key.endswith(".att.mask") and key not in state_dict:
            state_dict[key] = buffer
    check_state_dict(state_dict, model_shapes(model), weights_path)
    model.load_state_dict(state_dict, strict=True)


def load_model(model_config_path, weights_path, device="cpu") -> GPTModel:
    """A GPTModel built from model.json with weights from a safetensors file, in eval mode."""
    model = GPTModel(load_model_config(model_config_path))
    load_weights_into(model, weights_path, model_config_path=model_config_path)
    return model.to(device).eval()


def initial_weights_file(run_dir: Path, init_from: str, model_config: dict) -> Path:
    """train.json's init_from: a model.safetensors (relative paths are relative to the run
    directory) whose sibling model.json describes the same model as the run's."""
    weights_path = run_dir / Path(init_from).expanduser()
    where = f"{run_dir / 'train.json'}: key 'init_from'"
    if not weights_path.is_file():
        raise ConfigError(f"{where}: {weights_path} does not exist")
    their_config = load_model_config(weights_path.parent / "model.json")
    # drop_rate is no part of the weights: a run may train them with its own.
    different = [key for key in model_config
                 if key != "drop_rate" and their_config.get(key) != model_config[key]]
    if different:
        key = different[0]
        raise ConfigError(f"{where}: {weights_path.parent / 'model.json'} has {key} "
                          f"{their_config.get(key)!r}, {run_dir / 'model.json'} has {model_config[key]!r}; "
                          f"the weights fit only the model they were written for")
    return weights_path


# --- .pt files ---

CORRUPT_FILE = "not a valid checkpoint file (corrupt or truncated)"
# torch's words for a pickled class outside weights_only's allow-list.
_DISALLOWED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) was not an allowed global")


def read_torch_file(path) -> object:
    """A .pt file of tensors and plain values, loaded without running any pickled code.

    torch's own errors for a damaged file advise loading it with weights_only=False,
    which for a corrupt file is pointless and for a tampered one runs its code: they
    are never passed on. A corrupt or truncated file is called that; a well-formed one
    holding a pickled class (which ours never hold) is refused, naming the class."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # Random bytes: an UnpicklingError; a truncated zip: OSError EINVAL or a miniz
        # RuntimeError; an empty file: EOFError. Only a failing disk is no corruption.
        if isinstance(error, OSError) and error.errno == errno.EIO:
            raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
        disallowed = _DISALLOWED_GLOBAL.search(str(error))
        if disallowed:
            raise CheckpointError(f"{path}: holds a pickled {disallowed[1]}, which checkpoint files "
                                  f"never hold; refused, as loading it could run code") from None
        raise CheckpointError(f"{path}: {CORRUPT_FILE}") from None
