"""test_smoke.py run as users run it: a subprocess on a checkpoint file."""

import json

import pytest

from support import tokenizer
from gpt import generate
from helpers import MODEL, SMOKE_SEPARATOR as SEPARATOR, one_line_error, run_script, write_tiny_checkpoint

CONFIG = {**MODEL, "vocab_size": 50257, "n_heads": 4}


def run_smoke(*args):
    return run_script("test_smoke.py", *args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    return directory, write_tiny_checkpoint(directory, CONFIG)


def test_prints_prompt_and_greedy_continuation(checkpoint):
    directory, model = checkpoint
    result = run_smoke(directory / "model.json", directory / "model.safetensors",
                       "--temperature", "0", "--num-tokens", "12", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    prompt_ids = tokenizer.encode("Every effort moves you")
    continuation = tokenizer.decode(generate(model, [prompt_ids], 12)[0])
    assert result.stdout == f"Every effort moves you\n{SEPARATOR}\n{continuation}\n"


def test_seeded_sampling_is_reproducible_and_has_the_seed_defaults(checkpoint):
    directory, _ = checkpoint
    runs = [run_smoke(directory / "model.json", directory / "model.safetensors", "--seed", "7")
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    prompt, continuation = runs[0].stdout.removesuffix("\n").split(f"\n{SEPARATOR}\n", 1)
    assert prompt == "Every effort moves you"
    # 20 new tokens by default; decoding and re-encoding may merge a few
    assert len(tokenizer.encode(continuation)) >= 10


def test_missing_weights_file(checkpoint, tmp_path):
    directory, _ = checkpoint
    missing = tmp_path / "nope.safetensors"
    one_line_error(run_smoke(directory / "model.json", missing), str(missing), "file not found")


def test_missing_config_file(checkpoint, tmp_path):
    directory, _ = checkpoint
    missing = tmp_path / "model.json"
    one_line_error(run_smoke(missing, directory / "model.safetensors"), str(missing), "not found")


def test_corrupt_weights_file(checkpoint, tmp_path):
    directory, _ = checkpoint
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\0" * 64)
    one_line_error(run_smoke(directory / "model.json", corrupt), str(corrupt),
                   "not a readable safetensors file")


def test_shape_mismatch_names_the_tensor_and_both_shapes(checkpoint, tmp_path):
    directory, _ = checkpoint
    wider = {**CONFIG, "emb_dim": 48}
    config_path = tmp_path / "model.json"
    config_path.write_text(json.dumps(wider))
    one_line_error(run_smoke(config_path, directory / "model.safetensors"),
                   "tok_emb.weight", "(50257, 32)", "(50257, 48)")


def test_invalid_model_config(checkpoint, tmp_path):
    directory, _ = checkpoint
    config_path = tmp_path / "model.json"
    config_path.write_text(json.dumps({**CONFIG, "n_heads": 5}))
    one_line_error(run_smoke(config_path, directory / "model.safetensors"),
                   str(config_path), "'emb_dim' (32) must be divisible by 'n_heads' (5)")


def test_a_prompt_of_several_lines_comes_back_whole(checkpoint):
    directory, model = checkpoint
    prompt = "Two lines,\nand a café."
    result = run_smoke(directory / "model.json", directory / "model.safetensors", "--prompt", prompt,
                       "--temperature", "0", "--num-tokens", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    continuation = tokenizer.decode(generate(model, [tokenizer.encode(prompt)], 5)[0])
    assert result.stdout == f"{prompt}\n{SEPARATOR}\n{continuation}\n"


def test_bad_option_is_a_usage_error(checkpoint):
    directory, _ = checkpoint
    result = run_smoke(directory / "model.json", directory / "model.safetensors", "--top-k", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--top-k" in result.stderr
