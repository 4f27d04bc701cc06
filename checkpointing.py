"""Model weights and checkpoint directories on disk."""

from pathlib import Path

import click
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from config import load_model_config
from gpt import GPTModel


class CheckpointError(click.ClickException):
    """A missing, corrupt or mismatched weights/checkpoint file; printed as one line, exit 1."""


def read_weights(path) -> dict:
    """The tensors of a safetensors file, with errors a user understands."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def check_state_dict(model: torch.nn.Module, state_dict: dict, path) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{path}: tensor '{key}' is missing")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor '{key}' has shape {tuple(state_dict[key].shape)}, "
                f"but the model config needs {tuple(tensor.shape)}"
            )
    for key in state_dict:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor '{key}' for this model config")


def load_model(model_config_path, weights_path, device="cpu") -> GPTModel:
    """A GPTModel built from model.json with weights from a safetensors file, in eval mode."""
    cfg = load_model_config(model_config_path)
    model = GPTModel(cfg)
    state_dict = read_weights(weights_path)
    # A file without the causal-mask buffers (ours always write them) is still usable.
    for key, buffer in model.state_dict().items():
        if key.endswith(".att.mask") and key not in state_dict:
            state_dict[key] = buffer
    check_state_dict(model, state_dict, weights_path)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()
