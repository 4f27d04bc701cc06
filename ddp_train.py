"""Pre-train a GPT-style model with PyTorch DistributedDataParallel.

    torchrun --nproc_per_node=N ddp_train.py RUN DATASETS_DIR [CHECKPOINT]
    python ddp_train.py RUN DATASETS_DIR [CHECKPOINT]       # one process

RUN names runs/RUN (or is a path to a run directory) holding model.json and train.json;
DATASETS_DIR is where train.json's dataset is downloaded to, or found. CHECKPOINT resumes:
latest, best, a checkpoint's directory name, or auto (the newest, else a fresh start).
Rank r of W, in micro-step m of A, trains on train batch (step * A + m) * W + r; every
validation_interval steps and at the last, the ranks validate together and global rank 0
writes a checkpoint. The README says the rest; the pieces are in support/.
"""

import os
import random
from pathlib import Path

import click

from support.command_line import answer_usage_first, relaunch_command

# The process that started this one (torchrun, or the shell of a plain run), read before
# the slow imports below: see parallel.die_with_launcher.
LAUNCHER_PID = os.getppid()


@click.command()
@click.argument("run")
@click.argument("datasets_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("checkpoint", required=False)
@click.option("--device", "device_name", type=click.Choice(["cuda", "mps", "cpu"]), default=None,
              help="Where to train (default: cuda if available, else mps, else cpu).")
@click.option("--preflight", "preflight_run", is_flag=True,
              help="Build the run as training would, train a few global steps on its data and print per rank "
                   "tokens/s, MFU and peak memory, and how long the whole run will take; writes nothing.")
@click.option("--preflight-steps", type=click.IntRange(min=1), default=None,
              help="Timed global steps of --preflight, after 2 warm-up steps (default 5).")
@click.option("--deadline", "deadline_hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --preflight: also print the tokens/s the run needs to end within this many hours.")
@click.option("-f", "--find-max-microbatch-size", "find_microbatch", is_flag=True,
              help="Search for the largest minibatch_size whose training step fits in memory, and print the "
                   "gradient_accumulation_steps that keeps the global batch; writes nothing.")
def main(run, datasets_dir, checkpoint, device_name, preflight_run, preflight_steps, deadline_hours,
         find_microbatch):
    """Train the model of runs/RUN on the dataset in its train.json (see the README).

    CHECKPOINT resumes: latest, best, a checkpoint's directory name, or auto (the newest
    checkpoint if there is one, else a fresh start)."""
    if preflight_run and find_microbatch:
        raise click.UsageError("--preflight and -f/--find-max-microbatch-size are separate runs: choose one")
    if not preflight_run and (preflight_steps is not None or deadline_hours is not None):
        raise click.UsageError("--preflight-steps and --deadline go with --preflight")
    ranks = read_ranks()
    die_with_launcher(ranks, LAUNCHER_PID)
    checking = preflight_run or find_microbatch
    resume_command = relaunch_command(["ddp_train.py", run, str(datasets_dir), "auto"]
                                      + (["--device", device_name] if device_name else []))
    resume_hint = None if checking else f"resume from the newest checkpoint with: {resume_command}"
    with one_line_per_failure(ranks, interrupted_hint=resume_hint):
        if checking:
            check_before_training(run, datasets_dir, checkpoint, device_name, ranks, find_microbatch,
                                  preflight_steps or preflight.TIMED_STEPS, deadline_hours)
        else:
            train(run, datasets_dir, checkpoint, device_name, ranks, resume_command)


# `--help` and usage mistakes are answered before torch is imported, which takes seconds
# (tens of seconds on a busy machine).
answer_usage_first(main)

import torch  # noqa: E402

from gpt import GPTModel, load_balancing_loss, routing_statistics  # noqa: E402
from support import checkpointing, devices, preflight, safe_files, weights  # noqa: E402
from support import run_history  # noqa: E402
from support.benchmark_scores import BenchmarkError, InTrainingBenchmarks  # noqa: E402
from support.config import load_model_config, load_train_config  # noqa: E402
from support.metrics import check_loggers_installed, start_metrics  # noqa: E402
from support.optimizer import (build_optimizer, clip_gradients, gradient_norm,  # noqa: E402
                               learning_rate_at, optimizer_step_unless, original_schedule,
                               set_learning_rate)
from support.parallel import (Ranks, all_reduce_sum, die_with_launcher, finish_process_group,  # noqa: E402
                              first_on_each_node, main_rank_alone, main_rank_first,
                              one_line_per_failure, read_ranks, report_to_launcher, start_process_group,
                              training_device, weights_finite, wrap_model)
from support.progress import TrainingProgress, startup_line  # noqa: E402
from support.token_data import DatasetError, check_first_batches, load_splits, resolve_dataset_dir  # noqa: E402
from support.health import Health, injected_loss_factor  # noqa: E402
from support.mirror import CheckpointMirror, fetch_newest  # noqa: E402
from support.mirror_targets import parse_target  # noqa: E402
from support.preemption import PREEMPTED_EXIT_CODE, Preemption  # noqa: E402
from support.training import (StepResult, Training, resume, roll_back, rolling_back, save,  # noqa: E402
                              validation_loss, wait_for_the_mirror)

RUNS_DIR = Path(__file__).resolve().parent / "runs"


# --- set-up: everything the loop needs, every input checked before anything is written ---

def set_up(run, datasets_dir: Path, checkpoint_name, device_name, ranks: Ranks, read_only=False) -> Training:
    # read_only (--preflight, -f): nothing written into the run directory, no lock, no clean-up.
    run_dir = checkpointing.find_run_dir(RUNS_DIR, run)
    model_config = load_model_config(run_dir / "model.json")
    config = load_train_config(run_dir / "train.json")
    check_loggers_installed(config, run_dir / "train.json")
    resume_from = checkpointing.find_checkpoint_to_resume(run_dir / "checkpoints", checkpoint_name)
    if resume_from is not None:
        checkpointing.check_resumable(resume_from, world_size=ranks.world_size,
                                      gradient_accumulation_steps=config.gradient_accumulation_steps,
                                      minibatch_size=config.minibatch_size,
                                      context_length=model_config["context_length"])
    # Starting weights from a file: for a fresh run only (a resume has its own).
    init_from = (weights.initial_weights_file(run_dir, config.init_from, model_config)
                 if config.init_from is not None and resume_from is None else None)
    device = training_device(device_name, ranks)
    devices.enable_tf32(device, enabled=config.use_amp is not False)   # "use_amp": false is true fp32
    dtype_name, dtype_note = devices.training_dtype(run_dir / "train.json", config, device)

    start_process_group(ranks, device)
    if checkpoint_name == "auto" and resume_from is None and config.checkpoint_mirror and not read_only:
        # A fresh machine: the newest complete checkpoint of the mirror, if it has one.
        main_rank_first(lambda: fetch_newest(parse_target(config.checkpoint_mirror, run_dir),
                                             run_dir / "checkpoints", say=print), ranks, click.ClickException)
        resume_from = checkpointing.find_checkpoint_to_resume(run_dir / "checkpoints", checkpoint_name)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    splits = ("train", "validation") if config.validates else ("train",)
    dataset_dir = Path(first_on_each_node(
        lambda: str(resolve_dataset_dir(config.dataset, datasets_dir, splits)), ranks, DatasetError))
    train_batches, val_batches = load_splits(dataset_dir, config, model_config,
                                             ranks.world_size * config.gradient_accumulation_steps)
    checked_batches = main_rank_first(lambda: check_first_batches(train_batches, val_batches), ranks,
                                      DatasetError)
    # Benchmark tasks are found and loaded (datasets fetched) by global rank 0 now, so that
    # a mistake in them stops the run before it starts, not at its first benchmark.
    benchmarks = None
    if config.benchmark_tasks:
        benchmarks = InTrainingBenchmarks(config, run_dir, model_config, device, dtype_name)
        main_rank_first(benchmarks.load, ranks, BenchmarkError)
    # The run directory's first write, once every input has been checked: its lock.
    run_lock = None if read_only else main_rank_first(lambda: safe_files.lock_run(run_dir), ranks,
                                                      click.ClickException)

    # Same initial weights on every rank (DDP broadcasts rank 0's anyway); then each rank
    # its own stream for dropout, or, as the later original's random_seed, one for all.
    if not config.seed_each_rank:
        random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = GPTModel(model_config)
    for weights_file in (init_from, resume_from and resume_from.path / weights.MODEL_FILE):
        if weights_file is not None:
            weights.load_weights_into(model, weights_file, model_config_path=run_dir / "model.json")
    model.to(device)
    if config.seed_each_rank:
        torch.manual_seed(config.seed + ranks.rank)
    wrapped = wrap_model(model, ranks, device, dtype_name, parallelism=config.parallelism,
                         activation_checkpointing=config.activation_checkpointing, compile=config.compile)
    training = Training(ranks, run_dir, model_config, config, device, dtype_name, train_batches, val_batches,
                        model=wrapped, optimizer=build_optimizer(model, config, device),
                        scaler=torch.amp.GradScaler(device.type, enabled=dtype_name == "fp16"),
                        run_lock=run_lock, benchmarks=benchmarks, best_key=run_history.best_loss_key(config))
    if config.lr_schedule == "original":
        training.scheduler = original_schedule(training.optimizer, config, training.total_steps)
    training.health = Health(config, device)
    if resume_from is not None:
        resume(training, resume_from)
    training.injected_loss = injected_loss_factor(ranks.rank)
    notes = [dtype_note] if dtype_note else []
    if config.ignored_keys:
        notes.append(f"note: {run_dir / 'train.json'}: {' and '.join(config.ignored_keys)} not used: "
                     f"checkpoint_interval checkpoints without validation, as the original at c894ed0")
    if not read_only:
        checkpoint_names = {c.global_step: c.name for c in checkpointing.list_checkpoints(training.checkpoints_dir)}
        training.metrics, metrics_notes = start_metrics(training, checkpoint_names)
        notes += metrics_notes
        if training.resumed_session is not None:
            training.metrics.load_state(training.resumed_session["metrics"])
        training.preemption = Preemption(device, config.preemption_grace_seconds)
    if ranks.is_main:
        if not read_only:
            checkpointing.remove_leftovers(training.checkpoints_dir)
        for line in notes + checkpointing.link_warnings(training.checkpoints_dir, training.best_key):
            print(line)
        print(startup_line(training, dataset_dir, checked_batches, init_from, checkpoint_name))
    return training


def check_before_training(run, datasets_dir, checkpoint_name, device_name, ranks: Ranks,
                          find_microbatch: bool, preflight_steps: int, deadline_hours: float | None):
    """--preflight and -f (support/preflight.py): the run as training builds it, its directory untouched."""
    training = set_up(run, datasets_dir, checkpoint_name, device_name, ranks, read_only=True)
    if find_microbatch:
        preflight.find_max_microbatch_size(training, train_step)
    else:
        preflight.measure_run(training, train_step, timed_steps=preflight_steps, deadline_hours=deadline_hours)
    finish_process_group(ranks)


# --- the training loop ---

def train(run, datasets_dir, checkpoint_name, device_name, ranks: Ranks, resume_command: str):
    training = set_up(run, datasets_dir, checkpoint_name, device_name, ranks)
    training.preemption.install()
    if training.start_step >= training.total_steps:
        if ranks.is_main:
            print(f"nothing to train: {training.resumed_from.name} is at the last of the dataset's "
                  f"{training.total_steps:,} global steps; to train longer, raise min_train_tokens in "
                  f"{training.run_dir / 'train.json'} (-1: the whole split) and resume again (with the "
                  f"cosine schedule, the learning rate then follows the longer run's curve)")
        training.metrics.close()
        finish_process_group(ranks)
        return

    progress, health = TrainingProgress(training), training.health
    if ranks.is_main and training.config.checkpoint_mirror:
        training.mirror = CheckpointMirror(parse_target(training.config.checkpoint_mirror, training.run_dir),
                                           training.checkpoints_dir, keep=training.config.keep_checkpoints,
                                           say=progress.write)
    step = training.start_step
    while step < training.total_steps:
        result = train_step(training, step)
        progress.step_done(step, result)
        health.step_done(step, result, keep_spikes=ranks.is_main)
        if health.due(step) or training.checkpoint_due(step):
            spike = health.check(training.checkpoints_dir)   # every rank alike; too many non-finite: stop
            progress.spikes(health.take_spikes() if ranks.is_main else [])
            if spike is not None and rolling_back(training, spike):
                checkpoint_, skipped = roll_back(training, spike)
                step = progress.rolled_back(checkpoint_, skipped, spike)
                continue
        if training.checkpoint_due(step):
            checkpoint(training, progress, step, result)
        if result.stop:
            stop_for_preemption(training, progress, step, result, resume_command)
        step = training.next_step(step)
    progress.finish(training.best_loss)
    wait_for_the_mirror(training)
    finish_process_group(ranks)


def stop_for_preemption(training: Training, progress: TrainingProgress, step: int, result: StepResult,
                        resume_command: str) -> None:
    """SIGTERM reached a rank: every rank is at this step. Unless this step's regular
    checkpoint was just written (or its weights are not healthy), global rank 0 writes a
    resume point here (no validation, never best); then every rank exits, "stopped,
    resumable" (support/preemption.py)."""
    name = None
    written = bool(training.history) and training.history[-1]["global_step"] == step
    healthy = not result.nonfinite.item() and weights_finite(training.model, training.ranks)
    if not written and healthy:
        name = save(training, step, result, {"train_loss": None, "val_loss": None, "window": None}, False,
                    progress.low_space_warning) or "a resume point (written by global rank 0)"
    if training.mirror is not None:
        training.mirror.wait()   # within the grace period, or not at all: queued copies go on at the next start
    line = progress.stopped(step, written, name, resume_command)
    report_to_launcher(line, PREEMPTED_EXIT_CODE)   # and a torchrun restart gives up at once
    finish_process_group(training.ranks)   # rank 0's files are complete before any rank exits
    raise SystemExit(PREEMPTED_EXIT_CODE)


def train_step(training: Training, step: int) -> StepResult:
    """One global step: every micro-step's forward and backward, clipping, AdamW. Nothing
    here waits for the device: the losses and the gradient norm stay device tensors."""
    model, optimizer, scaler, config = training.model, training.optimizer, training.scaler, training.config
    accumulation, world_size = config.gradient_accumulation_steps, training.ranks.world_size
    if training.scheduler is None:
        learning_rate = learning_rate_at(step, training.total_steps, config)
        set_learning_rate(optimizer, learning_rate)
    else:
        learning_rate = optimizer.param_groups[0]["lr"]   # the original's schedule set it at the last step
    result = StepResult(torch.zeros((), device=training.device), learning_rate, None, [])
    for micro_step in range(accumulation):
        batch_index = (step * accumulation + micro_step) * world_size + training.ranks.rank
        inputs, targets = devices.to_device(training.train_batches[batch_index], training.device)
        with model.gradient_sync(final_micro_step=micro_step == accumulation - 1):
            with model.autocast:
                # Mean cross-entropy over every position, computed chunk by chunk without
                # materialising the logits; a mixture of experts also says how it routed.
                if training.is_moe:
                    loss, routing = model.training(inputs, targets=targets, return_routing=True)
                    objective = add_moe_terms(training, result, loss, routing)
                else:
                    loss = objective = model.training(inputs, targets=targets)
                if training.injected_loss is not None and step in training.injected_loss[0]:
                    loss = objective = loss * training.injected_loss[1]
            scaler.scale(objective / accumulation).backward()
        result.loss_sum += loss.detach()
        result.micro_losses.append(loss.detach())
    if config.grad_clip is not None:
        result.grad_norm = clip_gradients(model, optimizer, scaler, config.grad_clip)
    flag_nonfinite_step(training, result)
    optimizer_step_unless(result.nonfinite, optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    if training.scheduler is not None:
        training.scheduler.step()
    return result


def flag_nonfinite_step(training: Training, result: StepResult) -> None:
    """Whether the step's loss over every rank, or its global gradient norm, is not
    finite: the same on every rank, so every rank skips the same steps (support/health.py).
    Under fp16 the scaler skips gradients that overflow, as it must while it finds its
    scale: only a loss that is not finite counts there."""
    stop = training.preemption.flag() if training.preemption else torch.zeros((), device=training.device)
    result.global_loss_sum, stop = all_reduce_sum(torch.stack([result.loss_sum, stop]), training.ranks)
    result.stop = training.preemption is not None and training.preemption.stop_after(stop)
    result.mean_loss = result.global_loss_sum / training.micro_batches_per_step
    loss_bad = ~torch.isfinite(result.global_loss_sum)
    norm_bad = torch.zeros_like(loss_bad)
    if not training.scaler.is_enabled():
        norm = result.grad_norm if result.grad_norm is not None else gradient_norm(training.model)
        norm_bad = ~torch.isfinite(norm)
    result.nonfinite = (loss_bad | norm_bad).float()
    result.nonfinite_what = loss_bad.float() + 2 * norm_bad.float()


def add_moe_terms(training: Training, result: StepResult, loss, routing):
    """A mixture of experts' micro-step: its routing statistics (global rank 0, for
    meta.json and metrics.jsonl) and, where train.json asks, the load-balancing loss
    added to what is minimised (the logged loss stays the cross-entropy)."""
    weight = training.config.moe_balance_loss_weight
    if training.ranks.is_main:
        result.routing.append(routing_statistics(routing))
    if weight == 0:
        return loss
    balance = load_balancing_loss(routing)
    result.balance_loss = balance.detach() if result.balance_loss is None else result.balance_loss + balance.detach()
    return loss + weight * balance


def checkpoint(training: Training, progress: TrainingProgress, step: int, result: StepResult) -> None:
    """Every rank: the checkpoint's losses (and the validation loss, where the run
    validates); global rank 0: a checkpoint and its metrics row, benchmark scores when
    due, and the charts redrawn."""
    ranks, model = training.ranks, training.model
    # Never weights that are not finite, nor those of a step that was not: latest stays on
    # the newest healthy checkpoint (every rank decides alike: the flag is the same on all).
    if result.nonfinite.item() or not weights_finite(model, ranks):
        progress.write(f"step {step:,}: no checkpoint: its {'step' if result.nonfinite.item() else 'weights'} "
                       f"not finite; latest stays where it was")
        return
    losses = training.metrics.take_checkpoint_losses()   # before validating: tokens/s is training's alone
    losses["val_loss"] = validation_loss(training) if training.config.validates else None
    is_best = False
    if ranks.is_main:   # the window's average (the later original's best) is rank 0's alone
        value = losses["window"][training.best_key] if training.best_key == "avg_train_loss" else losses[training.best_key]
        is_best = value < training.best_loss
        training.best_loss = min(training.best_loss, value)
    training.history.append({"global_step": step, "train_loss": losses["train_loss"], "val_loss": losses["val_loss"],
                             "is_best": is_best})
    saved_name = save(training, step, result, losses, is_best, progress.low_space_warning)
    progress.checkpoint_written(step, losses, is_best, saved_name)
    if training.benchmarks is not None and training.benchmarks.due(step, training.is_last(step)):
        main_rank_alone(lambda: training.benchmarks.score(step, saved_name, training.saved_model_state,
                                                          training.metrics, progress.write), ranks)
    training.saved_model_state = None
    progress.checkpoint_done(step)


if __name__ == "__main__":
    main()
