"""Pre-train a GPT-style model with PyTorch DistributedDataParallel.

    torchrun --nnodes=1 --nproc_per_node=N ddp_train.py RUN DATASETS_DIR [CHECKPOINT]
    uv run python ddp_train.py RUN DATASETS_DIR [CHECKPOINT]      # one process

RUN is a directory under runs/ (or a path to one) holding model.json and train.json.
DATASETS_DIR is where the dataset named in train.json is downloaded to, or found.
CHECKPOINT resumes a run: `latest`, `best` or a directory name under
runs/RUN/checkpoints/.

What one global step is. Rank r of W ranks, in micro-step m of A
(gradient_accumulation_steps), trains on train batch (step * A + m) * W + r; with
A = 1 that is the original scripts' step * W + r. Gradients are averaged over all
W * A micro-batches before AdamW steps once. Every validation_interval steps, and
at the last one, all ranks compute the validation loss together and global rank 0
writes a checkpoint (see checkpointing.py) and redraws the loss chart.

Devices: CUDA with NCCL (one process per GPU, LOCAL_RANK picks it), CPU with gloo
(any number of processes), Apple MPS in one process.

Scale-out (train.json): "parallelism": "fsdp" shards weights, gradients and AdamW state
over the ranks with FSDP2 instead of replicating them with DDP; checkpoints are the same
files either way. "activation_checkpointing": true recomputes each block in backward.
Multi-node torchrun needs nothing special: each node's local rank 0 fetches the dataset.
"""

import contextlib
import datetime
import functools
import inspect
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import checkpointing
import devices
from chart import CHART_FILE, draw_loss_chart
from config import ConfigError, TrainConfig, load_model_config, load_train_config
from gpt import GPTModel
from token_data import DatasetError, load_dataset, resolve_dataset_dir

# Newer torch renamed DDP's broadcast_buffers to forward_sync_buffers (which still syncs
# once at start-up, harmless for constant buffers).
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})
RUNS_DIR = Path(__file__).resolve().parent / "runs"
PROGRESS_REFRESH_SECONDS = 1.0   # how often rank 0 reads the loss off the device for the bar


# --- who we are: torchrun's environment ---

@dataclass
class Ranks:
    rank: int = 0                 # global rank
    local_rank: int = 0           # rank on this node; picks the GPU
    world_size: int = 1
    node: int = 0                 # torchrun's GROUP_RANK: which node this is
    launched_by_torchrun: bool = False
    setup_group: object = None    # gloo group for set-up waits and object exchanges

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched_by_torchrun


def read_ranks() -> Ranks:
    """Ranks from the variables torchrun sets; a plain `python ddp_train.py` is rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Ranks()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    node = int(os.environ.get("GROUP_RANK", rank // max(1, local_world_size)))
    return Ranks(rank, local_rank, int(os.environ["WORLD_SIZE"]), node, True)


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


def start_process_group(ranks: Ranks, device: torch.device) -> None:
    if not ranks.distributed:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=devices.distributed_backend(device),
                            device_id=device if device.type == "cuda" else None)
    # Set-up waits (one rank per node downloading the dataset while the others wait)
    # can outlast NCCL's collective timeout by far, so they go through a gloo group
    # with a long one; it also carries the small Python objects we exchange.
    ranks.setup_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# --- inputs: run directory, configs, checkpoint to resume, dataset ---

def find_run_dir(run: str) -> Path:
    """runs/RUN, as the original; or RUN itself when it is a path to a run directory."""
    candidates = [Path(run)] if os.sep in run or run.startswith(".") else [RUNS_DIR / run, Path(run)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise click.ClickException(
        f"no run directory {candidates[0]} (a run is a directory holding model.json and train.json)")


def find_checkpoint_to_resume(checkpoints_dir: Path, name: str | None):
    """The checkpoint to resume from; None for a fresh run, which must not clobber an old one."""
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


def check_resumable(meta: dict, meta_path: Path, ranks: Ranks, train_config: TrainConfig) -> None:
    """Refuse to resume with a data layout that would skip or repeat training batches."""
    for key, ours in (("world_size", ranks.world_size),
                      ("gradient_accumulation_steps", train_config.gradient_accumulation_steps),
                      ("minibatch_size", train_config.minibatch_size)):
        theirs = meta.get(key)  # absent from checkpoints written by the original scripts
        if theirs is not None and theirs != ours:
            raise checkpointing.CheckpointError(
                f"{meta_path}: written with {key} {theirs}, this run has {ours}; resuming would "
                f"skip or repeat training batches, so resume with the same {key}"
            )


def initial_weights_file(run_dir: Path, train_config: TrainConfig, model_config: dict) -> Path:
    """train.json's init_from: a model.safetensors (relative paths are relative to the run
    directory) whose sibling model.json describes the same model as the run's."""
    weights_path = run_dir / Path(train_config.init_from).expanduser()
    where = f"{run_dir / 'train.json'}: key 'init_from'"
    if not weights_path.is_file():
        raise ConfigError(f"{where}: {weights_path} does not exist")
    their_config = load_model_config(weights_path.parent / "model.json")
    # drop_rate is no part of the weights: a run may train them with its own.
    different = [key for key in model_config
                 if key != "drop_rate" and their_config.get(key) != model_config[key]]
    if different:
        key = different[0]
        raise ConfigError(f"{where}: {weights_path.parent / 'model.json'} has {key} "
                          f"{their_config.get(key)!r}, {run_dir / 'model.json'} has {model_config[key]!r}; "
                          f"the weights fit only the model they were written for")
    return weights_path


def dataset_dir_on_this_node(dataset: str, datasets_dir: Path, ranks: Ranks) -> Path:
    """Each node's local rank 0 fetches (or finds) the dataset; the node's other ranks
    wait for it and then use the same files."""
    if not ranks.distributed:
        return resolve_dataset_dir(dataset, datasets_dir)
    found = failure = None
    if ranks.local_rank == 0:
        try:
            found = str(resolve_dataset_dir(dataset, datasets_dir))
        except DatasetError as error:
            failure = error.message
    everyone = [None] * ranks.world_size
    dist.all_gather_object(everyone, (ranks.node, ranks.local_rank, found, failure),
                           group=ranks.setup_group)
    for _, _, _, failure in everyone:
        if failure is not None:
            raise DatasetError(failure)
    return Path(next(path for node, local_rank, path, _ in everyone
                     if node == ranks.node and local_rank == 0))


# --- wrapping the model: activation checkpointing, DDP or FSDP2 ---

def checkpoint_activations(model: GPTModel) -> None:
    """Make each transformer block keep only its input during training and recompute the
    rest in the backward pass. The blocks' forward is wrapped in place, so parameter
    names (and checkpoints) stay the seed's. Non-reentrant checkpointing replays the
    forward with the generator states it saw, so dropout masks are the same."""
    def recomputed(forward, *args):
        if not torch.is_grad_enabled():  # validation: nothing to save memory on
            return forward(*args)
        return checkpoint(forward, *args, use_reentrant=False)
    for block in model.trf_blocks:
        block.forward = functools.partial(recomputed, block.forward)


def shard_model(model: GPTModel, device: torch.device, dtype_name: str, world_size: int) -> None:
    """FSDP2: each block is one unit of sharding (gathered just before it runs, freed
    after), then the root takes the embeddings, final norm and output head. With bf16
    the gathered weights are bf16 for compute and gradients are reduced in fp32."""
    mesh = dist.device_mesh.init_device_mesh(device.type, (world_size,))
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if dtype_name == "bf16" else MixedPrecisionPolicy())
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)


FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def parameter_names_in_optimizer_order(model, optimizer) -> list[str]:
    """Parameter names in the order an index-keyed optimizer state dict counts them (its
    groups' params, one after the other). The same under DDP and FSDP."""
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    return [name_of[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def full_optimizer_state(model, optimizer, sharded: bool) -> dict:
    """The optimizer state as torch's index-keyed state dict (the seed's optimizer.pt
    format), each group also listing its parameters' names so the file says which tensor
    is which. Under FSDP it is gathered from the shards (a collective: every rank calls
    it; rank 0 gets the state, the others an empty dict)."""
    names = parameter_names_in_optimizer_order(model, optimizer)
    if not sharded:
        state = optimizer.state_dict()
    else:
        by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_CPU)
        if not by_name.get("state") and not by_name.get("param_groups"):
            return {}
        index_of = {name: index for index, name in enumerate(names)}
        state = {"state": {index_of[name]: value for name, value in by_name["state"].items()},
                 "param_groups": [{**group, "params": [index_of[name] for name in group["params"]]}
                                  for group in by_name["param_groups"]]}
    for group in state["param_groups"]:
        group["param_names"] = [names[index] for index in group["params"]]
    return state


def saved_param_groups(optimizer, saved: dict, path: Path) -> list:
    """The saved parameter groups, refused unless they match this optimizer's group sizes
    (e.g. a checkpoint written under another weight_decay_scope)."""
    groups = saved.get("param_groups", [])
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if [len(group.get("params", [])) for group in groups] != sizes:
        raise checkpointing.CheckpointError(
            f"{path}: optimizer state is for parameter groups of sizes "
            f"{[len(group.get('params', [])) for group in groups]}, this model has {sizes}")
    return groups


def load_sharded_optimizer_state(model, optimizer, saved: dict, path: Path) -> None:
    """An index-keyed optimizer state (written under DDP or FSDP, or by the original
    scripts) into an FSDP-sharded optimizer: keyed by name, every rank keeps its shard."""
    names = parameter_names_in_optimizer_order(model, optimizer)
    groups = saved_param_groups(optimizer, saved, path)
    try:
        by_name = {
            "state": {names[index]: value for index, value in saved["state"].items()},
            # train.json's hyperparameters, the file's parameters
            "param_groups": [{**{key: value for key, value in ours.items() if key != "params"},
                              "params": [names[index] for index in theirs["params"]]}
                             for ours, theirs in zip(optimizer.param_groups, groups)],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise checkpointing.CheckpointError(f"{path}: optimizer state does not fit ({error})") from None


# --- the pieces of a training step ---

def batch_loss(model, inputs, targets) -> torch.Tensor:
    """Mean cross-entropy over every position of the batch, as the original; the model
    computes it chunk by chunk without materialising the batch's logits."""
    return model(inputs, targets=targets)


def to_device(batch, device: torch.device):
    inputs, targets = batch
    if device.type == "cuda":
        # Page-locked host memory lets the copy run asynchronously, overlapping the
        # previous step's kernels instead of stalling the host.
        return (inputs.pin_memory().to(device, non_blocking=True),
                targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to min_learning_rate
    at the last step. The defaults give the original scripts' constant 0.0004."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    decay_steps = max(1, total_steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (
        1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device):
    """AdamW with fused kernels on CUDA and CPUs (4x faster than the for-each
    kernels at 163M on a CPU). weight_decay_scope "all" is the original's one
    parameter group (its optimizer.pt files load into it); "matrices" exempts biases,
    norm scales/shifts (everything below 2-D) from decay, as GPT-2 practice does."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay_scope == "all":
        groups = [{"params": parameters, "weight_decay": config.weight_decay}]
    else:
        groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate,
                             fused=True if device.type in ("cuda", "cpu") else None)


def load_optimizer_state(optimizer, saved: dict, path: Path) -> None:
    """Load saved AdamW moments, keeping train.json's hyperparameters (and our kernel
    choice): torch would otherwise take every group setting from the file."""
    groups = saved_param_groups(optimizer, saved, path)
    merged = [{**{key: value for key, value in ours.items() if key != "params"},
               "params": theirs["params"]}
              for ours, theirs in zip(optimizer.param_groups, groups)]
    try:
        optimizer.load_state_dict({"state": saved["state"], "param_groups": merged})
    except (KeyError, ValueError, RuntimeError) as error:
        raise checkpointing.CheckpointError(f"{path}: optimizer state does not fit ({error})") from None


@torch.inference_mode()
def validation_loss(model, val_batches, ranks: Ranks, device, autocast) -> float:
    """Mean loss over validation batches 0..n-1, the original's number, with each rank
    computing a share (batches rank, rank + W, ...) and one all-reduce joining them."""
    model.eval()
    losses = torch.zeros(len(val_batches), device=device)
    # Every rank runs the same number of forward passes: under FSDP each one all-gathers
    # the weights with every other rank, so a rank with one batch fewer would hang the
    # rest. The last round's spare ranks recompute batch 0 and drop the result.
    for first in range(0, len(val_batches), ranks.world_size):
        index = first + ranks.rank
        inputs, targets = to_device(val_batches[index if index < len(val_batches) else 0], device)
        with autocast:
            loss = batch_loss(model, inputs, targets)
        if index < len(val_batches):
            losses[index] = loss
    all_reduce_sum(losses, ranks)  # each entry is non-zero on one rank only: sums are exact
    model.train()
    # Added up in batch order in Python floats, as the original did batch by batch.
    return sum(losses.tolist()) / len(val_batches)


def rng_states(ranks: Ranks, device: torch.device) -> dict | None:
    """Every rank's generator states, gathered on global rank 0 (None elsewhere)."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        mine["mps"] = torch.mps.get_rng_state()
    everyone = [mine]
    if ranks.distributed:
        everyone = [None] * ranks.world_size if ranks.is_main else None
        dist.gather_object(mine, everyone, dst=0, group=ranks.setup_group)
    if not ranks.is_main:
        return None
    return {"world_size": ranks.world_size, **{kind: [state[kind] for state in everyone] for kind in mine}}


def restore_rng_states(saved: dict, ranks: Ranks, device: torch.device) -> None:
    torch.set_rng_state(saved["cpu"][ranks.rank])
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"][ranks.rank], device)
    elif device.type == "mps" and "mps" in saved:
        torch.mps.set_rng_state(saved["mps"][ranks.rank])


# --- the command ---

@click.command()
@click.argument("run")
@click.argument("datasets_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("checkpoint", required=False)
@click.option("--device", "device_name", type=click.Choice(["cuda", "mps", "cpu"]), default=None,
              help="Where to train (default: cuda if available, else mps, else cpu).")
def main(run, datasets_dir, checkpoint, device_name):
    """Train the model of runs/RUN on the dataset in its train.json (see the README)."""
    ranks = read_ranks()
    try:
        train(run, datasets_dir, checkpoint, device_name, ranks)
    except click.ClickException as error:
        # Every rank hits the same user mistake; one line per node is enough.
        if ranks.local_rank != 0:
            raise SystemExit(error.exit_code) from None
        raise
    except KeyboardInterrupt:
        if ranks.local_rank == 0:
            print("\ninterrupted: resume from the newest checkpoint with "
                  f"`ddp_train.py {run} {datasets_dir} latest`", file=sys.stderr)
        raise SystemExit(130) from None


def train(run, datasets_dir, checkpoint_name, device_name, ranks: Ranks):
    # Everything a user can get wrong is checked before anything is written.
    run_dir = find_run_dir(run)
    model_config = load_model_config(run_dir / "model.json")
    train_config = load_train_config(run_dir / "train.json")
    checkpoints_dir = run_dir / "checkpoints"
    resume_from = find_checkpoint_to_resume(checkpoints_dir, checkpoint_name)
    if resume_from is not None:
        check_resumable(resume_from.meta, resume_from.path / checkpointing.META_FILE, ranks,
                        train_config)
    # Starting weights from a file: for a fresh run only (a resume has its own).
    init_from = (initial_weights_file(run_dir, train_config, model_config)
                 if train_config.init_from is not None and resume_from is None else None)
    device = choose_device(device_name, ranks)
    devices.enable_tf32(device)
    dtype_name = train_config.dtype or devices.default_dtype_name(device)
    if dtype_name == "bf16" and not devices.supports_bf16(device):
        raise ConfigError(f"{run_dir / 'train.json'}: key 'dtype' is \"bf16\", which {device} "
                          f"does not support; use \"fp16\" or \"fp32\"")
    # FSDP mixes precision by its own policy, without a (sharded) gradient scaler.
    if train_config.parallelism == "fsdp" and dtype_name == "fp16":
        raise ConfigError(f"{run_dir / 'train.json'}: key 'parallelism' is \"fsdp\", which trains in "
                          f"bf16 or fp32 only, and {device} does not support bf16: set \"dtype\": "
                          f"\"fp32\", or use \"parallelism\": \"ddp\"")
    sharded = train_config.parallelism == "fsdp" and ranks.distributed

    start_process_group(ranks, device)
    world_size, accumulation = ranks.world_size, train_config.gradient_accumulation_steps
    minibatch_size, context_length = train_config.minibatch_size, model_config["context_length"]

    datasets_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir = dataset_dir_on_this_node(train_config.dataset, datasets_dir, ranks)
    # A global batch is world_size * accumulation micro-batches: the data arithmetic
    # (and min_train_tokens' rounding) counts in those.
    train_batches = load_dataset(dataset_dir, "train", train_config.min_train_tokens,
                                 train_config.start_train_token, world_size * accumulation,
                                 minibatch_size, context_length)
    val_batches = load_dataset(dataset_dir, "validation",
                               train_config.validation_batches * minibatch_size * context_length,
                               train_config.start_val_token, 1, minibatch_size, context_length)
    total_steps = len(train_batches) // (world_size * accumulation)
    tokens_per_step = world_size * accumulation * minibatch_size * context_length

    # Same initial weights on every rank (DDP broadcasts rank 0's anyway), then each
    # rank its own stream for dropout. Without a seed in train.json, a fresh one.
    seed = train_config.seed if train_config.seed is not None else secrets.randbits(62)
    torch.manual_seed(seed)
    model = GPTModel(model_config)
    if init_from is not None:
        checkpointing.load_weights_into(model, init_from)
    start_step, best_loss, history, resume_state = 0, math.inf, [], None
    if resume_from is not None:
        checkpointing.load_weights_into(model, resume_from.path / checkpointing.MODEL_FILE)
        resume_state = checkpointing.read_resume_state(resume_from)
        start_step = resume_from.global_step + 1
        best_loss = checkpointing.best_val_loss(checkpoints_dir)
        history = resume_from.meta.get("history")
        if not isinstance(history, list):  # written by the original scripts
            history = checkpointing.loss_history(checkpoints_dir, up_to_step=resume_from.global_step)
    model.to(device)
    torch.manual_seed(seed + ranks.rank)
    if train_config.activation_checkpointing:
        checkpoint_activations(model)
    if sharded:  # before the optimizer, which then holds each rank's shards
        shard_model(model, device, dtype_name, world_size)

    optimizer = build_optimizer(model, train_config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype_name == "fp16")
    if resume_state is not None:
        optimizer_path = resume_from.path / checkpointing.OPTIMIZER_FILE
        if sharded:
            load_sharded_optimizer_state(model, optimizer, resume_state.optimizer_state, optimizer_path)
        else:
            load_optimizer_state(optimizer, resume_state.optimizer_state, optimizer_path)
        if scaler.is_enabled() and resume_state.scaler_state:
            scaler.load_state_dict(resume_state.scaler_state)
        if resume_state.rng_state is not None and resume_state.rng_state.get("world_size") == world_size:
            restore_rng_states(resume_state.rng_state, ranks, device)
        else:
            # The original scripts saved no generator states: dropout masks from here on
            # can't match an uninterrupted run, but stay distinct per rank and per resume.
            torch.manual_seed(seed + ranks.rank + 1_000_003 * start_step)
            if ranks.is_main:
                print(f"note: {resume_from.name} holds no random-number generator states for "
                      f"{world_size} rank(s); training goes on with freshly seeded ones")

    compiled = torch.compile(model) if train_config.compile else model
    # The causal-mask buffers never change: broadcasting them every step would only
    # cost bandwidth. Gradients live in DDP's all-reduce buckets (gradient_as_bucket_view)
    # instead of being copied in and out of them every step.
    trained = (DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, **NO_BUFFER_SYNC)
               if ranks.distributed and not sharded else compiled)
    # Under FSDP the mixed-precision policy casts the gathered weights instead.
    autocast = contextlib.nullcontext() if sharded else devices.autocast(device, dtype_name)

    if ranks.is_main:
        checkpointing.remove_leftovers(checkpoints_dir)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{run_dir}: {parameters:,} parameters, {dtype_name} on {world_size} x {device.type}"
              + (f", {train_config.parallelism}" if sharded else "")
              + (f", starting from {init_from}" if init_from is not None else "") + "; "
              f"dataset {dataset_dir}: {total_steps:,} global steps of {tokens_per_step:,} tokens"
              + (f"; resuming from {resume_from.name} at step {start_step:,}" if resume_from else ""))
    if start_step >= total_steps:
        if ranks.is_main:
            print(f"nothing to train: {resume_from.name} is at the last of the dataset's "
                  f"{total_steps:,} global steps")
        _finish(ranks)
        return

    # Model FLOPs utilisation for the progress bar: the datasheet peak of a known GPU,
    # else a matmul measured now (a CPU's practical peak).
    flops_per_token = devices.training_flops_per_token(model_config)
    peak_flops = None
    if ranks.is_main:
        peak_flops = (devices.datasheet_peak_flops(device, dtype_name)
                      or devices.measure_matmul_flops(device, dtype_name))

    # --- the loop ---
    # Losses stay on the device; the host reads them only for the progress bar (about
    # once a second, rank 0 only) and at checkpoints, so no step waits on the GPU.
    loss_sum = torch.zeros((), device=device)
    micro_steps_summed = 0
    grad_norm = None
    last = {"time": time.monotonic(), "step": start_step, "loss_sum": 0.0, "micro_steps": 0}
    summary = {}
    progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not ranks.is_main)
    started = time.monotonic()
    for step in range(start_step, total_steps):
        learning_rate = learning_rate_at(step, total_steps, train_config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        for micro_step in range(accumulation):
            batch_index = (step * accumulation + micro_step) * world_size + ranks.rank
            inputs, targets = to_device(train_batches[batch_index], device)
            # Gradients are all-reduced on the last micro-step only.
            final_micro_step = micro_step == accumulation - 1
            if sharded:
                model.set_requires_gradient_sync(final_micro_step)
                sync = contextlib.nullcontext()
            else:
                sync = (contextlib.nullcontext() if final_micro_step or not ranks.distributed
                        else trained.no_sync())
            with sync:
                with autocast:
                    loss = batch_loss(trained, inputs, targets)
                scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
            micro_steps_summed += 1
        if train_config.grad_clip is not None:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        progress.update(1)
        now = time.monotonic()
        if ranks.is_main and now - last["time"] >= PROGRESS_REFRESH_SECONDS:
            loss_total = loss_sum.item()
            recent_loss = (loss_total - last["loss_sum"]) / max(1, micro_steps_summed - last["micro_steps"])
            tokens_per_second = (step + 1 - last["step"]) * tokens_per_step / (now - last["time"])
            mfu = tokens_per_second / world_size * flops_per_token / peak_flops
            progress.set_postfix(progress_fields(recent_loss, learning_rate, tokens_per_second, mfu,
                                                 grad_norm), refresh=False)
            last.update(time=now, step=step + 1, loss_sum=loss_total, micro_steps=micro_steps_summed)

        if step % train_config.validation_interval == 0 or step == total_steps - 1:
            val_loss = validation_loss(compiled, val_batches, ranks, device, autocast)
            train_loss = all_reduce_sum(loss_sum.clone(), ranks).item() / (micro_steps_summed * world_size)
            is_best = val_loss < best_loss
            best_loss = min(best_loss, val_loss)
            history.append({"global_step": step, "train_loss": train_loss, "val_loss": val_loss,
                            "is_best": is_best})
            states = rng_states(ranks, device)
            if sharded:  # gathered from every rank's shards, onto rank 0's CPU
                model_state = get_model_state_dict(model, options=FULL_ON_CPU)
                optimizer_state = full_optimizer_state(model, optimizer, sharded=True)
            if ranks.is_main:
                if not sharded:
                    model_state = model.state_dict()
                    optimizer_state = full_optimizer_state(model, optimizer, sharded=False)
                meta = {
                    "train_loss": train_loss, "val_loss": val_loss, "global_step": step,
                    "is_best": is_best, "tokens_seen": (step + 1) * tokens_per_step,
                    "learning_rate": learning_rate,
                    "grad_norm": None if grad_norm is None else grad_norm.item(),
                    "world_size": world_size, "gradient_accumulation_steps": accumulation,
                    "minibatch_size": minibatch_size, "context_length": context_length,
                    "dtype": dtype_name, "seed": seed, "history": history,
                    "parallelism": "fsdp" if sharded else "ddp",
                    "activation_checkpointing": train_config.activation_checkpointing,
                }
                saved = checkpointing.save_checkpoint(
                    checkpoints_dir, model_state=model_state,
                    optimizer_state=optimizer_state, scaler_state=scaler.state_dict(),
                    rng_state=states, meta=meta, keep=train_config.keep_checkpoints)
                best_step = max((p["global_step"] for p in history if p["is_best"]), default=None)
                draw_loss_chart(history, best_step, run_dir / CHART_FILE)
                progress.write(f"step {step:,}: train loss {train_loss:.4f}, validation loss "
                               f"{val_loss:.4f}{' (best)' if is_best else ''} -> {saved.name}")
            summary = {"train_loss": train_loss, "val_loss": val_loss}
            loss_sum.zero_()
            micro_steps_summed = 0
            last.update(loss_sum=0.0, micro_steps=0)
    progress.close()

    elapsed = time.monotonic() - started
    if ranks.is_main:
        tokens = (total_steps - start_step) * tokens_per_step
        print(f"Training finished in {datetime.timedelta(seconds=round(elapsed))} "
              f"(global steps {start_step:,} to {total_steps - 1:,})")
        print(f"Tokens seen: {tokens:,} this session, {total_steps * tokens_per_step:,} in all")
        per_rank = tokens / elapsed / world_size
        print(f"Throughput: {tokens / elapsed:,.0f} tokens/s ({per_rank:,.0f} per rank), "
              f"MFU {per_rank * flops_per_token / peak_flops:.1%} of {peak_flops / 1e12:,.2f} TFLOP/s")
        print(f"Final train loss: {summary['train_loss']:.4f}, validation loss: {summary['val_loss']:.4f}"
              f" (best validation loss {best_loss:.4f})")
    _finish(ranks)


def progress_fields(loss: float, learning_rate: float, tokens_per_second: float, mfu: float,
                    grad_norm) -> dict:
    fields = {"loss": f"{loss:.4f}", "lr": f"{learning_rate:.2e}", "tok/s": f"{tokens_per_second:,.0f}",
              "MFU": f"{mfu:.1%}"}
    if grad_norm is not None:
        fields["grad norm"] = f"{grad_norm.item():.3f}"
    return fields


def _finish(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier(group=ranks.setup_group)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
