"""Greedy generation: the KV-cache path (gpt.generate) vs full recomputation per token.

    uv run python bench/bench_generate.py [--new-tokens 256] [--batch-sizes 1,8]

The seed's 163M configuration with random weights, a 64-token prompt, greedy decoding.
The baseline is the seed's loop: re-run the model over the whole (cropped) context for
every new token. Both produce the same tokens (checked), timed alternately.
"""

import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import devices  # noqa: E402
from support.config import load_model_config  # noqa: E402
from gpt import GPTModel, generate  # noqa: E402
from naive_gpt import naive_generate  # noqa: E402
from timing import alternate, print_table  # noqa: E402

SEED_163M = load_model_config(Path(__file__).resolve().parent.parent / "runs" / "163m-fineweb-edu" / "model.json")


@click.command()
@click.option("--new-tokens", default=256, show_default=True)
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--repeats", default=1, show_default=True)
@click.option("--device", "device_name", default=None)
def main(new_tokens, prompt_tokens, batch_sizes, repeats, device_name):
    device = devices.resolve_device(device_name)
    torch.manual_seed(0)
    model = GPTModel(SEED_163M).to(device).eval()
    print(f"greedy generation, 163M config (random weights), {prompt_tokens}-token prompt, "
          f"{new_tokens} new tokens, {device}, torch {torch.__version__}")
    rows = []
    for batch in [int(size) for size in batch_sizes.split(",")]:
        prompts = torch.randint(0, SEED_163M["vocab_size"], (batch, prompt_tokens), device=device)
        results = {}

        def cached():
            results["cached"] = generate(model, prompts.tolist(), new_tokens)

        def recomputed():
            out = naive_generate(model, prompts, new_tokens, SEED_163M["context_length"])
            results["recomputed"] = out[:, prompt_tokens:].tolist()

        medians = alternate({"recompute": recomputed, "kv cache": cached}, repeats=repeats,
                            warmup=0, device=device)
        assert results["cached"] == results["recomputed"], "KV cache changed the greedy tokens"
        tokens = batch * new_tokens
        rows.append([batch, f"{tokens / medians['recompute']:,.1f}", f"{tokens / medians['kv cache']:,.1f}",
                     f"{medians['recompute'] / medians['kv cache']:.1f}x"])
    print_table(["batch", "recompute tokens/s", "kv cache tokens/s", "speed-up"], rows)


if __name__ == "__main__":
    main()
