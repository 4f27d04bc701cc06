"""One mixture-of-experts layer: our sorted dispatch (gpt.MixtureOfExperts) against the
original's loop of boolean-masked experts (naive_gpt.masked_loop_mixture).

    uv run python bench/bench_moe.py [--sizes 256x8x2,768x8x2] [--tokens 4096] [--repeats 5]
                                     [--dtype fp32|bf16|fp16] [--device cpu|cuda]

Training rows: forward and backward of the layer (the input, router and experts all
get gradients) on --tokens tokens (e.g. 4 sequences of 1024). Decoding rows: a
forward without gradients on 1 and 8 tokens, as generate() runs it per new token.
Sizes are emb_dim x experts x active experts. Both candidates share one layer's
weights (the same fused-GELU experts, so only the dispatch differs) and alternate,
after warm-up, once their outputs are checked equal.
"""

import functools
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import devices  # noqa: E402
from gpt import MixtureOfExperts  # noqa: E402
from naive_gpt import masked_loop_mixture  # noqa: E402
from timing import alternate, print_table  # noqa: E402


def moe_layer(emb_dim, num_experts, num_active_experts, device):
    cfg = {"emb_dim": emb_dim, "moe": {"num_experts": num_experts, "num_active_experts": num_active_experts}}
    torch.manual_seed(0)
    return MixtureOfExperts(cfg).to(device)


def training_step(mixture, x, grad_output):
    def step():
        output = mixture(x)[0]
        output.backward(grad_output)
    return step


def decoding_step(mixture, x):
    def step():
        with torch.no_grad():
            mixture(x)
    return step


@click.command()
@click.option("--sizes", default="256x8x2,768x8x2,256x32x2", show_default=True,
              help="emb_dim x experts x active experts, comma-separated.")
@click.option("--tokens", default=4096, show_default=True, help="Tokens per training step.")
@click.option("--repeats", default=5, show_default=True)
@click.option("--dtype", "dtype_name", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True)
@click.option("--device", "device_name", default="cpu", show_default=True)
def main(sizes, tokens, repeats, dtype_name, device_name):
    device = devices.resolve_device(device_name)
    print(f"one MoE layer, {device}, {dtype_name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    training_rows, decoding_rows = [], []
    for size in sizes.split(","):
        emb_dim, num_experts, k = (int(part) for part in size.split("x"))
        layer = moe_layer(emb_dim, num_experts, k, device)
        original = functools.partial(masked_loop_mixture, layer.router, layer.experts, k)
        x = torch.randn(tokens, emb_dim, device=device, requires_grad=True)
        with torch.no_grad():  # the same numbers first
            torch.testing.assert_close(layer(x)[0], original(x)[0], rtol=1e-4, atol=1e-5)
        grad_output = torch.randn(tokens, emb_dim, device=device)
        with devices.autocast(device, dtype_name):
            seconds = alternate({"original": training_step(original, x, grad_output),
                                 "ours": training_step(layer, x, grad_output)}, repeats, device=device)
        training_rows.append([size, tokens, f"{tokens / seconds['original']:,.0f}", f"{tokens / seconds['ours']:,.0f}",
                              f"{seconds['original'] / seconds['ours']:.2f}x"])

        for batch in (1, 8):
            x = torch.randn(batch, 1, emb_dim, device=device)
            with devices.autocast(device, dtype_name):
                seconds = alternate({"original": decoding_step(original, x), "ours": decoding_step(layer, x)},
                                    repeats * 20, device=device)
            decoding_rows.append([size, batch, f"{1e6 * seconds['original']:,.0f}", f"{1e6 * seconds['ours']:,.0f}",
                                  f"{seconds['original'] / seconds['ours']:.2f}x"])

    print("\ntraining: forward + backward, tokens/s")
    print_table(["size", "tokens", "original masked loop", "ours sorted", "ours / original"], training_rows)
    print("\ndecoding: forward without gradients, microseconds per call")
    print_table(["size", "tokens", "original masked loop", "ours sorted", "ours / original"], decoding_rows)


if __name__ == "__main__":
    main()
