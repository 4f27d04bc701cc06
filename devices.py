"""Choosing the device, the distributed backend and the numeric precision."""

import contextlib

import torch


def default_device_name() -> str:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> torch.device:
    """A torch.device from a user's --device value (None = the default)."""
    device = torch.device(name or default_device_name())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device '{name}' requested but MPS is not available")
    return device


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


def default_dtype_name(device: torch.device) -> str:
    """The seed's precision where bf16 isn't available (fp16 + GradScaler), bf16 otherwise."""
    return "bf16" if supports_bf16(device) else "fp16"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, dtype_name: str):
    """Autocast context for a dtype name; fp32 means no autocast at all."""
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype_name])
