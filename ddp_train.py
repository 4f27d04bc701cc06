"""Pre-train a GPT-style model with PyTorch DistributedDataParallel.

    torchrun --nnodes=1 --nproc_per_node=N ddp_train.py RUN DATASETS_DIR [CHECKPOINT]
    uv run python ddp_train.py RUN DATASETS_DIR [CHECKPOINT]      # one process
    ... ddp_train.py RUN DATASETS_DIR [CHECKPOINT] --preflight | -f  # measure first; writes nothing

RUN is a directory under runs/ (or a path to one) holding model.json and train.json.
DATASETS_DIR is where the dataset named in train.json is downloaded to, or found.
CHECKPOINT resumes a run: `latest`, `best` or a directory name under
runs/RUN/checkpoints/; `auto` resumes from the newest checkpoint when there is one and
starts fresh when there is none, so that `torchrun --max-restarts=N ... auto` picks a
crashed run up again by itself.

What one global step is. Rank r of W ranks, in micro-step m of A
(gradient_accumulation_steps), trains on train batch (step * A + m) * W + r; with
A = 1 that is the original scripts' step * W + r. Gradients are averaged over all
W * A micro-batches before AdamW steps once. Every validation_interval steps, and
at the last one, all ranks compute the validation loss together and global rank 0
writes a checkpoint (see checkpointing.py), its row in metrics.jsonl, and redraws the
charts (see chart.py). With "benchmark_tasks" in train.json, rank 0 also scores some
checkpoints with lm-eval (see benchmark_scores.py) while the other ranks wait.

Devices: CUDA with NCCL (one process per GPU, LOCAL_RANK picks it), CPU with gloo
(any number of processes), Apple MPS in one process.

Scale-out (train.json): "parallelism": "fsdp" shards weights, gradients and AdamW state
over the ranks with FSDP2 instead of replicating them with DDP; checkpoints are the same
files either way. "activation_checkpointing": true recomputes each block in backward.
Multi-node torchrun needs nothing special: each node's local rank 0 fetches the dataset.
"""

import math
import os
import sys
from dataclasses import dataclass, field
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
    try:
        if preflight_run or find_microbatch:
            check_before_training(run, datasets_dir, checkpoint, device_name, ranks, find_microbatch,
                                  preflight_steps or preflight.TIMED_STEPS, deadline_hours)
        else:
            train(run, datasets_dir, checkpoint, device_name, ranks)
    except click.ClickException as error:
        # torchrun's failure summary then names our line as the root cause.
        report_to_launcher(error.format_message())
        # Every rank hits the same user mistake; one line per node is enough.
        if ranks.local_rank != 0:
            raise SystemExit(error.exit_code) from None
        raise
    except KeyboardInterrupt:
        if ranks.local_rank == 0 and not (preflight_run or find_microbatch):
            print(f"\ninterrupted: resume from the newest checkpoint with\n"
                  f"  {relaunch_command(['ddp_train.py', run, str(datasets_dir), 'auto'] + (['--device', device_name] if device_name else []))}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if ranks.rank == 0 or not lost_a_peer(error):
            raise
        # Another rank failed and said why; this one only saw the connection drop.
        print(f"rank {ranks.rank}: stopped, another rank failed ({first_line(error)})", file=sys.stderr)
        report_to_launcher(f"stopped: another rank failed ({first_line(error)})")
        raise SystemExit(1) from None


# `--help` and usage mistakes are answered before torch is imported, which takes seconds
# (tens of seconds on a busy machine).
answer_usage_first(main)

import torch  # noqa: E402

from support import checkpointing  # noqa: E402
from support import devices  # noqa: E402
from support import preflight  # noqa: E402
from support.benchmark_scores import BenchmarkError, InTrainingBenchmarks  # noqa: E402
from support.charts import bad_lines_warning, redraw_charts  # noqa: E402
from support.config import ConfigError, TrainConfig, load_model_config, load_train_config  # noqa: E402
from gpt import GPTModel  # noqa: E402
from support.metrics import METRICS_FILE, MetricsError, MetricsLog, check_loggers_installed  # noqa: E402
from support.optimizer import (build_optimizer, full_optimizer_state, learning_rate_at,  # noqa: E402
                       load_optimizer_state, set_learning_rate)
from support.parallel import (Ranks, WrappedModel, all_reduce_sum, die_with_launcher,  # noqa: E402
                      finish_process_group, first_on_each_node, full_model_state, lost_a_peer,
                      main_rank_alone, main_rank_first, read_ranks, report_to_launcher,
                      restore_rng_states, rng_states, start_process_group, wrap_model)
from support.safe_files import first_line  # noqa: E402
from support.token_data import DatasetError, TokenBatches, load_dataset, resolve_dataset_dir  # noqa: E402
from support.progress import TrainingProgress  # noqa: E402

RUNS_DIR = Path(__file__).resolve().parent / "runs"
STARTUP_CHECKED_BATCHES = 100   # train batches whose token ids are checked before training


# --- inputs: run directory, configs, checkpoint to resume, device and precision ---

def find_run_dir(run: str) -> Path:
    """runs/RUN, as the original; or RUN itself when it is a path to a run directory."""
    candidates = [Path(run)] if os.sep in run or run.startswith(".") else [RUNS_DIR / run, Path(run)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise click.ClickException(
        f"no run directory {candidates[0]} (a run is a directory holding model.json and train.json)")


def find_checkpoint_to_resume(checkpoints_dir: Path, name: str | None):
    """The checkpoint to resume from; None for a fresh run, which must not clobber an old one.
    `auto` takes the newest complete checkpoint: what `latest` points at, or one a crash
    left complete before `latest` was moved to it."""
    if name == "auto":
        existing = checkpointing.list_checkpoints(checkpoints_dir)
        return existing[-1] if existing else None
    if name is not None:
        return checkpointing.resolve_checkpoint(checkpoints_dir, name)
    existing = checkpointing.list_checkpoints(checkpoints_dir)
    if existing:
        raise click.ClickException(
            f"{checkpoints_dir} already holds {len(existing)} checkpoint(s), newest "
            f"{existing[-1].name}: pass `latest` (or another checkpoint) to resume, or move "
            f"that directory away to start this run again"
        )
    return None


def choose_device(name: str | None, ranks: Ranks) -> torch.device:
    try:
        device = devices.resolve_device(name)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(f"--device: {error}") from None
    if device.type == "cuda":
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local_world_size > torch.cuda.device_count():
            raise click.ClickException(
                f"{local_world_size} processes per node but only {torch.cuda.device_count()} "
                f"CUDA device(s) visible: use --nproc_per_node={torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "mps" and ranks.world_size > 1:
        raise click.ClickException("MPS trains in a single process: use --nproc_per_node=1, or --device cpu")
    return device


def choose_dtype(train_json: Path, train_config: TrainConfig, device: torch.device) -> str:
    try:
        _, dtype_name = devices.choose_device_and_dtype(str(device), train_config.dtype)
    except ValueError:
        raise ConfigError(f"{train_json}: key 'dtype' is \"bf16\", which {device} "
                          f"does not support; use \"fp16\" or \"fp32\"") from None
    # FSDP mixes precision by its own policy, without a (sharded) gradient scaler.
    if train_config.parallelism == "fsdp" and dtype_name == "fp16":
        raise ConfigError(f"{train_json}: key 'parallelism' is \"fsdp\", which trains in "
                          f"bf16 or fp32 only, and {device} does not support bf16: set \"dtype\": "
                          f"\"fp32\", or use \"parallelism\": \"ddp\"")
    return dtype_name


# --- set-up: everything the loop needs ---

@dataclass
class Training:
    """One training session: what set_up builds and the loop reads and updates."""
    ranks: Ranks
    run_dir: Path
    model_config: dict
    config: TrainConfig
    device: torch.device
    dtype_name: str
    seed: int
    train_batches: TokenBatches
    val_batches: TokenBatches
    total_steps: int
    tokens_per_step: int
    model: WrappedModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    resumed_from: checkpointing.Checkpoint | None = None
    start_step: int = 0
    best_loss: float = math.inf
    history: list = field(default_factory=list)   # a {global_step, train_loss, val_loss, is_best} per checkpoint
    run_lock: object = None       # global rank 0's hold on the run directory (checkpointing.lock_run)
    metrics: MetricsLog | None = None
    benchmarks: InTrainingBenchmarks | None = None   # train.json's benchmark_tasks; tasks loaded on rank 0

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def set_up(run, datasets_dir: Path, checkpoint_name, device_name, ranks: Ranks, read_only=False) -> Training:
    # read_only (--preflight, -f): nothing written into the run directory, no lock, no clean-up.
    # Everything a user can get wrong is checked before anything is written.
    run_dir = find_run_dir(run)
    model_config = load_model_config(run_dir / "model.json")
    config = load_train_config(run_dir / "train.json")
    check_loggers_installed(config, run_dir / "train.json")
    resume_from = find_checkpoint_to_resume(run_dir / "checkpoints", checkpoint_name)
    if resume_from is not None:
        checkpointing.check_resumable(resume_from, world_size=ranks.world_size,
                                      gradient_accumulation_steps=config.gradient_accumulation_steps,
                                      minibatch_size=config.minibatch_size,
                                      context_length=model_config["context_length"])
    # Starting weights from a file: for a fresh run only (a resume has its own).
    init_from = (checkpointing.initial_weights_file(run_dir, config.init_from, model_config)
                 if config.init_from is not None and resume_from is None else None)
    device = choose_device(device_name, ranks)
    devices.enable_tf32(device)
    dtype_name = choose_dtype(run_dir / "train.json", config, device)

    start_process_group(ranks, device)
    datasets_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir = Path(first_on_each_node(
        lambda: str(resolve_dataset_dir(config.dataset, datasets_dir)), ranks, DatasetError))
    # A global step is world_size * accumulation micro-batches: the data arithmetic (and
    # min_train_tokens' rounding) counts in those.
    micro_batches_per_step = ranks.world_size * config.gradient_accumulation_steps
    context_length = model_config["context_length"]
    # Every batch's token ids are checked against vocab_size as it is read.
    vocab_size = model_config["vocab_size"]
    train_batches = load_dataset(dataset_dir, "train", config.min_train_tokens, config.start_train_token,
                                 micro_batches_per_step, config.minibatch_size, context_length, vocab_size)
    val_batches = load_dataset(dataset_dir, "validation",
                               config.validation_batches * config.minibatch_size * context_length,
                               config.start_val_token, 1, config.minibatch_size, context_length, vocab_size)
    # ...and the first ones now, so that data for another vocabulary stops the run here.
    checked_batches = min(len(train_batches), STARTUP_CHECKED_BATCHES)
    main_rank_first(lambda: read_first_batches(train_batches, val_batches, checked_batches), ranks, DatasetError)
    # Benchmark tasks: found and loaded (datasets fetched) by global rank 0 now, so that a
    # mistake in them stops the run before it starts, not at its first benchmark.
    benchmarks = None
    if config.benchmark_tasks:
        benchmarks = InTrainingBenchmarks(config, run_dir, model_config, device, dtype_name)
        main_rank_first(benchmarks.load, ranks, BenchmarkError)
    # The run directory's first write, once every input has been checked: its lock.
    run_lock = None if read_only else main_rank_first(lambda: checkpointing.lock_run(run_dir), ranks,
                                                      checkpointing.CheckpointError)

    # Same initial weights on every rank (DDP broadcasts rank 0's anyway), then each
    # rank its own stream for dropout.
    seed = config.seed
    torch.manual_seed(seed)
    model = GPTModel(model_config)
    if init_from is not None:
        checkpointing.load_weights_into(model, init_from, model_config_path=run_dir / "model.json")
    if resume_from is not None:
        checkpointing.load_weights_into(model, resume_from.path / checkpointing.MODEL_FILE,
                                        model_config_path=run_dir / "model.json")
    model.to(device)
    torch.manual_seed(seed + ranks.rank)
    wrapped = wrap_model(model, ranks, device, dtype_name, parallelism=config.parallelism,
                         activation_checkpointing=config.activation_checkpointing, compile=config.compile)
    training = Training(
        ranks, run_dir, model_config, config, device, dtype_name, seed, train_batches, val_batches,
        total_steps=len(train_batches) // micro_batches_per_step,
        tokens_per_step=micro_batches_per_step * config.minibatch_size * context_length,
        model=wrapped, optimizer=build_optimizer(model, config, device),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype_name == "fp16"), run_lock=run_lock,
        benchmarks=benchmarks)
    if resume_from is not None:
        resume(training, resume_from)
    if not read_only:
        training.metrics = start_metrics_log(training)

    if ranks.is_main:
        if not read_only:
            checkpointing.remove_leftovers(training.checkpoints_dir)
        for warning in checkpointing.link_warnings(training.checkpoints_dir):
            print(warning)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{run_dir}: {parameters:,} parameters, {dtype_name} on {ranks.world_size} x {device.type}"
              + (f", {config.parallelism}" if wrapped.sharded else "")
              + (f", starting from {init_from}" if init_from is not None else "") + "; "
              f"dataset {dataset_dir}: {training.total_steps:,} global steps of "
              f"{training.tokens_per_step:,} tokens; token ids of the first {checked_batches + len(val_batches):,} "
              f"batches checked against vocab_size {vocab_size:,}"
              + (f"; lm-eval {', '.join(config.benchmark_tasks)} every {config.benchmark_interval:,} steps "
                 f"and at the last, {config.benchmark_limit:,} examples each" if benchmarks else "")
              + (f"; resuming from {resume_from.name} at step {training.start_step:,}" if resume_from
                 else "; auto: no checkpoint yet, starting fresh" if checkpoint_name == "auto" else ""))
    return training


def start_metrics_log(training: Training) -> MetricsLog:
    """metrics.jsonl (and TensorBoard, W&B), made ready by global rank 0: a resume first
    drops the rows a crashed session wrote past its checkpoint."""
    config, total_steps = training.config, training.total_steps

    def row_ends_at(step: int) -> bool:
        # Rows also end at every checkpoint, so that a resumed run logs the same rows
        # as an uninterrupted one.
        return (step % config.log_interval == 0 or step % config.validation_interval == 0
                or step == total_steps - 1)

    metrics = MetricsLog(run_dir=training.run_dir, ranks=training.ranks, device=training.device, config=config,
                         model_config=training.model_config, tokens_per_step=training.tokens_per_step,
                         micro_batches_per_step=training.ranks.world_size * config.gradient_accumulation_steps,
                         row_ends_at=row_ends_at)
    checkpoint_names = {checkpoint.global_step: checkpoint.name
                        for checkpoint in checkpointing.list_checkpoints(training.checkpoints_dir)}
    notes = main_rank_first(lambda: metrics.open(training.resumed_from, training.history, checkpoint_names),
                            training.ranks, MetricsError)
    for note in notes or []:
        print(note)
    return metrics


def read_first_batches(train_batches: TokenBatches, val_batches: TokenBatches, count: int) -> None:
    """Read, and so check the token ids of, the first `count` train batches and every
    validation batch."""
    for index in range(count):
        train_batches[index]
    for index in range(len(val_batches)):
        val_batches[index]


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
    """--preflight and -f (see preflight.py): the run as training builds it, its directory untouched."""
    training = set_up(run, datasets_dir, checkpoint_name, device_name, ranks, read_only=True)
    if find_microbatch:
        preflight.find_max_microbatch_size(training, train_step)
    else:
        preflight.measure_run(training, train_step, timed_steps=preflight_steps, deadline_hours=deadline_hours)
    finish_process_group(ranks)


# --- the training loop ---

def train(run, datasets_dir, checkpoint_name, device_name, ranks: Ranks):
    training = set_up(run, datasets_dir, checkpoint_name, device_name, ranks)
    config = training.config
    if training.start_step >= training.total_steps:
        if ranks.is_main:
            print(f"nothing to train: {training.resumed_from.name} is at the last of the dataset's "
                  f"{training.total_steps:,} global steps; to train longer, raise min_train_tokens in "
                  f"{training.run_dir / 'train.json'} (-1: the whole split) and resume again (with the "
                  f"cosine schedule, the learning rate then follows the longer run's curve)")
        training.metrics.close()
        finish_process_group(ranks)
        return

    progress = TrainingProgress(ranks=ranks, device=training.device, dtype_name=training.dtype_name,
                                model_config=training.model_config, start_step=training.start_step,
                                total_steps=training.total_steps, tokens_per_step=training.tokens_per_step,
                                micro_steps_per_step=config.gradient_accumulation_steps,
                                metrics=training.metrics)
    for step in range(training.start_step, training.total_steps):
        step_loss, learning_rate, grad_norm = train_step(training, step)
        progress.step_done(step, step_loss, learning_rate, grad_norm)
        if step % config.validation_interval == 0 or step == training.total_steps - 1:
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
        inputs, targets = to_device(training.train_batches[batch_index], training.device)
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


def to_device(batch, device: torch.device):
    inputs, targets = batch
    if device.type == "cuda":
        # Page-locked host memory lets the copy run asynchronously, overlapping the
        # previous step's kernels instead of stalling the host.
        return (inputs.pin_memory().to(device, non_blocking=True),
                targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


def clip_gradients(model: WrappedModel, optimizer, scaler, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm (unscaled first, under fp16); returns the norm
    before clipping, as a device tensor."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.model.parameters(), max_norm)
    if model.sharded:  # FSDP: a DTensor, the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    return grad_norm


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
        inputs, targets = to_device(batches[index if index < len(batches) else 0], training.device)
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
    checkpoint; global rank 0 then writes a checkpoint and the validation row, scores the
    checkpoint's weights when benchmarks are due, and redraws the charts."""
    ranks, config, model = training.ranks, training.config, training.model
    progress.write_metrics()   # before validating, so that their tokens/s is training's alone
    val_loss = validation_loss(training)
    train_loss = progress.take_train_loss()
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
        warning = checkpointing.low_space_warning(training.checkpoints_dir)
        if warning is not None:
            progress.write(warning)
        meta = checkpointing.checkpoint_meta(
            global_step=step, train_loss=train_loss, val_loss=val_loss, is_best=is_best,
            history=training.history, learning_rate=learning_rate,
            grad_norm=None if grad_norm is None else grad_norm.item(),
            tokens_seen=(step + 1) * training.tokens_per_step, world_size=ranks.world_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            minibatch_size=config.minibatch_size, context_length=training.model_config["context_length"],
            dtype=training.dtype_name, seed=training.seed,
            parallelism="fsdp" if model.sharded else "ddp",
            activation_checkpointing=config.activation_checkpointing)
        saved = checkpointing.save_checkpoint(
            training.checkpoints_dir, model_state=model_state, optimizer_state=optimizer_state,
            scaler_state=training.scaler.state_dict(), rng_state=rng_state, meta=meta,
            keep=config.keep_checkpoints, model_config=training.model_config)
        saved_name = saved.name
    progress.checkpoint_written(step, train_loss, val_loss, is_best, saved_name)
    if training.benchmarks is not None and training.benchmarks.due(step, step == training.total_steps - 1):
        main_rank_alone(lambda: training.benchmarks.score(step, saved_name, model_state, training.metrics,
                                                          progress.write), ranks)
    if ranks.is_main:   # after the validation row, which the metrics chart shows
        best_step = max((point["global_step"] for point in training.history if point["is_best"]), default=None)
        redrawn = redraw_charts(training.run_dir, training.history, best_step, config.grad_clip)
        if redrawn.bad_metrics_lines:
            progress.write(bad_lines_warning(training.run_dir / METRICS_FILE, redrawn.bad_metrics_lines))
    progress.training_resumes(step)


if __name__ == "__main__":
    main()
