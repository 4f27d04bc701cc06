"""Loss of a checkpoint on a held-out slice of a token dataset.

    uv run python test_loss.py DATASETS_DIR MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH

Defaults are the seed's: 3,200 batches of 6 sequences from token 50,000,000 of the
validation split of gpjt/fineweb-gpt2-tokens (downloaded into DATASETS_DIR as
training does); sequences are the model's context length long.
"""

import math
from pathlib import Path

import click

from support.command_line import answer_usage_first


@click.command()
@click.argument("datasets_dir", type=click.Path(file_okay=False))
@click.argument("model_config_path", type=click.Path(dir_okay=False))
@click.argument("model_safetensors_path", type=click.Path(dir_okay=False))
@click.option("--dataset", default="gpjt/fineweb-gpt2-tokens", show_default=True,
              help="Hugging Face dataset repo id (fetched into DATASETS_DIR/<repo id>), or a "
                   "local directory holding the split file.")
@click.option("--split", default="validation", show_default=True,
              help="Which split file to read: <split>.safetensors.")
@click.option("--start-token", default=50_000_000, show_default=True, type=click.IntRange(min=0),
              help="Index of the first token of the slice.")
@click.option("--batches", default=3200, show_default=True, type=click.IntRange(min=1),
              help="Number of batches to evaluate.")
@click.option("--batch-size", default=6, show_default=True, type=click.IntRange(min=1),
              help="Sequences per batch.")
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Autocast precision (default: bf16 where supported, else fp16 on GPUs and fp32 on CPUs).")
def main(**arguments):
    """Print a checkpoint's mean loss (and perplexity) on a held-out slice of a token dataset."""
    report_loss(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: torch takes seconds to import, and
# --help or a mistyped option should answer at once.
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from support import token_data  # noqa: E402
from support.weights import load_model  # noqa: E402
from support.devices import autocast, choose_device_and_dtype  # noqa: E402


def dataset_directory(dataset, datasets_dir, split):
    """A directory that holds the split file as given, else what token_data makes of the name."""
    as_given = Path(dataset).expanduser()
    if token_data.split_path(as_given, split).is_file():
        return as_given
    return token_data.resolve_dataset_dir(dataset, datasets_dir, splits=(split,))


@torch.inference_mode()
def mean_loss(model, batches, device, dtype_name):
    """Mean cross-entropy over all tokens of all batches (every batch has the same token count)."""
    model.eval()  # dropout off
    total = torch.zeros((), dtype=torch.float64, device=device)
    for index in tqdm(range(len(batches)), desc="batches", unit="batch"):
        inputs, targets = batches[index]
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, dtype_name):
            logits = model(inputs)
        # Summed on the device: no host synchronisation per batch.
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return total.item() / len(batches)


def report_loss(datasets_dir, model_config_path, model_safetensors_path, dataset, split, start_token,
                batches, batch_size, device, dtype):
    try:
        device, dtype_name = choose_device_and_dtype(device, dtype)
    except (ValueError, RuntimeError) as error:
        raise click.UsageError(str(error)) from None
    model = load_model(model_config_path, model_safetensors_path, device)
    seq_length = model.context_length

    directory = dataset_directory(dataset, datasets_dir, split)
    data = token_data.load_dataset(
        directory, split,
        min_tokens=batches * batch_size * seq_length,
        start_token=start_token,
        micro_batches_per_step=1,
        minibatch_size=batch_size,
        seq_length=seq_length,
    )
    # A dataset tokenised for another vocabulary would index past the embedding table
    # (a device-side assert on CUDA). One pass over the memory-mapped slice is cheap.
    token_data.check_token_ids(data.tokens, model.tok_emb.num_embeddings,
                               str(token_data.split_path(directory, split)))
    loss = mean_loss(model, data, device, dtype_name)
    tokens = len(data) * batch_size * seq_length
    print(f"Loss against our test dataset: {loss:.3f}")
    print(f"Perplexity: {math.exp(loss) if loss < 700 else math.inf:.2f}")
    print(f"Tokens evaluated: {tokens:,} ({len(data):,} batches of {batch_size} x {seq_length}, "
          f"{split} split from token {start_token:,}, {dtype_name})")


if __name__ == "__main__":
    main()
