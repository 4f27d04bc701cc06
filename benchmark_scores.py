"""lm-evaluation-harness scores of a model: finding and loading the tasks, handing the
weights to lm-eval through a transformers export, and the scores as metrics.jsonl rows.

Two users:
- test_benchmarks.py scores a checkpoint on disk and prints a table;
- (next) ddp_train.py, scoring the weights of its checkpoints.

lm-eval takes seconds to import (transformers with it), so it is imported inside the
functions that need it: a script's --help, and a training run without benchmarks, never
load it. torch is imported inside functions too, so that chart.py can read the rows'
scores (task_scores, main_metric) without it.
"""

import contextlib
import tempfile
from pathlib import Path

import click

from safe_files import first_line

LIST_TASKS = "uv run lm-eval ls tasks"


class BenchmarkError(click.ClickException):
    """Tasks that can't be found, loaded or run here; click prints it as one line."""


# --- what can be checked before lm-eval is imported ---

def checked_include_dir(path, label):
    """A directory lm-eval can search for task YAML files (as an absolute path), or one
    line, starting with label, saying why not. lm-eval itself skips a missing or
    unreadable directory without a word, and then calls the tasks in it unknown."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise BenchmarkError(f"{label}: no such directory")
    if not directory.is_dir():
        raise BenchmarkError(f"{label}: not a directory")
    try:
        has_yaml = next(directory.glob("**/*.yaml"), None) is not None
    except OSError as error:
        raise BenchmarkError(f"{label}: cannot read it ({error.strerror})") from None
    if not has_yaml:
        raise BenchmarkError(f"{label}: holds no task files (*.yaml)")
    return str(directory.resolve())


# --- finding and loading tasks ---

def lm_eval_task_manager(names, include_dirs):
    """lm-eval's TaskManager, which finds tasks by name.

    It indexes every task file lm-eval ships, some 15,000 (~10 s), then the include
    paths, whose tasks take precedence. When every name is a task of the include paths
    (not a group or tag, which may gather lm-eval's own tasks), those paths alone are
    indexed: the same tasks, found without the wait.
    """
    from lm_eval.tasks import TaskManager

    if include_dirs:
        own_tasks = TaskManager(include_path=include_dirs, include_defaults=False)
        if set(names) <= set(own_tasks.all_subtasks):
            return own_tasks
    return TaskManager(include_path=include_dirs or None)


def select_tasks(task_manager, names, include_dirs, option="--tasks"):
    """Every name as lm-eval's own command line takes it (task, group, tag, or a glob
    pattern over them); all the unknown ones named in one line, which starts with
    option (where the names came from)."""
    selected, unknown = [], []
    for name in names:
        matches = task_manager.match_tasks([name])
        if not matches:
            unknown.append(name)
        selected += [match for match in matches if match not in selected]
    if unknown:
        listed = ", ".join(f"'{name}'" for name in unknown)
        where = "lm-eval's tasks, groups and tags"
        list_command = LIST_TASKS
        if include_dirs:
            where += f", nor in a task YAML under {', '.join(include_dirs)} that parses"
            list_command += f" --include_path {':'.join(include_dirs)}"
        raise BenchmarkError(
            f"{option}: unknown task{'s' if len(unknown) > 1 else ''} {listed}: not among {where}; "
            f"list them with `{list_command}`")
    return selected


def load_tasks(task_manager, names, context=""):
    """lm-eval's Task and Group objects, datasets fetched. Done before the model is
    loaded (before training, in ddp_train.py), so that a task that can't be (no network
    for a Hub dataset, a local data file gone) ends the run in seconds, in one line
    (context, if given, goes first)."""
    loaded = []
    for name in names:
        # Loading runs the datasets library, the Hub client and the task's own code, each
        # with exception types of its own; any of them ends here as one line.
        try:
            found = task_manager.load([name])
        except Exception as error:
            raise BenchmarkError(
                f"{context}lm-eval task '{name}' could not be loaded: {first_line(error)}") from None
        groups = found.get("groups", {})
        if name in groups:
            loaded.append(groups[name])
        elif name in found["tasks"]:
            loaded.append(found["tasks"][name])
        else:  # a tag: it stands for its tasks
            loaded += found["tasks"].values()
    return loaded


def item_name(item):
    """A loaded Task's or Group's name."""
    from lm_eval.api.group import Group

    return item.name if isinstance(item, Group) else item.task_name


def refuse_what_cannot_run_here(loaded, option="--tasks", context=""):
    """One line for what lm-eval would refuse only after the model has loaded, or with a
    traceback: a task asked for twice (by a group and by name, say), a task that runs the
    code the model writes (lm-eval marks it unsafe), a task that needs images."""
    from lm_eval.api.group import Group

    asked_by = {}
    for item in loaded:
        source = item_name(item)
        for task in item.get_all_tasks() if isinstance(item, Group) else [item]:
            if asked_by.setdefault(task.task_name, source) != source:
                raise BenchmarkError(
                    f"{option}: task '{task.task_name}' is asked for twice, by "
                    f"'{asked_by[task.task_name]}' and by '{source}'; ask for it once")
            if getattr(task, "UNSAFE_CODE", False):
                raise BenchmarkError(
                    f"{context}lm-eval task '{task.task_name}' runs the code the model writes (lm-eval "
                    "marks it unsafe); run it with lm-eval's own command line and "
                    "--confirm_run_unsafe_code, in a sandbox")
            if getattr(task, "MULTIMODAL", False):
                raise BenchmarkError(
                    f"{context}lm-eval task '{task.task_name}' needs images or audio; a GPT-2 model "
                    "reads text only")


# --- the model, and scoring it ---

@contextlib.contextmanager
def quiet_logger(name):
    """A logger's warnings held back for a while (its errors still show)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_exported_model(cfg, state_dict, device, dtype_name, batch_size):
    """lm-eval's `hf` model (HFLM) on a GPT2LMHeadModel written, as export_hf.py writes
    it, to a temporary directory, and loaded from there as HFLM loads one by name. The
    directory is gone once the model and tokenizer are loaded; state_dict is only read.

    HFLM is handed the loaded model rather than the directory's name: given a name, it
    starts `accelerate`, which under torchrun sees every rank and would wait for the
    others to score their share (they never do: only global rank 0 scores). The weights
    are loaded in fp32 and dtype_name is autocast, as in every script here; log-softmax
    runs in fp32 whatever the dtype, so bf16 logits don't round the loglikelihoods that
    decide between the choices.
    """
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    import hf_gpt2
    from devices import TORCH_DTYPES

    with tempfile.TemporaryDirectory(prefix="benchmark-export-") as directory:
        hf_gpt2.write_transformers_model(directory, cfg, state_dict)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model.to(device)
    # Its warnings about a model passed in (rather than named) are about accelerate,
    # which is just what is avoided here.
    with quiet_logger("lm_eval.models.huggingface"):
        return HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            mixed_precision_dtype=None if dtype_name == "fp32" else TORCH_DTYPES[dtype_name],
            softmax_dtype=torch.float32,
            batch_size=batch_size,
        )


def evaluate(lm, tasks, task_manager, *, limit, num_fewshot, batch_size, device):
    """lm-eval's simple_evaluate on loaded tasks: its results dict (log_samples off)."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=num_fewshot,
        limit=limit, batch_size=batch_size, device=str(device),
        log_samples=False,  # per-example records: not kept, not written
    )


# --- the report ---

def formatted(value):
    if isinstance(value, float):
        # Accuracies to 4 decimals; a perplexity can run to 10^17 (six digits say enough).
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.6g}"
    return "" if value is None else str(value)
