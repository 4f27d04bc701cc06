"""Per-rank memory of a training step: DDP vs FSDP2, with and without activation checkpointing.

    uv run python bench/bench_memory.py [--nproc 2] [--emb-dim 512] [--n-layers 8] ...

Each of the four set-ups runs in its own `torchrun --nproc_per_node=N` job (CPU/gloo, or
CUDA/NCCL when GPUs are present) of the trainer's own pieces (parallel.read_ranks,
start_process_group and wrap_model, optimizer.build_optimizer) for a few fp32 training
steps, and every rank reports:
the bytes of its parameters, gradients and AdamW state (its shards under FSDP), its peak
resident memory (ru_maxrss) and how much that grew from just before the model was built,
and on CUDA torch.cuda.max_memory_allocated and tokens/s. A second table turns the measured
bytes per parameter into the largest GPT-2 that fits a GPU of each memory size, at 8 GPUs.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from timing import print_table  # noqa: E402

SETUPS = [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]
GPT2_SIZES = {"124M": 124_439_808, "355M": 354_823_168, "774M": 774_030_080, "1.5B": 1_557_611_200}
GPU_MEMORY_GB = (16, 24, 40, 80)
GIB = 2 ** 30
MARK = "MEMORY-REPORT "


def local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(options: dict) -> None:
    """One rank of one set-up, under torchrun."""
    import torch
    import torch.distributed as dist

    from support.config import validate_train_config
    from gpt import GPTModel
    from support.optimizer import build_optimizer
    from support.parallel import finish_process_group, read_ranks, start_process_group, wrap_model

    ranks = read_ranks()
    rank, world_size = ranks.rank, ranks.world_size
    device = torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    start_process_group(ranks, device)
    config = {"vocab_size": 50257, "emb_dim": options["emb_dim"], "context_length": options["context"],
              "n_heads": options["n_heads"], "n_layers": options["n_layers"], "drop_rate": 0.0,
              "qkv_bias": False}
    train_config = validate_train_config({
        "dataset": "unused", "min_train_tokens": -1, "start_train_token": 0, "start_val_token": 0,
        "minibatch_size": options["batch"], "validation_interval": 1, "validation_batches": 1})
    rss_before = peak_rss_bytes()
    torch.manual_seed(0)
    model = GPTModel(config).to(device)
    parameter_count = sum(p.numel() for p in model.parameters())
    trained = wrap_model(model, ranks, device, "fp32", parallelism=options["parallelism"],
                         activation_checkpointing=options["activation_checkpointing"], compile=False).training
    optimizer = build_optimizer(model, train_config, device)
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randint(0, 50257, (options["batch"], options["context"]), generator=generator).to(device)
    gradient_bytes = 0
    started = None
    for step in range(options["steps"] + 1):
        if step == 1:  # the first step allocates everything once
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = trained(inputs, targets=inputs)
        loss.backward()
        gradient_bytes = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    report = {
        "rank": rank, "parameters": parameter_count,
        "parameter_bytes": sum(local_bytes(p) for p in model.parameters()),
        "gradient_bytes": gradient_bytes,
        "optimizer_bytes": sum(local_bytes(value) for state in optimizer.state.values()
                               for value in state.values() if torch.is_tensor(value)),
        "peak_rss": peak_rss_bytes(), "rss_growth": peak_rss_bytes() - rss_before,
        "cuda_max_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "tokens_per_second": options["steps"] * options["batch"] * options["context"] * world_size / elapsed,
    }
    everyone = [None] * world_size
    dist.all_gather_object(everyone, report)
    if rank == 0:
        print(MARK + json.dumps(everyone), flush=True)
    finish_process_group(ranks)


def run_setup(options: dict, nproc: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker-options", json.dumps(options)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if result.returncode != 0:
        raise click.ClickException(f"{options['parallelism']} run failed: {result.stderr.strip()[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith(MARK))
    return json.loads(line[len(MARK):])


def mib(value) -> str:
    return f"{value / 2 ** 20:,.1f}"


@click.command()
@click.option("--nproc", default=2, show_default=True, help="Processes (ranks) per set-up.")
@click.option("--emb-dim", default=512, show_default=True)
@click.option("--n-layers", default=8, show_default=True)
@click.option("--n-heads", default=8, show_default=True)
@click.option("--context", default=512, show_default=True, help="Tokens per sequence.")
@click.option("--batch", default=4, show_default=True, help="Sequences per rank per step.")
@click.option("--steps", default=2, show_default=True, help="Timed steps after one warm-up step.")
@click.option("--worker-options", default=None, hidden=True)
def main(nproc, emb_dim, n_layers, n_heads, context, batch, steps, worker_options):
    if worker_options is not None:
        worker(json.loads(worker_options))
        return
    base = {"emb_dim": emb_dim, "n_layers": n_layers, "n_heads": n_heads, "context": context,
            "batch": batch, "steps": steps}
    rows, per_parameter = [], {}
    for parallelism, checkpointing in SETUPS:
        reports = run_setup({**base, "parallelism": parallelism, "activation_checkpointing": checkpointing},
                            nproc)
        worst = max(reports, key=lambda report: report["peak_rss"])
        parameters = worst["parameters"]
        state_bytes = worst["parameter_bytes"] + worst["gradient_bytes"] + worst["optimizer_bytes"]
        per_parameter[parallelism] = state_bytes * nproc / parameters if parallelism == "fsdp" else \
            state_bytes / parameters
        rows.append([parallelism, "on" if checkpointing else "off", mib(worst["parameter_bytes"]),
                     mib(worst["gradient_bytes"]), mib(worst["optimizer_bytes"]),
                     f"{state_bytes / parameters:.2f}", mib(worst["peak_rss"]), mib(worst["rss_growth"]),
                     "-" if worst["cuda_max_allocated"] is None else mib(worst["cuda_max_allocated"]),
                     f"{sum(r['tokens_per_second'] for r in reports) / len(reports) * 1:,.0f}"])
    print(f"GPT-2-shaped model, {parameters:,} parameters (emb_dim {emb_dim}, {n_layers} layers, "
          f"context {context}), fp32, {batch} x {context} tokens per rank per step, {nproc} ranks; "
          f"per rank (the largest of the ranks), MiB:")
    print_table(["mode", "act. ckpt", "params", "grads", "AdamW", "bytes/param", "peak RSS",
                 "RSS growth", "CUDA max alloc", "tokens/s"], rows)

    # Weights, gradients and AdamW state only (activations, buffers and FSDP's gathered
    # block come on top), fp32 as measured above.
    print(f"\nLargest GPT-2 whose weights + gradients + AdamW state fit one GPU, at 8 GPUs "
          f"(DDP {per_parameter['ddp']:.1f} bytes/param per GPU, FSDP {per_parameter['fsdp']:.1f}/8 = "
          f"{per_parameter['fsdp'] / 8:.1f}):")
    fit_rows = []
    for gigabytes in GPU_MEMORY_GB:
        fit_rows.append([f"{gigabytes} GB"] + [
            max((name for name, count in GPT2_SIZES.items() if count * bytes_per <= gigabytes * 1e9 * 0.8),
                key=GPT2_SIZES.get, default="none")
            for bytes_per in (per_parameter["ddp"], per_parameter["fsdp"] / 8)])
    print_table(["GPU memory", "DDP", "FSDP x 8"], fit_rows)
    print("(80% of the memory for model state, the rest left to activations and the CUDA context)")


if __name__ == "__main__":
    main()
