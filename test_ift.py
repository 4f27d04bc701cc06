# Copyright 2023-2025 Sebastian Raschka (the instruction fine-tuning recipe, from chapter 7 of
# "Build a Large Language Model (From Scratch)"); this implementation: the
# ddp-base-model-from-scratch authors.
# SPDX-License-Identifier: Apache-2.0
"""Instruction-following test: fine-tune a checkpoint on instructions, answer held-out ones, judge.

    uv run python test_ift.py MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH

As the seed: fine-tune on 85% of instruction-data.json (downloaded when missing) until
the validation loss rises, restoring the best epoch's weights; answer the 10% test
records greedily; have an LLM judge (OpenAI's Responses API, model gpt-5.1) score each
answer from 0 to 100; print three examples and the average score. Every record is
saved to a results file, which `--responses FILE` can judge again later; a run that
leaves records unscored ends with one line saying how many, and exit status 1.
"""

import json
import os
from pathlib import Path

import click

from support import instruction_data
from support import judge
from support import safe_files
from support.command_line import answer_usage_first

EXAMPLES_SHOWN = 3


@click.command()
@click.argument("model_config_path", required=False, type=click.Path(dir_okay=False))
@click.argument("model_safetensors_path", required=False, type=click.Path(dir_okay=False))
@instruction_data.data_options
@click.option("--max-epochs", type=click.IntRange(min=0), default=None,
              help="Stop after this many epochs even if the validation loss still falls "
                   "(default: no limit, as the seed). 0 skips fine-tuning.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Fine-tuning batch size.")
@click.option("--learning-rate", default=5e-5, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="AdamW learning rate.")
@click.option("--weight-decay", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="AdamW weight decay.")
@click.option("--seed", default=123, show_default=True, type=int,
              help="Seeds the shuffling of the training records and dropout.")
@instruction_data.generation_options
@click.option("--results", default="ift-results.json", show_default=True,
              type=click.Path(dir_okay=False),
              help="JSON file for every test record: prompt, reference, response, score or error.")
@click.option("--responses", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Judge the responses in this results file again: no fine-tuning or generation.")
@click.option("--no-judge", is_flag=True, help="Stop after writing the responses to --results.")
@judge.judge_options(judge.DEFAULT_MODEL)
def main(**arguments):
    """Fine-tune on instructions, answer the held-out ones, and have an LLM judge score them."""
    instruction_test(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: torch takes seconds to import, and
# --help or a mistyped option should answer at once.
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from support import instruction_tuning  # noqa: E402
from support.weights import load_model  # noqa: E402
from support.devices import choose_device_and_dtype  # noqa: E402


# --- fine-tuning ---

def instruction_tune(model, train_records, validation_records, batch_size, learning_rate,
                     weight_decay, max_epochs, device, dtype_name):
    """The seed's fine-tuning run (its validation loss: the first 5 batches), reported as
    it goes; returns a summary for the results file."""
    best_epoch, epochs_run, history = instruction_tuning.tune_on_records(
        model, train_records, validation_records, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, max_epochs=max_epochs, device=device, dtype_name=dtype_name,
        validation_batches=instruction_tuning.VALIDATION_BATCHES, say=lambda line: print(line, flush=True),
        progress=lambda batches, epoch: tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False))
    return instruction_tuning.summary(best_epoch, epochs_run, history)


# --- answering the test instructions ---

def generate_responses(model, prompts, max_new_tokens, batch_size, device, dtype_name):
    with tqdm(total=len(prompts), desc="generating", unit="response") as progress:
        return instruction_tuning.generate_responses(model, prompts, max_new_tokens, batch_size, device,
                                                     dtype_name, on_answered=progress.update)


# --- the results file ---

def write_results(path, results):
    """Replace the results file in one step: an interrupted write never leaves half a file."""
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    try:
        safe_files.write_atomically(path, text)
    except OSError as error:
        raise click.BadParameter(f"cannot write {path} ({error.strerror})", param_hint="--results") from None


def read_results(path):
    """A results file written by this script, checked enough to judge its records again."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise click.ClickException(f"{path}: not a readable JSON file ({error})") from None
    records = results.get("records") if isinstance(results, dict) else None
    if not isinstance(records, list) or not records:
        raise click.ClickException(f"{path}: not a test_ift.py results file (no 'records' list)")
    for index, record in enumerate(records):
        for key in ("prompt", "reference", "response"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise click.ClickException(f"{path}: record {index} has no text under '{key}'")
    return results


def summarise(results):
    scores = [record["score"] for record in results["records"] if record.get("score") is not None]
    results["number_of_scores"] = len(scores)
    results["average_score"] = sum(scores) / len(scores) if scores else None


# --- judging ---

def check_judge(settings):
    """Fail now, not after fine-tuning, if the judge can't be reached or refuses the key."""
    warning = judge.model_warning(settings)
    if warning is not None:
        click.echo(warning, err=True)


def judge_records(settings, results, results_path):
    """Score every record; the results file is rewritten however judging ends."""
    records = results["records"]
    results["judge"] = {"api": settings.api, "model": settings.model, "base_url": settings.base_url}
    for record in records:
        record.update(score=None, judge_reply=None, error="not judged")
    prompts = [judge.judge_prompt(record["prompt"], record["reference"], record["response"])
               for record in records]
    progress = tqdm(total=len(records), desc="judging", unit="response")

    def on_verdict(index, verdict):
        records[index].update(score=verdict.score, judge_reply=verdict.reply, error=verdict.error)
        progress.update()

    try:
        judge.score_all(settings, prompts, on_verdict)
    finally:
        progress.close()
        summarise(results)
        write_results(results_path, results)


def print_examples(records, judged):
    for record in records[:EXAMPLES_SHOWN]:
        print("\nDataset response:")
        print(">>", record["reference"])
        print("\nModel response:")
        print(">>", record["response"])
        if judged:
            print("\nScore:")
            print(">>", record["score"] if record["score"] is not None
                  else f"unscored ({record['error']})")
        print("\n-------------------------")


def print_scores(results, results_path):
    records = results["records"]
    print(f"Number of scores: {results['number_of_scores']} of {len(records)}")
    average = results["average_score"]
    print(f"Average score: {average:.2f}" if average is not None else "Average score: none")
    unscored = [(index, record) for index, record in enumerate(records) if record["score"] is None]
    for index, record in unscored[:10]:
        print(f"  unscored: test record {index}: {record['error']}")
    if len(unscored) > 10:
        print(f"  ... and {len(unscored) - 10} more")
    print(f"Results written to {results_path}")


def refuse_unscored(results, results_path):
    """Exit non-zero, in one line, when judging left records unscored, so that a script
    or CI can tell; the results file holds their responses for --responses."""
    unscored = sum(record["score"] is None for record in results["records"])
    if unscored:
        raise click.ClickException(
            f"{unscored} of {len(results['records'])} test records are unscored (listed above); "
            f"judge them again with: uv run python test_ift.py --responses {results_path}")


# --- the whole test ---

def instruction_test(model_config_path, model_safetensors_path, data, data_url, max_epochs,
                     batch_size, learning_rate, weight_decay, seed, device, dtype, max_new_tokens,
                     generation_batch_size, results, responses, no_judge, judge_model, judge_api,
                     judge_base_url, judge_concurrency, judge_max_retries):
    if responses and no_judge:
        raise click.UsageError("--responses judges a results file again; --no-judge leaves "
                               "nothing to do")
    if responses and model_config_path:
        raise click.UsageError("--responses judges a saved results file; it takes no "
                               "MODEL_CONFIG_PATH or MODEL_SAFETENSORS_PATH")
    if not responses and not model_safetensors_path:
        raise click.UsageError("MODEL_CONFIG_PATH and MODEL_SAFETENSORS_PATH are required "
                               "(only --responses FILE works without them)")
    results_path = Path(results)
    if not results_path.parent.is_dir():
        raise click.BadParameter(f"directory {results_path.parent} does not exist",
                                 param_hint="--results")
    if not os.access(results_path.parent, os.W_OK):  # found now, not after hours of work
        raise click.BadParameter(f"directory {results_path.parent} is not writable",
                                 param_hint="--results")
    # Everything that can fail fast does, before the long work: the key first.
    settings = None if no_judge else judge.settings_from_environment(
        judge_model, judge_api, judge_base_url, judge_concurrency, judge_max_retries, or_else="pass --no-judge")

    if responses:
        saved = read_results(responses)
        check_judge(settings)
        judge_records(settings, saved, results_path)
        print_examples(saved["records"], judged=True)
        print_scores(saved, results_path)
        refuse_unscored(saved, results_path)
        return

    try:
        device, dtype = choose_device_and_dtype(device, dtype)
    except (ValueError, RuntimeError) as error:
        raise click.UsageError(str(error)) from None
    fine_tuning = max_epochs != 0
    train_records, test_records, validation_records = instruction_data.load_splits(
        data, data_url, batch_size, fine_tuning)
    if settings is not None:
        check_judge(settings)

    torch.manual_seed(seed)
    model = load_model(model_config_path, model_safetensors_path, device)
    summary = None
    if fine_tuning:
        summary = instruction_tune(model, train_records, validation_records, batch_size,
                                   learning_rate, weight_decay, max_epochs, device, dtype)

    prompts = [instruction_data.format_prompt(record) for record in test_records]
    answers = generate_responses(model, prompts, max_new_tokens, generation_batch_size, device, dtype)
    outcome = {
        "model_config": str(model_config_path),
        "weights": str(model_safetensors_path),
        "data": str(data),
        "fine_tuning": summary,
        "judge": None,
        "number_of_scores": None,
        "average_score": None,
        "records": [
            {"instruction": record["instruction"], "input": record["input"], "prompt": prompt,
             "reference": record["output"], "response": answer,
             "score": None, "judge_reply": None, "error": "not judged"}
            for record, prompt, answer in zip(test_records, prompts, answers, strict=True)
        ],
    }
    write_results(results_path, outcome)  # the responses are safe before any judging starts
    if settings is None:
        print_examples(outcome["records"], judged=False)
        print(f"Responses written to {results_path}; score them later with: "
              f"uv run python test_ift.py --responses {results_path}")
        return
    judge_records(settings, outcome, results_path)
    print_examples(outcome["records"], judged=True)
    print_scores(outcome, results_path)
    refuse_unscored(outcome, results_path)


if __name__ == "__main__":
    main()
