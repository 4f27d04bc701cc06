"""Forward + backward throughput of GPTModel vs the naive seed-formula model.

    uv run python bench/bench_model.py [--batch 2] [--repeats 3] [--dtype fp32|bf16]

The seed's 163M configuration (emb 768, 12 layers, 12 heads, context 1024), same
weights in both models, timed alternately in one process.
"""

import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPTModel  # noqa: E402
from naive_gpt import NaiveGPTModel  # noqa: E402
from timing import alternate, print_table  # noqa: E402

SEED_163M = dict(vocab_size=50257, emb_dim=768, context_length=1024, n_heads=12, n_layers=12,
                 drop_rate=0.1, qkv_bias=False)


@click.command()
@click.option("--batch", default=2, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
def main(batch, repeats, dtype):
    torch.manual_seed(0)
    naive = NaiveGPTModel(SEED_163M)
    ours = GPTModel(SEED_163M)
    ours.load_state_dict(naive.state_dict())
    seq = SEED_163M["context_length"]
    inputs = torch.randint(0, SEED_163M["vocab_size"], (batch, seq))
    targets = torch.randint(0, SEED_163M["vocab_size"], (batch, seq))

    def step(model):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    print(f"forward+backward, 163M config, batch {batch} x {seq} tokens, {dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    medians = alternate({"naive (seed formulas)": step(naive), "ours (GPTModel)": step(ours)},
                        repeats=repeats)
    tokens = batch * seq
    rows = [[name, f"{seconds:.2f}", f"{tokens / seconds:,.0f}"] for name, seconds in medians.items()]
    print_table(["model", "s/step (median)", "tokens/s"], rows)
    naive_s, ours_s = medians.values()
    print(f"speed-up: {naive_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
