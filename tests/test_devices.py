"""Device helpers: the datasheet peak table behind MFU, and the FLOPs-per-token formula."""

import pytest

from support import devices
from gpt import GPTModel


@pytest.mark.parametrize("device_name, dtype_name, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),           # not the SXM part listed after it
    ("NVIDIA H200", "fp32", 494e12),                # fp32 runs as TF32 on tensor cores
    ("NVIDIA A100-SXM4-40GB", "bf16", 312e12),      # not the A10
    ("NVIDIA A10G", "fp16", 70e12),
    ("NVIDIA L40S", "bf16", 362e12),                # not the L4
    ("NVIDIA L40", "bf16", 181e12),                 # not the L4 either
    ("NVIDIA L4", "bf16", 121e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),         # no bf16 on Volta
    ("Tesla T4", "fp32", 8.1e12),                   # no TF32 before Ampere
    ("Some Future GPU", "bf16", None),              # unknown: ddp_train measures a matmul instead
])
def test_gpu_peak_flops_picks_the_right_row(device_name, dtype_name, expected):
    assert devices.gpu_peak_flops(device_name, dtype_name) == expected


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_training_flops_per_token_counts_every_parameter_but_the_embeddings(qkv_bias):
    cfg = dict(vocab_size=503, emb_dim=64, context_length=32, n_heads=4, n_layers=3,
               drop_rate=0.1, qkv_bias=qkv_bias)
    model = GPTModel(cfg)
    counted = sum(parameter.numel() for name, parameter in model.named_parameters()
                  if name not in ("tok_emb.weight", "pos_emb.weight"))
    assert devices.training_flops_per_token(cfg) == 6 * counted + 12 * 3 * 64 * 32
