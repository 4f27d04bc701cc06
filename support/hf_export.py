"""A checkpoint as a transformers directory with its model card, and such a directory on the Hub.

Shared by export_hf.py (a directory, then `--push-to-hub`) and upload_model.py (the same
files, straight to a Hub repo): hf_gpt2 writes the GPT2LMHeadModel and tokenizer files,
this module adds README.md, the model card, from what is known of the checkpoint (its
config, the run's meta.json, model.json and train.json when the weights sit in a run, the
training settings upload_model.py is given), and pushes a directory with huggingface_hub.

Light to import (click and the standard library): hf_gpt2, which imports torch, and
huggingface_hub are imported where they are used.
"""

import json
from pathlib import Path

import click

from .safe_files import first_line

# What a mixture-of-experts checkpoint, which transformers can't express, is for instead.
MOE_INSTEAD = ("share model.json and model.safetensors as they are (gpt.py runs them), and score it "
               "with our own test_loss.py, test_smoke.py or test_ift.py")


# --- model card ---

def checkpoint_facts(weights_path, on_note=None):
    """What our training run recorded about this checkpoint, if it sits in one; None if not.

    Our layout is runs/RUN/checkpoints/CHECKPOINT/{model.safetensors, meta.json}, with
    the run's model.json and train.json in runs/RUN/. An unreadable meta.json is left out
    of the card, and on_note, if given, is told why in one line.
    """
    weights_path = Path(weights_path)
    checkpoint_dir = weights_path.parent
    meta_path = checkpoint_dir / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if on_note is not None:
            on_note(f"note: {meta_path} is unreadable ({error}); the model card leaves it out")
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


# train.json's lr_schedule as a model card says it; any other name is shown as it is.
SCHEDULES = {"constant": "constant", "cosine": "cosine",
             "original": "the original's warm-up, then cosine to a tenth (schedule_learning_rate)"}


def training_settings(train_config):
    """The model card's training rows, [(label, value)], from a config.TrainConfig: the
    settings the original's card shows (whichever dialect of train.json gave them)."""
    return [
        ("dataset", train_config.dataset),
        ("micro-batch size (sequences per GPU per step)", train_config.minibatch_size),
        ("gradient clipping (max norm)", train_config.grad_clip if train_config.grad_clip is not None else "none"),
        ("learning rate (peak)", train_config.learning_rate),
        ("learning-rate schedule", SCHEDULES.get(train_config.lr_schedule, train_config.lr_schedule)),
        ("weight decay", train_config.weight_decay),
    ]


def _format_fact(value, decimals=None):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{decimals}f}" if decimals is not None else f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _hub_dataset_id(dataset):
    """dataset as the card's `datasets:` entry when it names a Hub dataset (owner/name),
    else None (a local directory means nothing on the Hub)."""
    from huggingface_hub.utils import validate_repo_id

    if dataset.count("/") != 1 or Path(dataset).expanduser().exists():
        return None
    try:
        validate_repo_id(dataset)
    except ValueError:
        return None
    return dataset


def model_card(cfg, tied, dtype, parameters, name, facts, settings=None):
    """README.md for the export: the front matter the Hub reads, how to load it, the
    architecture, and what is known of its training (facts: checkpoint_facts; settings:
    training_settings)."""
    dataset = None
    if settings is not None:
        dataset = _hub_dataset_id(dict(settings)["dataset"])
    lines = [
        "---",
        "license: apache-2.0",  # this project's (LICENSE)
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",
        "- text-generation",
        *(["datasets:", f"- {dataset}"] if dataset else []),
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
    if settings is not None:
        lines += ["", "## Training settings", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {_format_fact(value)} |" for label, value in settings]
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


def read_checkpoint(model_config_path, weights_path, done, say):
    """(model config, state dict, checkpoint facts) of a checkpoint to export, refused in
    one line where transformers can't express it (hf_gpt2.read_exportable_checkpoint);
    say(line) is told what the export will lack: the tokenizer files of a model smaller
    than GPT-2's vocabulary (they are not `done`), the facts of an unreadable meta.json."""
    from . import hf_gpt2
    from . import tokenizer

    cfg, weights = hf_gpt2.read_exportable_checkpoint(model_config_path, weights_path, moe_instead=MOE_INSTEAD)
    facts = checkpoint_facts(weights_path, on_note=say)
    if not hf_gpt2.has_gpt2_tokenizer(cfg):
        say(f"note: vocab_size {cfg['vocab_size']} is smaller than GPT-2's {tokenizer.VOCAB_SIZE}, "
            f"so no tokenizer files are {done}")
    return cfg, weights, facts


def write_export(directory, cfg, weights, name, facts=None, settings=None):
    """export_hf.py's files into an existing directory: the GPT2LMHeadModel with its
    config, generation config and tokenizer (hf_gpt2.write_transformers_model) and the
    model card. Returns (tied, dtype, parameter count)."""
    from . import hf_gpt2

    directory = Path(directory)
    tied, dtype, parameters = hf_gpt2.write_transformers_model(directory, cfg, weights)
    (directory / "README.md").write_text(
        model_card(cfg, tied, dtype, parameters, name, facts, settings), encoding="utf-8")
    return tied, dtype, parameters


# --- the Hub ---

def check_repo_id(repo_id, param_hint):
    """A Hub repo id as the client takes it, or a usage error (param_hint: where it came from)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise click.BadParameter(first_line(error), param_hint=param_hint) from None


def push_to_hub(directory, repo_id, private, commit_message, what=None):
    """Create the model repo if needed (private only when asked: otherwise the Hub's
    default, public) and upload the directory in one commit; returns the commit's URL.
    The token is the client's usual one (HF_TOKEN or `hf auth login`) and never printed.
    A failure is one line naming `what` was pushed (default: the directory)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory),
                                   commit_message=commit_message)
    # The Hub client raises many exception types (HTTP status, network, auth, bad repo
    # id) and changes them between releases; each ends here as one line.
    except Exception as error:
        raise click.ClickException(
            f"pushing {what or directory} to the Hub repo '{repo_id}' failed: {first_line(error)}"
        ) from None
    return commit.commit_url
