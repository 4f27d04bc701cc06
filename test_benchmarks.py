"""Benchmark scores of a checkpoint with lm-evaluation-harness (HellaSwag, ARC, PIQA, ...).

    uv run python test_benchmarks.py MODEL_JSON WEIGHTS --tasks hellaswag,arc_easy [options]

The checkpoint is written as a plain transformers GPT2LMHeadModel with GPT-2's tokenizer
(export_hf.py's files) into a temporary directory, loaded from there, and lm-eval's own
`hf` model scores it, exactly as it scores GPT-2: the numbers are comparable with every
published lm-eval figure for the same task and settings. GPT-2's own scores come the same
way, from a checkpoint that import_hf.py made of openai-community/gpt2. The lm-eval side
(tasks, the exported model, scoring) is benchmark_scores.py, which training shares for
train.json's benchmark_tasks.
"""

import contextlib
import json
import sys
from pathlib import Path

import click

from support import safe_files
from support.command_line import answer_usage_first


@click.command()
@click.argument("model_json", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--tasks", required=True, metavar="LIST",
              help="Comma-separated lm-eval task, group or tag names (glob patterns too, as "
                   "lm-eval takes them), e.g. hellaswag,arc_easy,piqa. "
                   "List them with `uv run lm-eval ls tasks`.")
@click.option("--include-path", "include_paths", multiple=True, type=click.Path(), metavar="DIR",
              help="A directory of your own task YAML files, searched with lm-eval's "
                   "(repeat for several).")
@click.option("--num-fewshot", default=None, type=click.IntRange(min=0), metavar="N",
              help="Examples shown before each question (default: each task's own, mostly 0).")
@click.option("--limit", default=None, type=click.IntRange(min=1), metavar="N",
              help="Score only the first N examples of each task: a quick look, not a score to report.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Sequences per forward pass.")
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Autocast precision (default: bf16 where supported, else fp16 on GPUs and fp32 on CPUs).")
@click.option("--output", default=None, type=click.Path(dir_okay=False),
              help="Also write lm-eval's results JSON to this file.")
@click.option("--overwrite", is_flag=True, help="Replace the --output file if it exists.")
def main(**arguments):
    """Score a checkpoint on lm-evaluation-harness tasks and print a table of the results."""
    score_checkpoint(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: --help or a mistyped option should
# answer at once. torch (seconds to import: hf_gpt2 and devices import it) and lm-eval
# (seconds more) are imported where they are first needed, after the checks that answer
# at once; benchmark_scores itself imports neither.
from support import benchmark_scores  # noqa: E402
from support.benchmark_scores import (formatted, lm_eval_task_manager, load_exported_model,  # noqa: E402
                              load_tasks, refuse_what_cannot_run_here, select_tasks)


# --- what can be checked before any slow work ---

def task_names(tasks):
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("no task names given", param_hint="--tasks")
    return list(dict.fromkeys(names))  # each once, in the order given


def checked_include_dir(path):
    return benchmark_scores.checked_include_dir(path, label=f"--include-path {path}")


def check_output(path, overwrite):
    """Refuse, now rather than after an hour of scoring, a results file that can't be
    written: a missing directory, an existing file (without --overwrite), a directory or
    file system that takes no new files."""
    path = Path(path)
    if not path.parent.is_dir():
        raise click.ClickException(f"--output {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise click.ClickException(f"--output {path}: is a directory")
    if path.exists() and not overwrite:
        raise click.ClickException(f"--output {path} already exists; pass --overwrite to replace it")
    # Permission bits don't tell (root ignores them; a read-only mount, /proc): try.
    probe = safe_files.hidden_temporary(path, "probe")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise click.ClickException(f"--output {path}: cannot write there ({error.strerror})") from None


def read_checkpoint(model_json, weights):
    """Our model config and weights, refused now (one line) where they don't fit together
    or can't become a GPT2LMHeadModel that reads text."""
    from support import hf_gpt2

    cfg, state_dict = hf_gpt2.read_exportable_checkpoint(model_json, weights)
    benchmark_scores.refuse_without_gpt2_tokenizer(cfg, model_json)
    return cfg, state_dict


# --- the report ---

def results_table(results):
    """One row per task (and group) and metric, in lm-eval's order: task, metric, value, stderr."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results["results"].items():
        name = metrics.get("alias", task)
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            # Keys without a filter (alias, sample_len) are no scores; a stderr goes beside its metric.
            if not comma or metric.endswith("_stderr"):
                continue
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((name, label, formatted(value), formatted(stderr)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                   row[2].rjust(widths[2]), row[3].rjust(widths[3])]).rstrip()
        for row in rows
    )


def write_results(path, results):
    from lm_eval.utils import handle_non_serializable

    # As lm-eval's own command line writes it (its task configs hold functions).
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
    try:
        safe_files.write_atomically(path, text)
    except OSError as error:
        raise click.ClickException(f"--output {path}: cannot write it ({error.strerror})") from None


# --- the whole run ---

def score_checkpoint(model_json, weights, tasks, include_paths, num_fewshot, limit, batch_size,
                     device, dtype, output, overwrite):
    if overwrite and output is None:
        raise click.UsageError("--overwrite only applies with --output FILE")
    names = task_names(tasks)
    include_dirs = [checked_include_dir(path) for path in include_paths]
    if output is not None:
        check_output(output, overwrite)
    from support.devices import choose_device_and_dtype

    try:
        device, dtype_name = choose_device_and_dtype(device, dtype)
    except (ValueError, RuntimeError) as error:
        raise click.UsageError(str(error)) from None
    cfg, state_dict = read_checkpoint(model_json, weights)

    import lm_eval

    task_manager = lm_eval_task_manager(names, include_dirs)
    selected = select_tasks(task_manager, names, include_dirs)
    # lm-eval prints some of its progress; stdout is kept for the table.
    with contextlib.redirect_stdout(sys.stderr):
        task_objects = load_tasks(task_manager, selected)
        refuse_what_cannot_run_here(task_objects)
        lm = load_exported_model(cfg, state_dict, device, dtype_name, batch_size)
        del state_dict  # the model holds its own copy
        results = benchmark_scores.evaluate(lm, task_objects, task_manager, limit=limit,
                                            num_fewshot=num_fewshot, batch_size=batch_size, device=device)
    # lm-eval names the model after the directory it was loaded from: here a temporary
    # one, gone by now. The checkpoint's own files say what was scored.
    results["config"]["model"] = str(weights)
    results["config"]["model_args"] = {"model_json": str(model_json), "weights": str(weights),
                                       "autocast_dtype": dtype_name}
    print(results_table(results))  # first: should the file fail, the scores are still seen
    fewshot = "each task's default few-shot" if num_fewshot is None else f"{num_fewshot}-shot"
    print(f"lm-eval {lm_eval.__version__} on {device} ({dtype_name}), batch size {batch_size}, {fewshot}"
          + (f"; --limit {limit}: only the first {limit} examples of each task" if limit else ""))
    if output is not None:
        write_results(output, results)
        print(f"Results written to {output}")


if __name__ == "__main__":
    main()
