"""Upload a checkpoint to a Hugging Face Hub model repo as a plain transformers GPT-2.

    uv run python upload_model.py MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH TRAIN_CONFIG_PATH \\
        HF_MODEL_NAME [--private]

The later original's command line. What is pushed is what export_hf.py writes -- a
GPT2LMHeadModel with GPT-2's tokenizer, no custom code, tied checkpoints tied -- with a
model card that also shows train.json's settings (dataset, micro-batch size, clipping,
learning rate and schedule, weight decay). The repo is created if it doesn't exist,
public as the original creates it unless --private is given. The files are written to a
temporary directory and pushed in one commit; nothing is left on disk.
"""

import tempfile

import click

from support import hf_export
from support.command_line import answer_usage_first
from support.config import load_train_config


@click.command()
@click.argument("model_config_path", type=click.Path(dir_okay=False))
@click.argument("model_safetensors_path", type=click.Path(dir_okay=False))
@click.argument("train_config_path", type=click.Path(dir_okay=False))
@click.argument("hf_model_name")
@click.option("--private", is_flag=True,
              help="Create the repo as private. Without it a new repo is public, as the original "
                   "creates it; an existing repo keeps its visibility.")
def main(**arguments):
    """Push a checkpoint to the Hub repo HF_MODEL_NAME as a plain transformers GPT-2, with
    tokenizer and model card (the repo is created, public unless --private, if absent)."""
    upload(**arguments)


answer_usage_first(main)


def upload(model_config_path, model_safetensors_path, train_config_path, hf_model_name, private):
    hf_export.check_repo_id(hf_model_name, "HF_MODEL_NAME")
    settings = hf_export.training_settings(load_train_config(train_config_path))
    # Only now, with the arguments known to be good, are torch and transformers imported
    # (they take seconds).
    cfg, weights, facts = hf_export.read_checkpoint(model_config_path, model_safetensors_path, "pushed",
                                                    say=lambda note: click.echo(note, err=True))

    with tempfile.TemporaryDirectory(prefix="upload-model-") as directory:
        tied, _, parameters = hf_export.write_export(directory, cfg, weights, hf_model_name, facts, settings)
        del weights  # written; the push needs only the files
        url = hf_export.push_to_hub(directory, hf_model_name, private,
                                    commit_message="Upload GPT-2 export from upload_model.py",
                                    what=model_safetensors_path)
    click.echo(f"pushed {model_safetensors_path} to {url}: GPT2LMHeadModel, {parameters:,} parameters, "
               f"{'tied' if tied else 'untied'} output head")


if __name__ == "__main__":
    main()
