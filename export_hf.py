"""Export a checkpoint as a plain transformers GPT-2, with tokenizer and model card.

    uv run python export_hf.py MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH OUTPUT_DIR \\
        [--push-to-hub REPO_ID] [--private]

OUTPUT_DIR loads with `AutoModelForCausalLM.from_pretrained` as a GPT2LMHeadModel and
with `AutoTokenizer.from_pretrained` as GPT-2's tokenizer -- no custom code -- so
lm-evaluation-harness, vLLM and the Hub take it as they take GPT-2 itself. A tied
checkpoint becomes a tied GPT-2; a mixture of experts has no transformers equivalent and
is refused. upload_model.py pushes the same files without writing them here.
"""

from pathlib import Path

import click

from support import hf_export
from support import safe_files
from support.command_line import answer_usage_first

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "README.md",
                *TOKENIZER_FILES)


@click.command()
@click.argument("model_config_path", type=click.Path(dir_okay=False))
@click.argument("model_safetensors_path", type=click.Path(dir_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--push-to-hub", "repo_id", metavar="REPO_ID", default=None,
              help="Upload OUTPUT_DIR to this Hub model repo, creating it if needed.")
@click.option("--private", is_flag=True,
              help="Create the Hub repo as private (an existing repo keeps its visibility).")
@click.option("--overwrite", is_flag=True, help="Replace files already in OUTPUT_DIR.")
def main(**arguments):
    """Export a checkpoint as a plain transformers GPT-2, with tokenizer and model card."""
    export(**arguments)


answer_usage_first(main)


def export(model_config_path, model_safetensors_path, output_dir, repo_id, private, overwrite):
    if private and repo_id is None:
        raise click.UsageError("--private only applies with --push-to-hub REPO_ID")
    if repo_id is not None:
        hf_export.check_repo_id(repo_id, "--push-to-hub")  # before the export, not after it
    output_dir = Path(output_dir)
    safe_files.refuse_to_overwrite(output_dir, EXPORT_FILES, overwrite)
    # Only now, with the arguments known to be good, are torch and transformers imported
    # (they take seconds).
    cfg, weights, facts = hf_export.read_checkpoint(model_config_path, model_safetensors_path, "written",
                                                    say=lambda note: click.echo(note, err=True))

    with safe_files.staged_output(output_dir) as staging:
        tied, _, parameters = hf_export.write_export(staging, cfg, weights, repo_id or output_dir.resolve().name,
                                                     facts)
    click.echo(f"wrote {output_dir}: GPT2LMHeadModel, {parameters:,} parameters, "
               f"{'tied' if tied else 'untied'} output head")

    if repo_id is not None:
        url = hf_export.push_to_hub(output_dir, repo_id, private,
                                    commit_message="Upload GPT-2 export from export_hf.py")
        click.echo(f"pushed to {url}")


if __name__ == "__main__":
    main()
