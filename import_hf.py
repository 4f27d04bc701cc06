"""Import a transformers GPT-2 (OpenAI's, or any GPT-2-shaped one) as our model.json + weights.

    uv run python import_hf.py HF_MODEL OUTPUT_DIR

HF_MODEL is a Hub repo id (openai-community/gpt2, gpt2-medium, gpt2-large, gpt2-xl;
safetensors only) or a local directory with config.json and model.safetensors or
pytorch_model.bin, single-file or sharded: transformers' GPT2LMHeadModel.from_pretrained
reads it. OUTPUT_DIR gets model.json and model.safetensors with the seed's names and mask
buffers, so test_smoke.py, test_loss.py and test_ift.py run on it as on our own
checkpoints -- the way to put GPT-2's own numbers beside a run's. A tied GPT-2 (OpenAI's
are) becomes a tied model of ours, "tie_weights": true, its one matrix saved once as our
checkpoints save it; one with its own lm_head stays untied.
"""

import json
import re
from pathlib import Path

import click

from support import safe_files
from support.command_line import answer_usage_first

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


def resolve_source(hf_model):
    """(the local directory or Hub repo id, whether it is on the Hub)."""
    local = Path(hf_model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise click.BadParameter(f"{hf_model} is a file; give the directory that holds it",
                                     param_hint="HF_MODEL")
        return local, False
    if not HUB_REPO_ID.match(hf_model):
        raise click.BadParameter(f"{hf_model}: no such directory, and not a Hub repo id",
                                 param_hint="HF_MODEL")
    return hf_model, True


def import_model(hf_model, output_dir, overwrite):
    output_dir = Path(output_dir)
    safe_files.refuse_to_overwrite(output_dir, OUTPUT_FILES, overwrite)
    source, from_hub = resolve_source(hf_model)
    # Only now, with the arguments known to be good: torch and transformers take seconds
    # to import.
    import transformers
    from safetensors.torch import save_file

    from support import hf_gpt2
    from support.weights import tensors_to_save

    # What didn't load is refused by name, in one line: transformers' own report of it
    # would only repeat that on stderr. Its progress bar goes too where nothing is
    # downloaded (disabling it also stops the Hub client's).
    transformers.logging.set_verbosity_error()
    if not from_hub:
        transformers.logging.disable_progress_bar()
    cfg, state_dict, tied, parameters = hf_gpt2.read_transformers_model(source, from_hub)

    # A tied model's matrix once, under the name (and with the metadata) our checkpoints
    # and the original's use.
    tensors, aliases = tensors_to_save(state_dict, cfg)
    with safe_files.staged_output(output_dir) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt", **aliases})
        (staging / "model.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    click.echo(
        f"wrote {output_dir / 'model.json'} and {output_dir / 'model.safetensors'}: "
        f"{cfg['n_layers']} layers, {cfg['emb_dim']} wide, context {cfg['context_length']}, "
        f"{parameters:,} parameters ("
        + ("tied output head: \"tie_weights\": true, the matrix saved once" if tied else "untied output head")
        + f", qkv_bias {str(cfg['qkv_bias']).lower()})"
    )


if __name__ == "__main__":
    main()
