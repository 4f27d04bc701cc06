"""Import a transformers GPT-2 (OpenAI's, or any GPT-2-shaped one) as our model.json + weights.

    uv run python import_hf.py HF_MODEL OUTPUT_DIR

HF_MODEL is a Hub repo id (openai-community/gpt2, gpt2-medium, gpt2-large, gpt2-xl;
safetensors only) or a local directory with config.json and model.safetensors or
pytorch_model.bin. OUTPUT_DIR gets model.json and model.safetensors with the seed's
names and mask buffers, so test_smoke.py, test_loss.py and test_ift.py run on it as on
our own checkpoints -- the way to put GPT-2's own numbers beside a run's.
"""

import json
import pickle
import re
from pathlib import Path

import click

from support import safe_files
from support.command_line import answer_usage_first
from support.config import read_json_object, validate_model_config

OUTPUT_FILES = ("model.json", "model.safetensors")
# Hub repo ids: "name" or "owner/name". Anything that exists locally is a local path.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@click.command()
@click.argument("hf_model")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True,
              help="Replace model.json / model.safetensors already in OUTPUT_DIR.")
def main(**arguments):
    """Import a transformers GPT-2 (Hub repo id or local directory) as model.json + weights."""
    import_model(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: torch takes seconds to import, and
# --help or a mistyped option should answer at once.
import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from support import hf_gpt2  # noqa: E402


def download_from_hub(repo_id):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(
            repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]
        ))
    except GatedRepoError:
        raise click.ClickException(
            f"{repo_id}: a gated repo on the Hugging Face Hub; accept its terms on the Hub, "
            "then log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise click.ClickException(
            f"{repo_id}: no such model repo on the Hugging Face Hub (or it is private and "
            "you are not logged in: `hf auth login` or HF_TOKEN)") from None
    # Beyond those two the client raises many exception types (offline, HTTP status,
    # disk) and changes them between releases; each ends here as one line.
    except Exception as error:
        raise click.ClickException(
            f"{repo_id}: download from the Hugging Face Hub failed: {safe_files.first_line(error)}"
        ) from None


def _read_one_file(path):
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # weights_only: a pickle from the internet must not run code.
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError, ValueError, EOFError) as error:
        raise hf_gpt2.HFFormatError(
            f"{path}: not a readable weights file ({safe_files.first_line(error)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise hf_gpt2.HFFormatError(f"{path}: expected a dict of tensors (a state dict)")
    return tensors


def read_transformers_weights(directory, allow_pickle):
    """All tensors of a transformers checkpoint directory, single file or sharded.

    Returns (tensors, the path to name in errors)."""
    formats = [("model.safetensors", "model.safetensors.index.json")]
    if allow_pickle:
        formats.append(("pytorch_model.bin", "pytorch_model.bin.index.json"))
    for single, index in formats:
        if (directory / single).is_file():
            return _read_one_file(directory / single), directory / single
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise hf_gpt2.HFFormatError(
                    f"{directory / index}: not a readable shard index ({safe_files.first_line(error)})"
                ) from None
            tensors = {}
            for shard in shards:
                tensors.update(_read_one_file(directory / shard))
            return tensors, directory / index
    if allow_pickle:
        raise hf_gpt2.HFFormatError(f"{directory}: no model.safetensors or pytorch_model.bin found")
    raise hf_gpt2.HFFormatError(
        f"{directory}: no model.safetensors found (only safetensors weights are taken from the Hub)"
    )


def resolve_source(hf_model):
    """(directory, whether it came from the Hub) for a local path or a Hub repo id."""
    local = Path(hf_model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise click.BadParameter(f"{hf_model} is a file; give the directory that holds it",
                                     param_hint="HF_MODEL")
        return local, False
    if not HUB_REPO_ID.match(hf_model):
        raise click.BadParameter(f"{hf_model}: no such directory, and not a Hub repo id",
                                 param_hint="HF_MODEL")
    return download_from_hub(hf_model), True


def import_model(hf_model, output_dir, overwrite):
    output_dir = Path(output_dir)
    safe_files.refuse_to_overwrite(output_dir, OUTPUT_FILES, overwrite)
    source, from_hub = resolve_source(hf_model)

    config_path = source / "config.json"
    hf_config = read_json_object(config_path)
    cfg = hf_gpt2.model_config_from_transformers(hf_config, config_path)
    tied = hf_config.get("tie_word_embeddings", True)  # GPT2Config's default
    if not isinstance(tied, bool):
        raise hf_gpt2.HFFormatError(
            f"{config_path}: key 'tie_word_embeddings' must be true or false, got {json.dumps(tied)}"
        )
    tensors, weights_path = read_transformers_weights(source, allow_pickle=not from_hub)
    tensors = hf_gpt2.normalise_transformers_names(tensors)
    cfg, state_dict = hf_gpt2.from_transformers(tensors, cfg, tied, weights_path)
    # The GPT-2 read, counted as transformers and export_hf.py count it: a tied head once
    # (out_head is only its copy), the Q/K/V biases even when zero. A round trip prints
    # the same number both ways.
    parameters = sum(tensors[name].numel() for name in hf_gpt2.transformers_shapes(cfg, tied))
    del tensors
    cfg = validate_model_config(cfg, config_path)

    with safe_files.staged_output(output_dir) as staging:
        save_file(state_dict, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "model.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    click.echo(
        f"wrote {output_dir / 'model.json'} and {output_dir / 'model.safetensors'}: "
        f"{cfg['n_layers']} layers, {cfg['emb_dim']} wide, context {cfg['context_length']}, "
        f"{parameters:,} parameters ({'tied head copied into out_head' if tied else 'untied head'}, "
        f"qkv_bias {str(cfg['qkv_bias']).lower()})"
    )


if __name__ == "__main__":
    main()
