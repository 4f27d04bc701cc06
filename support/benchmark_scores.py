"""lm-evaluation-harness scores of a model: finding and loading the tasks, handing the
weights to lm-eval through a transformers export, and the scores as metrics.jsonl rows.

Two users:
- test_benchmarks.py scores a checkpoint on disk and prints a table;
- ddp_train.py, when train.json names `benchmark_tasks`, scores the weights it has just
  checkpointed, on global rank 0, every `benchmark_interval` steps (InTrainingBenchmarks),
  and logs a "benchmark" row.

lm-eval takes seconds to import (transformers with it), so it is imported inside the
functions that need it: a script's --help, and a training run without benchmarks, never
load it. torch is imported inside functions too, so that chart.py can read the rows'
scores (task_scores, main_metric) without it.
"""

import contextlib
import io
import math
import tempfile
import time
from pathlib import Path

import click

from .safe_files import first_line

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


def refuse_without_gpt2_tokenizer(model_config, model_json, context=""):
    """One line (context, if given, first) for a model whose embeddings don't cover
    GPT-2's token ids: lm-eval's tasks are text, and text here is GPT-2's tokens."""
    from . import hf_gpt2
    from . import tokenizer

    if not hf_gpt2.has_gpt2_tokenizer(model_config):
        raise BenchmarkError(
            f"{context}{model_json}: vocab_size {model_config['vocab_size']} is smaller than GPT-2's "
            f"{tokenizer.VOCAB_SIZE}: lm-eval's tasks are text, read with GPT-2's tokenizer")


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

    from . import hf_gpt2
    from .devices import TORCH_DTYPES

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


@contextlib.contextmanager
def kept_random_states(device):
    """Every random-number generator training uses as it was before: simple_evaluate
    seeds Python's, numpy's and torch's (on the CPU and the device), and training's
    dropout masks must not notice that benchmarks ran. (Of the GPUs, only the training
    device's generator is kept: the others' are no part of this process's training.)"""
    import random

    import numpy

    from .parallel import generator_states, set_generator_states

    python_state, numpy_state, torch_states = random.getstate(), numpy.random.get_state(), generator_states(device)
    try:
        yield
    finally:
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)
        set_generator_states(torch_states, device)


# --- the scores as metrics.jsonl keys, and read back ---

def formatted(value):
    if isinstance(value, float):
        # Accuracies to 4 decimals; a perplexity can run to 10^17 (six digits say enough).
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.6g}"
    return "" if value is None else str(value)


def score_columns(results):
    """Every finite score of lm-eval's results as a flat key: TASK/METRIC (a standard
    error is METRIC_stderr, as lm-eval names it), with /FILTER appended for a filter
    other than lm-eval's `none`. Groups count as tasks."""
    columns = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            # Keys without a filter (alias, sample_len) are no scores; "N/A" stderrs are no numbers.
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                continue
            columns[f"{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = value
    return columns


def headline_tasks(loaded, columns):
    """The names a summary line and the chart show: each task, group or tag's task asked
    for, or, for a group that reports no score of its own, its tasks."""
    from lm_eval.api.group import Group

    names = []
    for item in loaded:
        name = item_name(item)
        if any(key.startswith(f"{name}/") for key in columns) or not isinstance(item, Group):
            names.append(name)
        else:
            names += [task.task_name for task in item.get_all_tasks()]
    return list(dict.fromkeys(names))


def task_scores(row, task):
    """{metric: (value, standard error or None)} of one task in a benchmark row."""
    prefix = f"{task}/"
    values = {key[len(prefix):]: value for key, value in row.items() if key.startswith(prefix)}
    scores = {}
    for metric, value in values.items():
        name, slash, filter_name = metric.partition("/")
        if name.endswith("_stderr"):
            continue
        scores[metric] = (value, values.get(f"{name}_stderr{slash}{filter_name}"))
    return scores


def main_metric(metrics):
    """The one score to show of a task: acc_norm where there is one (what HellaSwag and
    ARC results quote), else acc, else the first."""
    for wanted in ("acc_norm", "acc"):
        if wanted in metrics:
            return wanted
    return next(iter(metrics), None)


def benchmark_row(step, checkpoint_name, tasks, columns, limit, seconds):
    return {"kind": "benchmark", "step": step, "checkpoint": checkpoint_name, "tasks": tasks,
            "limit": limit, "seconds": round(seconds, 3), **columns}


def summary_line(row):
    """The line training prints: each headline task's main score."""
    shown = []
    for task in row["tasks"]:
        scores = task_scores(row, task)
        metric = main_metric(scores)
        if metric is not None:
            value, stderr = scores[metric]
            shown.append(f"{task} {metric} {formatted(float(value))}"
                         + (f" ± {formatted(float(stderr))}" if stderr is not None else ""))
    return (f"step {row['step']:,}: benchmarks {', '.join(shown) or 'gave no scores'} "
            f"(first {row['limit']:,} examples of each task; {row['seconds']:.1f} s)")


# --- during training ---

class InTrainingBenchmarks:
    """train.json's benchmark_tasks, scored on the weights of checkpoints.

    At start-up global rank 0 finds and loads the tasks (`load`), datasets included,
    before anything is written into the run directory: a mistake there is one line, not
    a failure hours into training. At a benchmark checkpoint (`due`) rank 0 scores the
    full state dict just gathered for the checkpoint (`score`), while the other ranks
    wait for it (ddp_train.py: parallel.main_rank_alone).
    """

    def __init__(self, config, run_dir: Path, model_config: dict, device, dtype_name: str):
        self.names = list(config.benchmark_tasks)
        self.interval, self.limit = config.benchmark_interval, config.benchmark_limit
        # What fits in a training step (with its backward) fits in a forward pass.
        self.batch_size = config.minibatch_size
        self.include_path = config.benchmark_include_path
        self.run_dir, self.model_config = Path(run_dir), model_config
        self.device, self.dtype_name = device, dtype_name
        self.task_manager = self.tasks = None   # global rank 0, once loaded

    def load(self) -> None:
        """Global rank 0: find and load the tasks, or raise BenchmarkError naming
        train.json's key (a mixture-of-experts model first, before lm-eval is imported)."""
        from . import hf_gpt2

        train_json = self.run_dir / "train.json"
        option = f"{train_json}: key 'benchmark_tasks'"
        # lm-eval scores a transformers GPT-2, which has no mixture of experts.
        refusal = hf_gpt2.mixture_of_experts_refusal(
            self.model_config, self.run_dir / "model.json", context=f"{option} is set, but ",
            instead="leave benchmark_tasks out: the run's validation loss scores it, and afterwards "
                    "test_loss.py, test_smoke.py or test_ift.py")
        if refusal is not None:
            raise BenchmarkError(refusal)
        refuse_without_gpt2_tokenizer(self.model_config, self.run_dir / "model.json", context=f"{option} is set, but ")
        include_dirs = []
        if self.include_path is not None:
            # Relative to the run directory, as init_from.
            directory = self.run_dir / Path(self.include_path).expanduser()
            include_dirs.append(checked_include_dir(
                directory, f"{train_json}: key 'benchmark_include_path' \"{self.include_path}\" ({directory})"))
        self.task_manager = lm_eval_task_manager(self.names, include_dirs)
        selected = select_tasks(self.task_manager, self.names, include_dirs, option=option)
        self.tasks = load_tasks(self.task_manager, selected, context=f"{option}: ")
        refuse_what_cannot_run_here(self.tasks, option=option, context=f"{option}: ")

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    def score(self, step: int, checkpoint_name: str, model_state: dict, metrics, say) -> None:
        """Global rank 0: score model_state (only read), write the benchmark row with
        metrics (a MetricsLog) and say (print) one line. Nothing of training changes:
        the generators' states are put back, and the scoring model is a copy of its own.
        A failure (out of memory, say) is a warning; training goes on."""
        import torch

        started = time.monotonic()
        # lm-eval's and transformers' progress bars and notes would tear through the
        # training's progress bar: kept out of sight.
        hidden = io.StringIO()
        try:
            with kept_random_states(self.device), contextlib.redirect_stdout(hidden), \
                    contextlib.redirect_stderr(hidden):
                lm = load_exported_model(self.model_config, model_state, self.device, self.dtype_name,
                                         self.batch_size)
                results = evaluate(lm, self.tasks, self.task_manager, limit=self.limit, num_fewshot=None,
                                   batch_size=self.batch_size, device=self.device)
        except Exception as error:  # whatever failed, training goes on without these scores
            say(f"warning: benchmarks at step {step:,} failed after {time.monotonic() - started:.1f} s "
                f"({first_line(error)}); training goes on")
            return
        finally:
            lm = None  # the scoring model's memory, back for training
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        columns = score_columns(results)
        row = benchmark_row(step, checkpoint_name, headline_tasks(self.tasks, columns), columns,
                            self.limit, time.monotonic() - started)
        metrics.write_now(row)
        say(summary_line(row))
