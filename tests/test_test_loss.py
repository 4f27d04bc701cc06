"""test_loss.py run as users run it, on a tiny checkpoint and a local token dataset."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from support.devices import default_dtype_name
from helpers import MODEL, one_line_error, run_script, write_tiny_checkpoint

CONFIG = {**MODEL, "vocab_size": 50257, "n_heads": 4, "drop_rate": 0.1}
SPLIT_TOKENS = 2000


def run_test_loss(*args, **env):
    return run_script("test_loss.py", *args, env={"HF_HUB_OFFLINE": "1", **env}, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    return directory, write_tiny_checkpoint(directory, CONFIG)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A validation split laid out where the seed's default dataset name puts it."""
    datasets_dir = tmp_path_factory.mktemp("datasets")
    dataset_dir = datasets_dir / "gpjt" / "fineweb-gpt2-tokens"
    dataset_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    values = torch.randint(0, CONFIG["vocab_size"], (SPLIT_TOKENS,), generator=generator)
    save_file({"tokens": values.to(torch.int32)}, dataset_dir / "validation.safetensors")
    return datasets_dir, dataset_dir, values


def independent_loss(model, values, start, batches, batch_size):
    """Plain cross-entropy over the slice, all sequences at once."""
    length = CONFIG["context_length"]
    count = batches * batch_size * length
    chunk = values[start:start + count + 1]
    with torch.no_grad():
        logits = model(chunk[:-1].view(-1, length))
    return F.cross_entropy(logits.flatten(0, 1), chunk[1:]).item()


def printed(stdout, label):
    return float(re.search(rf"^{label}: ([0-9.]+)", stdout, re.MULTILINE).group(1))


def test_loss_equals_cross_entropy_over_the_same_slice(checkpoint, tokens, tmp_path):
    directory, model = checkpoint
    datasets_dir, dataset_dir, values = tokens
    result = run_test_loss(tmp_path, directory / "model.json", directory / "model.safetensors",
                           "--dataset", dataset_dir, "--start-token", 123, "--batches", 5,
                           "--batch-size", 3, "--device", "cpu", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    expected = independent_loss(model, values, start=123, batches=5, batch_size=3)
    assert printed(result.stdout, "Loss against our test dataset") == pytest.approx(expected, abs=6e-4)
    # The perplexity of a random model is ~50,000; printed to 2 decimals it pins the loss to ~1e-6.
    perplexity = printed(result.stdout, "Perplexity")
    assert math.log(perplexity) == pytest.approx(expected, abs=2e-5)
    assert "Tokens evaluated: 240 (5 batches of 3 x 16, validation split from token 123, fp32)" \
        in result.stdout
    # A slice one token later gives a different number: the slice really is the one asked for.
    assert abs(independent_loss(model, values, 124, 5, 3) - expected) > 1e-3


def test_seed_dataset_layout_and_default_precision(checkpoint, tokens):
    """The default dataset name resolves to DATASETS_DIR/gpjt/fineweb-gpt2-tokens (offline here)."""
    directory, model = checkpoint
    datasets_dir, _, values = tokens
    result = run_test_loss(datasets_dir, directory / "model.json", directory / "model.safetensors",
                           "--start-token", 0, "--batches", 4, "--batch-size", 2, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = independent_loss(model, values, start=0, batches=4, batch_size=2)
    assert printed(result.stdout, "Loss against our test dataset") == pytest.approx(expected, abs=0.05)
    # bf16 autocast where the CPU has native bf16, else fp32 (devices.default_dtype_name)
    assert f"{default_dtype_name(torch.device('cpu'))})" in result.stdout



def test_token_ids_outside_the_vocabulary(tmp_path):
    small = {**CONFIG, "vocab_size": 100}
    write_tiny_checkpoint(tmp_path, small)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    ids = torch.arange(200, dtype=torch.int32) % 100
    ids[70] = 5000
    save_file({"tokens": ids}, data_dir / "validation.safetensors")
    result = run_test_loss(tmp_path, tmp_path / "model.json", tmp_path / "model.safetensors",
                           "--dataset", data_dir, "--start-token", 0, "--batches", 3,
                           "--batch-size", 2, "--device", "cpu")
    one_line_error(result, "validation.safetensors", "token id 5000", "vocabulary of 100")


def test_a_slice_past_the_end_says_what_it_wanted_in_test_loss_words(checkpoint, tokens, tmp_path):
    directory, _ = checkpoint
    _, dataset_dir, _ = tokens
    result = run_test_loss(tmp_path, directory / "model.json", directory / "model.safetensors",
                           "--dataset", dataset_dir, "--start-token", 1900, "--batches", 5,
                           "--batch-size", 3, "--device", "cpu")
    one_line_error(result, "validation.safetensors", "not enough tokens: 241 wanted from token 1,900",
                   "(5 batch(es) of 3 sequences x 16 tokens, plus one), 100 available")
