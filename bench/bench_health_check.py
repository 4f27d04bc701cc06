"""What the non-finite-step check costs a training step (support/health.py).

    uv run python bench/bench_health_check.py [--emb-dim 768] [--n-layers 12] [--batch N]
                                    [--repeats 5] [--dtype fp32|bf16] [--device cpu|cuda]

Two steps of the seed's model shape (context 1024, dropout 0.1), from the same weights,
alternating in this one process after warm-up:

  unchecked: forward, backward, fused AdamW, zero_grad: the step before the check.
  checked:   the same, and what ddp_train.py's train_step adds to it: the global gradient
             norm (torch's get_total_norm over every gradient; a run that clips has it
             already), isfinite of the loss and the norm, the flag handed to fused AdamW
             as its found_inf, and Health.step_done's counters and spike window.

Also the added work alone, on one step's gradients, for its absolute cost, and on CUDA
the added work with the flagged AdamW update under torch.cuda.set_sync_debug_mode("error"):
the benchmark fails if anything in it waits for the device. One process, so the loss all-reduce that both steps share
(it carries the loss to the metrics) is not in either.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import devices  # noqa: E402
from support.config import load_model_config, load_train_config  # noqa: E402
from support.health import Health  # noqa: E402
from support.optimizer import build_optimizer, gradient_norm, optimizer_step_unless  # noqa: E402
from gpt import GPTModel  # noqa: E402
from timing import alternate, print_table  # noqa: E402

SEED_RUN = Path(__file__).resolve().parent.parent / "runs" / "163m-fineweb-edu"


def flag_step(wrapped, loss):
    """What train_step adds: the flag (0-d float on the device) that says skip this step."""
    norm = gradient_norm(wrapped)
    loss_bad, norm_bad = ~torch.isfinite(loss), ~torch.isfinite(norm)
    return SimpleNamespace(nonfinite=(loss_bad | norm_bad).float(),
                           nonfinite_what=loss_bad.float() + 2 * norm_bad.float(), mean_loss=loss)


@click.command()
@click.option("--emb-dim", default=768, show_default=True)
@click.option("--n-layers", default=12, show_default=True)
@click.option("--batch", default=None, type=int, help="Sequences of 1024 a step (default: 1 on CPU, 16 on GPU).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--dtype", "dtype_name", type=click.Choice(["fp32", "bf16"]), default=None,
              help="Autocast precision (default: what ddp_train.py picks for the device).")
@click.option("--device", "device_name", default=None)
def main(emb_dim, n_layers, batch, repeats, dtype_name, device_name):
    device = devices.resolve_device(device_name)
    dtype_name = dtype_name or devices.default_dtype_name(device)
    if dtype_name == "fp16":
        dtype_name = "bf16"   # under fp16 the GradScaler does the check itself: nothing added
    batch = batch or (16 if device.type == "cuda" else 1)
    devices.enable_tf32(device)
    cfg = {**load_model_config(SEED_RUN / "model.json"), "emb_dim": emb_dim, "n_layers": n_layers,
           "n_heads": max(1, emb_dim // 64)}
    train = load_train_config(SEED_RUN / "train.json")
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device).train()
    optimizer = build_optimizer(model, train, device)
    wrapped = SimpleNamespace(model=model, sharded=False)   # what gradient_norm reads of the wrapper
    health = Health(train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    inputs = torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"]), device=device)
    targets = torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"]), device=device)
    parameters = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"training step, emb {emb_dim} x {n_layers} layers ({parameters / 1e6:.0f}M parameters), "
          f"batch {batch} x {cfg['context_length']}, {dtype_name}, on {name} ({torch.get_num_threads()} "
          f"threads), torch {torch.__version__}")

    def forward_backward():
        with devices.autocast(device, dtype_name):
            loss = model(inputs, targets=targets)
        loss.backward()
        return loss.detach()

    def unchecked():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_number = iter(range(10**9))

    def flagged_update(loss):
        result = flag_step(wrapped, loss)
        optimizer_step_unless(result.nonfinite, optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        health.step_done(next(step_number), result, keep_spikes=False)

    def checked():
        flagged_update(forward_backward())

    seconds = alternate({"unchecked": unchecked, "checked": checked}, repeats, device=device)

    # The added work alone, on gradients that stay: its own cost, without the step's noise.
    loss = forward_backward()
    extra = alternate({"check": lambda: health.step_done(next(step_number), flag_step(wrapped, loss),
                                                         keep_spikes=False)}, repeats * 4, device=device)
    optimizer.zero_grad(set_to_none=True)

    syncs = "not measured (CUDA only)"
    if device.type == "cuda":
        # What the check adds to the step, the flagged AdamW update included, under CUDA's
        # sync debugging: any wait for the device in it raises.
        loss = forward_backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            flagged_update(loss)
            syncs = "none (set_sync_debug_mode('error') passed)"
        except RuntimeError as error:
            syncs = f"FOUND: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")

    tokens = batch * cfg["context_length"]
    rows = [[label, f"{seconds[label] * 1e3:.1f}", f"{tokens / seconds[label]:,.0f}",
             f"{seconds[label] / seconds['unchecked']:.3f}"] for label in seconds]
    print_table(["step", "median ms", "tokens/s", "x unchecked"], rows)
    print(f"the check alone: {extra['check'] * 1e3:.2f} ms a step "
          f"({extra['check'] / seconds['unchecked']:.1%} of the unchecked step); host waits in what "
          f"the check adds: {syncs}")
    if device.type == "cuda" and syncs.startswith("FOUND"):
        raise click.ClickException("what the check adds to the step waited for the device")


if __name__ == "__main__":
    main()
