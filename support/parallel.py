"""How the processes of a torchrun job train one model together.

torchrun starts one process per device (rank r of W in all, local rank l on its node)
and tells each who it is through environment variables; a plain `python ddp_train.py`
is rank 0 of 1 and needs none of this. This module owns everything that differs
between those cases:

- who we are (`Ranks`) and the process group;
- work done once per node (fetching the dataset) while the node's other ranks wait;
- wrapping the bare model for training: activation checkpointing, FSDP2 sharding,
  torch.compile and DDP, in that order (`wrap_model`);
- whether a micro-step's backward all-reduces gradients;
- gathering what a checkpoint needs onto global rank 0: the full weights, every
  rank's random-number generator states (and putting those back on resume).
"""

import contextlib
import datetime
import functools
import inspect
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import click
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from . import devices
from .safe_files import first_line

# Newer torch renamed DDP's broadcast_buffers to forward_sync_buffers (which still syncs
# once at start-up, harmless for constant buffers).
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def full_on_cpu():
    """State-dict options for full (unsharded) state dicts gathered onto rank 0's CPU.
    FSDP's modules are imported only when sharding: they cost every process a second."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def die_with_launcher(ranks: Ranks, launcher_pid: int) -> None:
    """End this rank when the torchrun process that started it dies.

    torchrun starts each rank in a session of its own, so a launcher killed outright
    (the OOM killer, a closed SSH session, kill -9) would leave its ranks training on,
    holding the GPUs and writing into the run directory beside a restarted job. A
    daemon thread looks at the parent once a second and SIGKILLs this process when it
    has gone: nothing more is written, and a checkpoint being saved stays a hidden
    partial directory, as after any crash. (Not Linux's PR_SET_PDEATHSIG: it fires
    when the parent *thread* ends, and torchrun starts restarted ranks from threads
    that do.) launcher_pid is the parent as first seen, so a launcher that died
    before this call counts too. A plain `python ddp_train.py` is left alone."""
    if ranks.launched_by_torchrun:
        threading.Thread(target=_watch_parent, args=(launcher_pid,), daemon=True,
                         name="die-with-launcher").start()


def _watch_parent(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def training_device(name: str | None, ranks: Ranks) -> torch.device:
    """The device this rank trains on: --device (default: cuda, else mps, else cpu), and on
    CUDA the GPU its local rank picks."""
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


@contextlib.contextmanager
def one_line_per_failure(ranks: Ranks, interrupted_hint: str | None = None):
    """How a rank ends on a mistake, a Ctrl-C or a lost peer: one line, no traceback.

    A user mistake (a ClickException) is printed by each node's local rank 0 alone and
    handed to torchrun, whose failure summary then names it as the root cause; a Ctrl-C
    prints interrupted_hint (the command that resumes) and exits 130; a rank that only saw
    another rank's connection drop says so in one line, since that rank said why."""
    try:
        refuse_a_restart_that_would_repeat_a_stop()
        yield
    except click.ClickException as error:
        message = error.format_message()
        # A restart by torchrun --max-restarts that failed as the attempt before it did
        # (the same mistake, or a stop no restart can help) says nothing more.
        repeated = previous_attempt_failure() == (message, error.exit_code)
        report_to_launcher(message, error.exit_code)
        if ranks.local_rank != 0 or repeated:
            raise SystemExit(error.exit_code) from None
        raise
    except KeyboardInterrupt:
        if ranks.local_rank == 0 and interrupted_hint:
            print(f"\ninterrupted: {interrupted_hint}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if ranks.rank == 0 or not lost_a_peer(error):
            raise
        print(f"rank {ranks.rank}: stopped, another rank failed ({first_line(error)})", file=sys.stderr)
        report_to_launcher(f"stopped: another rank failed ({first_line(error)})")
        raise SystemExit(1) from None


def report_to_launcher(message: str, exit_code: int = 1) -> None:
    """Hand torchrun this rank's one-line error for its failure summary (the file it
    names in TORCHELASTIC_ERROR_FILE), where it would otherwise print only an exit code."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time())),
                                                                     "exit_code": exit_code}}}, file)
    except OSError:
        pass  # the summary then says less; the line itself is on stderr already


# Exit codes of a stop that a restart should not undo: health.DIVERGED_EXIT_CODE (it would
# only train into the same stop again) and preemption.PREEMPTED_EXIT_CODE (the job was
# told to stop). The restarted attempt gives up at once.
NOT_RESTARTABLE = {3, 75}


class RepeatedStop(click.ClickException):
    """The attempt before this one stopped in a way no restart can mend."""


def previous_attempt_failure() -> tuple[str, int] | None:
    """(message, exit code) this local rank reported in torchrun's attempt before this one,
    if it is a restart and that attempt failed with one of our lines. torchrun gives each
    attempt's ranks an error file .../attempt_N/LOCAL_RANK/error.json."""
    path, attempt = os.environ.get("TORCHELASTIC_ERROR_FILE"), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not path or attempt == 0 or f"attempt_{attempt}" not in path:
        return None
    before = path.replace(f"attempt_{attempt}", f"attempt_{attempt - 1}")
    try:
        with open(before, encoding="utf-8") as file:
            message = json.load(file)["message"]
        return message["message"], int(message["extraInfo"].get("exit_code", 1))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse_a_restart_that_would_repeat_a_stop() -> None:
    failure = previous_attempt_failure()
    if failure is not None and failure[1] in NOT_RESTARTABLE:
        error = RepeatedStop(failure[0])
        error.exit_code = failure[1]
        raise error


# What a rank sees when another rank dies in the middle of a collective.
PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "connection refused",
             "communicator was aborted", "remote process exited")


def lost_a_peer(error: BaseException) -> bool:
    return any(words in str(error).lower() for words in PEER_LOST)


def start_process_group(ranks: Ranks, device: torch.device) -> None:
    if not ranks.distributed:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun --max-restarts keeps one key-value store for all its attempts, and a
    # restarted rank can read its peer's address from the attempt before (a dead
    # process: "Connection refused"). Each attempt's groups get keys of their own.
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=devices.distributed_backend(device),
                            store=dist.PrefixStore(f"attempt-{attempt}/", store), rank=rank,
                            world_size=world_size, device_id=device if device.type == "cuda" else None)
    # Set-up waits (one rank per node downloading the dataset while the others wait)
    # can outlast NCCL's collective timeout by far, so they go through a gloo group
    # with a long one; it also carries the small Python objects we exchange.
    ranks.setup_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))


def finish_process_group(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier(group=ranks.setup_group)
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def first_on_each_node(work, ranks: Ranks, error_type):
    """Run work() on each node's local rank 0 while the node's other ranks wait, and
    return its result (a string) on every rank of that node. An error_type raised on
    any node is raised again on every rank, so they all stop with the same line."""
    if not ranks.distributed:
        return work()
    result = failure = None
    if ranks.local_rank == 0:
        try:
            result = work()
        except error_type as error:
            failure = error.message
    everyone = [None] * ranks.world_size
    dist.all_gather_object(everyone, (ranks.node, ranks.local_rank, result, failure),
                           group=ranks.setup_group)
    for _, _, _, failure in everyone:
        if failure is not None:
            raise error_type(failure)
    return next(result for node, local_rank, result, _ in everyone
                if node == ranks.node and local_rank == 0)


def main_rank_first(work, ranks: Ranks, error_type):
    """Run work() on global rank 0 alone (others wait) and return its result there (None
    elsewhere). An error_type it raises is raised on every rank, so they all stop with
    the same line instead of waiting for rank 0 until a collective times out."""
    result = failure = None
    if ranks.is_main:
        try:
            result = work()
        except error_type as error:
            failure = error.message
    if ranks.distributed:
        shared = [failure]
        dist.broadcast_object_list(shared, src=0, group=ranks.setup_group)
        failure = shared[0]
    if failure is not None:
        raise error_type(failure)
    return result


def main_rank_alone(work, ranks: Ranks):
    """Run work() on global rank 0 while the other ranks wait, however long it takes
    (benchmarks at a checkpoint: minutes); returns its result there (None elsewhere).

    The others wait in a barrier of the gloo set-up group (24 h timeout), not at the
    training's next collective: under NCCL a collective left waiting more than the
    process group's timeout (10 minutes, torch's default) is aborted by NCCL's watchdog,
    which ends the run. Every rank has joined every collective before this barrier, so
    none is left pending while they wait."""
    result = work() if ranks.is_main else None
    if ranks.distributed:
        dist.barrier(group=ranks.setup_group)
    return result


# --- wrapping the model for training ---

@dataclass
class WrappedModel:
    """The three views of one model during training."""
    model: torch.nn.Module      # the bare GPTModel: parameters, state dicts, clipping
    training: torch.nn.Module   # forward + backward of a micro-step go through this
    evaluation: torch.nn.Module  # validation's forward: no gradients, so never DDP
    autocast: object            # the context a forward runs in
    sharded: bool               # FSDP2: each rank holds a shard of every parameter

    def gradient_sync(self, final_micro_step: bool):
        """The context for one micro-step's backward: gradients are all-reduced on the
        last micro-step of a global step only, the others just accumulate locally."""
        if self.sharded:
            self.model.set_requires_gradient_sync(final_micro_step)
            return contextlib.nullcontext()
        if final_micro_step or not isinstance(self.training, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.training.no_sync()


def wrap_model(model, ranks: Ranks, device: torch.device, dtype_name: str, *, parallelism: str,
               activation_checkpointing: bool, compile: bool) -> WrappedModel:
    """Prepare the bare model (on its device, weights loaded) for training. The order
    matters: checkpointing wraps each block's forward before FSDP makes each block a
    unit of sharding; compile sees the sharded model; DDP wraps the compiled one, so
    its all-reduce hooks stay outside the compiled graph. Build the optimizer after
    this: under FSDP it must hold the shards."""
    if activation_checkpointing:
        checkpoint_activations(model)
    sharded = parallelism == "fsdp" and ranks.distributed
    if sharded:
        shard_model(model, device, dtype_name, ranks.world_size)
    compiled = torch.compile(model) if compile else model
    training = compiled
    if ranks.distributed and not sharded:
        # The causal-mask buffers never change: broadcasting them every step would only
        # cost bandwidth. Gradients live in DDP's all-reduce buckets (gradient_as_bucket_view)
        # instead of being copied in and out of them every step.
        training = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                                           gradient_as_bucket_view=True, **NO_BUFFER_SYNC)
    # Under FSDP the mixed-precision policy casts the gathered weights instead.
    autocast = contextlib.nullcontext() if sharded else devices.autocast(device, dtype_name)
    return WrappedModel(model, training, compiled, autocast, sharded)


def checkpoint_activations(model) -> None:
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


def shard_model(model, device: torch.device, dtype_name: str, world_size: int) -> None:
    """FSDP2: each block is one unit of sharding (gathered just before it runs, freed
    after), then the root takes the embeddings, final norm and output head. With bf16
    the gathered weights are bf16 for compute and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dist.device_mesh.init_device_mesh(device.type, (world_size,))
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if dtype_name == "bf16" else MixedPrecisionPolicy())
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)


# --- what a checkpoint needs, gathered onto global rank 0 ---

def full_model_state(wrapped: WrappedModel, ranks: Ranks) -> dict | None:
    """The bare model's state dict on global rank 0, None elsewhere. Under FSDP it is
    gathered from every rank's shards (a collective: every rank must call this)."""
    if wrapped.sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(wrapped.model, options=full_on_cpu())
        return state if ranks.is_main else None
    return wrapped.model.state_dict() if ranks.is_main else None


def load_full_model_state(wrapped: WrappedModel, state_dict: dict) -> None:
    """Full (unsharded) weights into the model being trained, on every rank: a rollback's.
    Under FSDP each rank keeps its shard of them."""
    if wrapped.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(wrapped.model, state_dict, options=StateDictOptions(full_state_dict=True))
    else:
        wrapped.model.load_state_dict(state_dict, strict=True)


def weights_finite(wrapped: WrappedModel, ranks: Ranks) -> bool:
    """Whether every weight is finite, on every rank (one host read; a collective under
    FSDP, where each rank holds a shard)."""
    bad = torch.stack([(~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).any()
                       for p in wrapped.model.parameters()]).any().float()
    if wrapped.sharded:
        all_reduce_sum(bad, ranks)
    return not bad.item()


def generator_states(device: torch.device) -> dict:
    """This process's torch generator states: the CPU's and the training device's."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_generator_states(states: dict, device: torch.device) -> None:
    """Put back what generator_states returned (a device's state only where it has one)."""
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    elif device.type == "mps" and "mps" in states:
        torch.mps.set_rng_state(states["mps"])


def rng_states(ranks: Ranks, device: torch.device, session: dict | None = None) -> dict | None:
    """Every rank's generator states, gathered on global rank 0 (None elsewhere), and with
    `session` each rank's half-done sums (support/training.session_state) under "session"."""
    mine = generator_states(device)
    if session is not None:
        mine["session"] = session
    everyone = [mine]
    if ranks.distributed:
        everyone = [None] * ranks.world_size if ranks.is_main else None
        dist.gather_object(mine, everyone, dst=0, group=ranks.setup_group)
    if not ranks.is_main:
        return None
    return {"world_size": ranks.world_size, **{kind: [state[kind] for state in everyone] for kind in mine}}


def restore_rng_states(saved: dict, ranks: Ranks, device: torch.device) -> dict | None:
    """This rank's generator states out of what rng_states gathered; returns its session
    state (None in files written before there was one)."""
    set_generator_states({kind: saved[kind][ranks.rank] for kind in ("cpu", "cuda", "mps") if kind in saved},
                         device)
    return saved["session"][ranks.rank] if "session" in saved else None
