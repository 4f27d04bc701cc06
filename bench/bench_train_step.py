"""Training-step throughput and MFU: our step vs a naive step following the seed's formulas.

    uv run python bench/bench_train_step.py [--batch N] [--repeats N] [--dtype fp32|bf16|fp16]

The seed's 163M configuration (emb 768, 12 layers, 12 heads, context 1024). One step
is forward, backward and an AdamW update. Both steps start from the same weights and
are timed alternately in this one process, after a warm-up step each.

  ours:  gpt.GPTModel (fused SDPA / layer_norm / GELU kernels; on a CPU with dropout,
         block-by-block causal attention), the fused linear + cross-entropy loss,
         ddp_train's fused AdamW, bf16 autocast where the device has native bf16 (else
         fp32 on a CPU), torch.compile on CUDA.
  naive: bench/naive_gpt.py (explicit masked softmax attention, hand-written GELU and
         LayerNorm), full logits + F.cross_entropy, for-loop AdamW; fp16 autocast with a
         GradScaler on CUDA (the seed's), the same dtype as ours on a CPU.

MFU = model FLOPs per token x tokens/s / peak FLOP/s, with model FLOPs per token =
6 x (parameters used in matmuls) + 12 x n_layers x emb_dim x context_length
(devices.training_flops_per_token). Peak: the datasheet's dense figure for a known GPU,
else a large matmul measured in this run (both fp32 and bf16 are measured on a CPU; MFU
is against the peak of the precision our step ran in).
"""

import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import devices  # noqa: E402
from config import load_model_config, load_train_config  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from gpt import GPTModel  # noqa: E402
from naive_gpt import NaiveGPTModel  # noqa: E402
from timing import alternate, print_table  # noqa: E402

SEED_RUN = Path(__file__).resolve().parent.parent / "runs" / "163m-fineweb-edu"
SEED_163M = load_model_config(SEED_RUN / "model.json")
SEED_TRAIN = load_train_config(SEED_RUN / "train.json")  # AdamW settings for build_optimizer


def make_step(model, loss_of, optimizer, device, dtype_name, scaler, inputs, targets):
    def step():
        with devices.autocast(device, dtype_name):
            loss = loss_of(model, inputs, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def fused_loss(model, inputs, targets):
    return model(inputs, targets=targets)


def full_logits_loss(model, inputs, targets):
    return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())


@click.command()
@click.option("--batch", default=None, type=int, help="Micro-batch (default: 2 on CPU, 16 on GPU).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--dtype", "dtype_name", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Our step's precision (default: what ddp_train.py picks for the device).")
@click.option("--device", "device_name", default=None)
@click.option("--compile/--no-compile", "use_compile", default=None,
              help="torch.compile our model (default: on CUDA only).")
def main(batch, repeats, dtype_name, device_name, use_compile):
    device = devices.resolve_device(device_name)
    batch = batch or (16 if device.type == "cuda" else 2)
    dtype_name = dtype_name or devices.default_dtype_name(device)
    naive_dtype = "fp16" if device.type == "cuda" else dtype_name
    use_compile = device.type == "cuda" if use_compile is None else use_compile
    devices.enable_tf32(device)

    torch.manual_seed(0)
    naive = NaiveGPTModel(SEED_163M).to(device)
    ours = GPTModel(SEED_163M).to(device)
    ours.load_state_dict(naive.state_dict())
    seq = SEED_163M["context_length"]
    inputs = torch.randint(0, SEED_163M["vocab_size"], (batch, seq), device=device)
    targets = torch.randint(0, SEED_163M["vocab_size"], (batch, seq), device=device)

    our_step = make_step(torch.compile(ours) if use_compile else ours, fused_loss,
                         build_optimizer(ours, SEED_TRAIN, device), device, dtype_name,
                         torch.amp.GradScaler(device.type, enabled=dtype_name == "fp16"),
                         inputs, targets)
    naive_step = make_step(naive, full_logits_loss,
                           torch.optim.AdamW(naive.parameters(), lr=4e-4, weight_decay=0.1,
                                             foreach=False),
                           device, naive_dtype,
                           torch.amp.GradScaler(device.type, enabled=naive_dtype == "fp16"),
                           inputs, targets)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"training step, 163M config, batch {batch} x {seq} tokens on {name} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    medians = alternate({f"naive ({naive_dtype})": naive_step,
                         f"ours ({dtype_name}{', compiled' if use_compile else ''})": our_step},
                        repeats=repeats, warmup=2 if use_compile else 1, device=device)
    tokens = batch * seq
    rows = [[label, f"{seconds:.3f}", f"{tokens / seconds:,.0f}"] for label, seconds in medians.items()]
    print_table(["step", "s/step (median)", "tokens/s"], rows)
    naive_seconds, our_seconds = medians.values()
    print(f"ours / naive: {naive_seconds / our_seconds:.2f}x")

    flops_per_token = devices.training_flops_per_token(SEED_163M)
    our_flops = flops_per_token * tokens / our_seconds
    print(f"model FLOPs per token: {flops_per_token / 1e9:.3f} GFLOP "
          f"(6 x matmul parameters + 12 x layers x emb_dim x context)")
    peaks = []
    for peak_dtype in (["fp32", "bf16"] if device.type == "cpu" else [dtype_name]):
        datasheet = devices.datasheet_peak_flops(device, peak_dtype)
        peak = datasheet or devices.measure_matmul_flops(device, peak_dtype)
        source = "datasheet" if datasheet else "measured 2048^2 matmul"
        mfu = f"{our_flops / peak:.1%}" if peak_dtype == dtype_name else f"- (ours ran {dtype_name})"
        peaks.append([peak_dtype, source, f"{peak / 1e12:.3f}", mfu])
    print_table(["peak dtype", "source", "peak TFLOP/s", "our MFU"], peaks)


if __name__ == "__main__":
    main()
