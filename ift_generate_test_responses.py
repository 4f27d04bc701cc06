# Copyright 2023-2025 Sebastian Raschka (the instruction fine-tuning recipe, from chapter 7 of
# "Build a Large Language Model (From Scratch)"); this implementation: the
# ddp-base-model-from-scratch authors.
# SPDX-License-Identifier: Apache-2.0
"""Fine-tune a checkpoint on instructions and write its answers to the held-out ones.

    uv run python ift_generate_test_responses.py NAME MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH \\
        --dropout {model,on,off}

The later original's first half of the instruction test (ift_judge.py is the second):
seeded with 42; fine-tune on 85% of instruction-data.json (downloaded when missing) with
AdamW (learning rate 5e-5, weight decay 0.1), batches of 8, for at most 100 epochs, until
the loss over the whole validation split stops falling, then back to the best epoch's
weights; answer the 10% test records greedily. NAME-ift-test-results.json, beside this
script, gets the test records, each with its `model_response`. --dropout sets the
dropout of the fine-tuning: model.json's (`model`), 0.1 (`on`) or none (`off`).
"""

import json
import os
from pathlib import Path

import click

from support import instruction_data
from support import safe_files
from support.command_line import answer_usage_first

SEED = 42
DROPOUT_RATES = {"on": 0.1, "off": 0.0}   # "model": model.json's drop_rate
BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY = 8, 5e-5, 0.1
RESULTS_SUFFIX = "-ift-test-results.json"
SCRIPT_DIR = Path(__file__).resolve().parent


def checked_name(context, parameter, name):
    """NAME as part of a file name: no directories in it."""
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise click.BadParameter(f"{name!r} is no file name (the results go to NAME{RESULTS_SUFFIX}; "
                                 "use --results for another directory)")
    return name


@click.command()
@click.argument("name", callback=checked_name)
@click.argument("model_config_path", type=click.Path(dir_okay=False))
@click.argument("model_safetensors_path", type=click.Path(dir_okay=False))
@click.option("--dropout", type=click.Choice(["model", "on", "off"]), required=True,
              help="Dropout while fine-tuning: model.json's drop_rate, 0.1, or 0.")
@instruction_data.data_options
@click.option("--results", default=None, type=click.Path(dir_okay=False),
              help=f"Where to write the results (default: NAME{RESULTS_SUFFIX} in this script's "
                   "directory, as the original writes them).")
@click.option("--max-epochs", default=100, show_default=True, type=click.IntRange(min=0),
              help="Most epochs of fine-tuning (the original's 100); 0 skips fine-tuning.")
@instruction_data.generation_options
def main(**arguments):
    """Fine-tune a checkpoint on instructions and write its answers to the held-out ones
    to NAME-ift-test-results.json, for ift_judge.py."""
    generate_test_responses(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: torch takes seconds to import, and
# --help or a mistyped option should answer at once.
import random  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from support import instruction_tuning  # noqa: E402
from support.config import load_model_config  # noqa: E402
from support.devices import choose_device_and_dtype  # noqa: E402
from support.weights import load_weights_into  # noqa: E402
from gpt import GPTModel  # noqa: E402


def results_path(name, results):
    """Where the results go: --results, else NAME-ift-test-results.json beside this script.
    Checked now, not after the fine-tuning: a directory that isn't there or can't be written."""
    path = Path(results) if results is not None else SCRIPT_DIR / f"{name}{RESULTS_SUFFIX}"
    where = "--results" if results is not None else "NAME"
    if not path.parent.is_dir():
        raise click.BadParameter(f"directory {path.parent} does not exist", param_hint=where)
    if not os.access(path.parent, os.W_OK):
        raise click.BadParameter(f"directory {path.parent} is not writable", param_hint=where)
    return path


def build_model(cfg, model_config_path, model_safetensors_path, dropout, device):
    """The checkpoint as the original builds it, after seeding: GPTModel(cfg) first (its
    initialisation draws from the seeded generator, so the epochs' shuffles that follow
    are the original's), then the weights, then the device."""
    cfg = dict(cfg)
    if dropout != "model":
        cfg["drop_rate"] = DROPOUT_RATES[dropout]
    random.seed(SEED)
    torch.manual_seed(SEED)  # the CPU's generator and every GPU's
    model = GPTModel(cfg)
    load_weights_into(model, model_safetensors_path, model_config_path=model_config_path)
    return model.to(device), cfg["drop_rate"]


def generate_test_responses(name, model_config_path, model_safetensors_path, dropout, data, data_url, results,
                            max_epochs, device, dtype, max_new_tokens, generation_batch_size):
    path = results_path(name, results)
    try:
        device, dtype_name = choose_device_and_dtype(device, dtype)
    except (ValueError, RuntimeError) as error:
        raise click.UsageError(str(error)) from None
    cfg = load_model_config(model_config_path)   # a mistake there before any download
    train_records, test_records, validation_records = instruction_data.load_splits(
        data, data_url, BATCH_SIZE, fine_tuning=max_epochs != 0)

    model, drop_rate = build_model(cfg, model_config_path, model_safetensors_path, dropout, device)
    if max_epochs:
        print(f"{name}: fine-tuning on {len(train_records)} records (dropout {drop_rate}), validating on "
              f"{len(validation_records)}", flush=True)
        instruction_tuning.tune_on_records(
            model, train_records, validation_records, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY, max_epochs=max_epochs, device=device, dtype_name=dtype_name,
            validation_batches=instruction_tuning.ALL_BATCHES, say=lambda line: print(line, flush=True),
            progress=lambda batches, epoch: tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False))

    prompts = [instruction_data.format_prompt(record) for record in test_records]
    with tqdm(total=len(prompts), desc="generating", unit="response") as progress:
        answers = instruction_tuning.generate_responses(model, prompts, max_new_tokens, generation_batch_size,
                                                        device, dtype_name, on_answered=progress.update)
    # The test records as they are, each with its answer: what ift_judge.py reads.
    answered = [{**record, "model_response": answer} for record, answer in zip(test_records, answers, strict=True)]
    try:
        safe_files.write_atomically(path, json.dumps(answered))
    except OSError as error:
        raise click.ClickException(safe_files.write_failure(path.parent, "the results", error, path)) from None
    print(f"Wrote {len(answered)} responses to {path}")


if __name__ == "__main__":
    main()
