"""Export a checkpoint as a plain transformers GPT-2, with tokenizer and model card.

    uv run python export_hf.py MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH OUTPUT_DIR \\
        [--push-to-hub REPO_ID] [--private]

OUTPUT_DIR loads with `AutoModelForCausalLM.from_pretrained` as a GPT2LMHeadModel and
with `AutoTokenizer.from_pretrained` as GPT-2's tokenizer -- no custom code -- so
lm-evaluation-harness, vLLM and the Hub take it as they take GPT-2 itself.
"""

import json
from pathlib import Path

import click

from support import safe_files
from support import tokenizer
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


# --- model card ---

def checkpoint_facts(weights_path):
    """What our training run recorded about this checkpoint, if it sits in one.

    Our layout is runs/RUN/checkpoints/CHECKPOINT/{model.safetensors, meta.json}, with
    the run's model.json and train.json in runs/RUN/.
    """
    weights_path = Path(weights_path)
    checkpoint_dir = weights_path.parent
    meta_path = checkpoint_dir / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        click.echo(f"note: {meta_path} is unreadable ({error}); the model card leaves it out", err=True)
        return None
    if not isinstance(meta, dict):
        return None
    facts = {"checkpoint": checkpoint_dir.resolve().name, "meta": meta, "run": None, "run_files": {}}
    if checkpoint_dir.parent.name == "checkpoints":
        run_dir = checkpoint_dir.parent.parent
        facts["run"] = run_dir.resolve().name
        for name in ("model.json", "train.json"):
            if (run_dir / name).is_file():
                facts["run_files"][name] = (run_dir / name).read_text(encoding="utf-8").strip()
    return facts


def _format_fact(value, decimals=None):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{decimals}f}" if decimals is not None else f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def model_card(cfg, tied, dtype, parameters, name, facts):
    lines = [
        "---",
        "license: apache-2.0",  # this project's (LICENSE)
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",
        "- text-generation",
        "---",
        "",
        f"# {name}",
        "",
        "A GPT-2-architecture language model trained with ddp-base-model-from-scratch "
        "(GPT-2-style pre-training with PyTorch DDP), exported as a plain `GPT2LMHeadModel`: "
        "no custom code, no `trust_remote_code`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {parameters:,} |",
        f"| layers | {cfg['n_layers']} |",
        f"| attention heads | {cfg['n_heads']} |",
        f"| embedding width | {cfg['emb_dim']} |",
        f"| context length | {cfg['context_length']} |",
        f"| vocabulary | {cfg['vocab_size']:,} (GPT-2's byte-level BPE) |",
        f"| output head | {'tied to' if tied else 'separate from'} the token embedding |",
        f"| Q/K/V bias | {'yes' if cfg['qkv_bias'] else 'no (zero in `c_attn.bias`)'} |",
        f"| dropout in training | {cfg['drop_rate']} |",
        f"| weights | {str(dtype).removeprefix('torch.')} |",
        "",
        "Pre-norm transformer blocks, learned position embeddings, tanh-approximated GELU, "
        "LayerNorm eps 1e-5: GPT-2's design.",
    ]
    if facts is not None:
        meta = dict(facts["meta"])
        labelled = [("global_step", "global step", None), ("tokens_seen", "tokens seen", None),
                    ("train_loss", "training loss", 4), ("val_loss", "validation loss", 4),
                    ("is_best", "best validation loss of the run so far", None)]
        lines += ["", "## Training", "", "| | |", "|---|---|"]
        if facts["run"] is not None:
            lines.append(f"| run | `{facts['run']}` |")
        lines.append(f"| checkpoint | `{facts['checkpoint']}` |")
        for key, label, decimals in labelled:
            if key in meta:
                lines.append(f"| {label} | {_format_fact(meta.pop(key), decimals)} |")
        for key, value in meta.items():  # whatever else the run recorded
            if isinstance(value, (bool, int, float, str)):
                lines.append(f"| {key} | {_format_fact(value)} |")
        for file_name, text in facts["run_files"].items():
            lines += ["", f"The run's `{file_name}`:", "", "```json", text, "```"]
    return "\n".join(lines) + "\n"


# --- Hub ---

def check_repo_id(repo_id):
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise click.BadParameter(safe_files.first_line(error), param_hint="--push-to-hub") from None


def push_to_hub(output_dir, repo_id, private):
    """Create the repo if needed and upload the directory; the token is the client's
    usual one (HF_TOKEN or `hf auth login`) and never printed."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(output_dir),
                                   commit_message="Upload GPT-2 export from export_hf.py")
    # The Hub client raises many exception types (HTTP status, network, auth, bad repo
    # id) and changes them between releases; each ends here as one line.
    except Exception as error:
        raise click.ClickException(
            f"pushing {output_dir} to the Hub repo '{repo_id}' failed: {safe_files.first_line(error)}"
        ) from None
    return commit.commit_url


def export(model_config_path, model_safetensors_path, output_dir, repo_id, private, overwrite):
    if private and repo_id is None:
        raise click.UsageError("--private only applies with --push-to-hub REPO_ID")
    if repo_id is not None:
        check_repo_id(repo_id)  # before the export, not after it
    output_dir = Path(output_dir)
    safe_files.refuse_to_overwrite(output_dir, EXPORT_FILES, overwrite)
    # Only now, with the arguments known to be good: torch and transformers take seconds
    # to import.
    from support import hf_gpt2

    cfg, weights = hf_gpt2.read_exportable_checkpoint(model_config_path, model_safetensors_path)
    card_name = repo_id or output_dir.resolve().name
    facts = checkpoint_facts(model_safetensors_path)

    with safe_files.staged_output(output_dir) as staging:
        tied, dtype, parameters = hf_gpt2.write_transformers_model(staging, cfg, weights)
        if not hf_gpt2.has_gpt2_tokenizer(cfg):
            click.echo(f"note: vocab_size {cfg['vocab_size']} is smaller than GPT-2's "
                       f"{tokenizer.VOCAB_SIZE}, so no tokenizer files are written", err=True)
        (staging / "README.md").write_text(
            model_card(cfg, tied, dtype, parameters, card_name, facts), encoding="utf-8"
        )
    click.echo(f"wrote {output_dir}: GPT2LMHeadModel, {parameters:,} parameters, "
               f"{'tied' if tied else 'untied'} output head")

    if repo_id is not None:
        url = push_to_hub(output_dir, repo_id, private)
        click.echo(f"pushed to {url}")


if __name__ == "__main__":
    main()
