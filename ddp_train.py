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
    resume_hint = None if checking else "resume from the newest checkpoint with\n  " + relaunch_command(
        ["ddp_train.py", run, str(datasets_dir), "auto"] + (["--device", device_name] if device_name else []))
    with one_line_per_failure(ranks, interrupted_hint=resume_hint):
        if checking:
            check_before_training(run, datasets_dir, checkpoint, device_name, ranks, find_microbatch,
                                  preflight_steps or preflight.TIMED_STEPS, deadline_hours)
        else:
            train(run, datasets_dir, checkpoint, device_name, ranks)


# `--help` and usage mistakes are answered before torch is imported, which takes seconds
# (tens of seconds on a busy machine).
answer_usage_first(main)

import torch  # noqa: E402

from gpt import GPTModel  # noqa: E402
from support import checkpointing, devices, preflight, safe_files, weights  # noqa: E402
from support.benchmark_scores import BenchmarkError, InTrainingBenchmarks  # noqa: E402
from support.config import load_model_config, load_train_config  # noqa: E402
from support.metrics import check_loggers_installed, start_metrics  # noqa: E402
from support.optimizer import (build_optimizer, clip_gradients, full_optimizer_state,  # noqa: E402
                               learning_rate_at, load_optimizer_state, set_learning_rate)
from support.parallel import (Ranks, all_reduce_sum, die_with_launcher, finish_process_group,  # noqa: E402
                              first_on_each_node, full_model_state, main_rank_alone, main_rank_first,
                              one_line_per_failure, read_ranks, restore_rng_states, rng_states,
                              start_process_group, training_device, wrap_model)
from support.progress import TrainingProgress, startup_line  # noqa: E402
from support.token_data import DatasetError, check_first_batches, load_splits, resolve_dataset_dir  # noqa: E402
from support.training import Training  # noqa: E402

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
    devices.enable_tf32(device)
    dtype_name = devices.training_dtype(run_dir / "train.json", config, device)

    start_process_group(ranks, device)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir = Path(first_on_each_node(
        lambda: str(resolve_dataset_dir(config.dataset, datasets_dir)), ranks, DatasetError))
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

    # Same initial weights on every rank (DDP broadcasts rank 0's anyway), then each
    # rank its own stream for dropout.
    torch.manual_seed(config.seed)
    model = GPTModel(model_config)
    for weights_file in (init_from, resume_from and resume_from.path / weights.MODEL_FILE):
        if weights_file is not None:
            weights.load_weights_into(model, weights_file, model_config_path=run_dir / "model.json")
    model.to(device)
    torch.manual_seed(config.seed + ranks.rank)
    wrapped = wrap_model(model, ranks, device, dtype_name, parallelism=config.parallelism,
                         activation_checkpointing=config.activation_checkpointing, compile=config.compile)
    training = Training(ranks, run_dir, model_config, config, device, dtype_name, train_batches, val_batches,
                        model=wrapped, optimizer=build_optimizer(model, config, device),
                        scaler=torch.amp.GradScaler(device.type, enabled=dtype_name == "fp16"),
                        run_lock=run_lock, benchmarks=benchmarks)
    if resume_from is not None:
        resume(training, resume_from)
    notes = []
    if not read_only:
        checkpoint_names = {c.global_step: c.name for c in checkpointing.list_checkpoints(training.checkpoints_dir)}
        training.metrics, notes = start_metrics(training, checkpoint_names)
    if ranks.is_main:
        if not read_only:
            checkpointing.remove_leftovers(training.checkpoints_dir)
        for line in notes + checkpointing.link_warnings(training.checkpoints_dir):
            print(line)
        print(startup_line(training, dataset_dir, checked_batches, init_from, checkpoint_name))
    return training


def resume(training: Training, checkpoint: checkpointing.Checkpoint) -> None:
    """Continue where `checkpoint` left off: optimizer and scaler states, the step, the
    best loss and loss history, and every rank's generator states (the weights are
    already loaded)."""
    ranks, device = training.ranks, training.device
    training.resumed_from = checkpoint
    state = checkpointing.read_resume_state(checkpoint)
    load_optimizer_state(training.model.model, training.optimizer, state.optimizer_state,
                         checkpoint.path / checkpointing.OPTIMIZER_FILE, sharded=training.model.sharded)
    if training.scaler.is_enabled() and state.scaler_state:
        training.scaler.load_state_dict(state.scaler_state)
    training.start_step = checkpoint.global_step + 1
    training.best_loss = checkpointing.best_val_loss(training.checkpoints_dir)
    training.history = checkpointing.run_history(training.checkpoints_dir, resuming_from=checkpoint)
    if state.rng_state is not None and state.rng_state.get("world_size") == ranks.world_size:
        restore_rng_states(state.rng_state, ranks, device)
    else:
        # The original scripts saved no generator states: dropout masks from here on
        # can't match an uninterrupted run, but stay distinct per rank and per resume.
        torch.manual_seed(training.seed + ranks.rank + 1_000_003 * training.start_step)
        if ranks.is_main:
            print(f"note: {checkpoint.name} holds no random-number generator states for "
                  f"{ranks.world_size} rank(s); training goes on with freshly seeded ones")


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

def train(run, datasets_dir, checkpoint_name, device_name, ranks: Ranks):
    training = set_up(run, datasets_dir, checkpoint_name, device_name, ranks)
    if training.start_step >= training.total_steps:
        if ranks.is_main:
            print(f"nothing to train: {training.resumed_from.name} is at the last of the dataset's "
                  f"{training.total_steps:,} global steps; to train longer, raise min_train_tokens in "
                  f"{training.run_dir / 'train.json'} (-1: the whole split) and resume again (with the "
                  f"cosine schedule, the learning rate then follows the longer run's curve)")
        training.metrics.close()
        finish_process_group(ranks)
        return

    progress = TrainingProgress(training)
    for step in range(training.start_step, training.total_steps):
        step_loss, learning_rate, grad_norm = train_step(training, step)
        progress.step_done(step, step_loss, learning_rate, grad_norm)
        if training.checkpoint_due(step):
            validate_and_checkpoint(training, progress, step, learning_rate, grad_norm)
    progress.finish(training.best_loss)
    finish_process_group(ranks)


def train_step(training: Training, step: int):
    """One global step: every micro-step's forward and backward, clipping, AdamW.
    Returns this rank's loss summed over the micro-steps and the gradient norm before
    clipping (device tensors: nothing here waits for the device), and the learning rate."""
    model, optimizer, scaler, config = training.model, training.optimizer, training.scaler, training.config
    accumulation, world_size = config.gradient_accumulation_steps, training.ranks.world_size
    learning_rate = learning_rate_at(step, training.total_steps, config)
    set_learning_rate(optimizer, learning_rate)
    step_loss = torch.zeros((), device=training.device)
    for micro_step in range(accumulation):
        batch_index = (step * accumulation + micro_step) * world_size + training.ranks.rank
        inputs, targets = devices.to_device(training.train_batches[batch_index], training.device)
        with model.gradient_sync(final_micro_step=micro_step == accumulation - 1):
            with model.autocast:
                # Mean cross-entropy over every position, as the original; the model
                # computes it chunk by chunk without materialising the logits.
                loss = model.training(inputs, targets=targets)
            scaler.scale(loss / accumulation).backward()
        step_loss += loss.detach()
    grad_norm = None
    if config.grad_clip is not None:
        grad_norm = clip_gradients(model, optimizer, scaler, config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, learning_rate, grad_norm


@torch.inference_mode()
def validation_loss(training: Training) -> float:
    """Mean loss over validation batches 0..n-1, the original's number, with each rank
    computing a share (batches rank, rank + W, ...) and one all-reduce joining them."""
    model, ranks, batches = training.model, training.ranks, training.val_batches
    model.evaluation.eval()
    losses = torch.zeros(len(batches), device=training.device)
    # Every rank runs the same number of forward passes: under FSDP each one all-gathers
    # the weights with every other rank, so a rank with one batch fewer would hang the
    # rest. The last round's spare ranks recompute batch 0 and drop the result.
    for first in range(0, len(batches), ranks.world_size):
        index = first + ranks.rank
        inputs, targets = devices.to_device(batches[index if index < len(batches) else 0], training.device)
        with model.autocast:
            loss = model.evaluation(inputs, targets=targets)
        if index < len(batches):
            losses[index] = loss
    all_reduce_sum(losses, ranks)  # each entry is non-zero on one rank only: sums are exact
    model.evaluation.train()
    # Added up in batch order in Python floats, as the original did batch by batch.
    return sum(losses.tolist()) / len(batches)


def validate_and_checkpoint(training: Training, progress: TrainingProgress, step: int,
                            learning_rate: float, grad_norm) -> None:
    """Every rank: the validation loss and the mean training loss since the last
    checkpoint; global rank 0: a checkpoint and its validation row, benchmark scores when
    due, and the charts redrawn."""
    ranks, model = training.ranks, training.model
    train_loss = training.metrics.take_train_loss()   # before validating: tokens/s is training's alone
    val_loss = validation_loss(training)
    is_best = val_loss < training.best_loss
    training.best_loss = min(training.best_loss, val_loss)
    training.history.append({"global_step": step, "train_loss": train_loss, "val_loss": val_loss,
                             "is_best": is_best})
    # Collectives first (every rank takes part), then rank 0 writes alone.
    rng_state = rng_states(ranks, training.device)
    model_state = full_model_state(model, ranks)
    optimizer_state = full_optimizer_state(model.model, training.optimizer, sharded=model.sharded)
    saved_name = None
    if ranks.is_main:
        progress.low_space_warning()
        meta = checkpointing.checkpoint_meta(training, step, train_loss, val_loss, is_best, learning_rate,
                                             None if grad_norm is None else grad_norm.item())
        saved_name = checkpointing.save_checkpoint(
            training.checkpoints_dir, model_state=model_state, optimizer_state=optimizer_state,
            scaler_state=training.scaler.state_dict(), rng_state=rng_state, meta=meta,
            keep=training.config.keep_checkpoints, model_config=training.model_config).name
    progress.checkpoint_written(step, train_loss, val_loss, is_best, saved_name)
    if training.benchmarks is not None and training.benchmarks.due(step, training.is_last(step)):
        main_rank_alone(lambda: training.benchmarks.score(step, saved_name, model_state, training.metrics,
                                                          progress.write), ranks)
    progress.checkpoint_done(step)


if __name__ == "__main__":
    main()
