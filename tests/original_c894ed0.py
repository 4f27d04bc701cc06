"""The later original's training (gpjt/ddp-base-model-from-scratch at c894ed0), recomputed
in one process from its description (shared/original-c894ed0.md, sections 1 to 4): the
oracle the c894ed0-dialect tests compare ddp_train.py with. Nothing of ours is used but
the naive model of bench/naive_gpt.py (the original's formulas, its masked-loop mixture
of experts), so that a mistake in ours can't hide in both.

For W ranks, global step s, micro-step m of A: rank r trains on batch ((s * A) + m) * W + r;
the gradients are the mean over the ranks of sum over m of grad(loss / A); then clipping
(recording the norm), a skipped step if any gradient is not finite, AdamW, and the
schedule, read before it steps. A checkpoint at every step divisible by
checkpoint_interval and at the last: rank 0's micro-step losses since the one before
give min/max/avg_train_loss; best is the lowest avg (strictly), the first always best.
"""

import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from naive_gpt import NaiveGPTModel  # noqa: E402


# Every set of train.json keys among the 36 runs/ of the original at c894ed0 (the values of
# the keys are ours): tests/test_config.py loads each at its size, tests/test_c894ed0.py
# trains each at a CPU's. C894ED0 is what all of them have.
C894ED0 = dict(dataset="gpjt/fineweb-gpt2-tokens", min_train_tokens=3_260_190_720, start_train_token=0,
               start_val_token=50_000_000, microbatch_size=13, checkpoint_interval=1000)
C894ED0_TRAIN_KEY_SETS = [
    (),
    ("weight_decay",),
    ("gradient_accumulation_steps",),
    ("use_amp",),
    ("learning_rate",),
    ("clipping_max_norm",),
    ("learning_rate", "schedule_learning_rate", "warmup_period_percent"),
    ("schedule_learning_rate", "warmup_period_percent", "weight_decay"),
    ("learning_rate", "schedule_learning_rate", "warmup_period_percent", "weight_decay"),
    ("clipping_max_norm", "learning_rate", "schedule_learning_rate", "warmup_period_percent"),
    ("clipping_max_norm", "learning_rate", "schedule_learning_rate", "warmup_period_percent", "weight_decay"),
    ("clipping_max_norm", "gradient_accumulation_steps", "learning_rate", "schedule_learning_rate",
     "warmup_period_percent", "weight_decay"),
    ("clipping_max_norm", "gradient_accumulation_steps", "learning_rate", "schedule_learning_rate", "use_amp",
     "warmup_period_percent"),
]
C894ED0_VALUES = dict(weight_decay=0.05, gradient_accumulation_steps=4, use_amp=False, learning_rate=0.0014,
                      clipping_max_norm=1.0, schedule_learning_rate=True, warmup_period_percent=5)
# The five runs that kept bf269c6's validation keys (they crash in the original itself).
C894ED0_LEGACY = {**{key: value for key, value in C894ED0.items() if key != "checkpoint_interval"},
                  "validation_interval": 100, "validation_batches": 100}


def scheduled_learning_rate(step, total_steps, peak, warmup_percent):
    """The original's LinearLR-then-cosine schedule in closed form (section 1.3)."""
    warmup = (total_steps * warmup_percent) // 100
    floor = peak / 10
    if step < warmup:
        return peak * (1e-5 + (1 - 1e-5) * step / warmup)
    return floor + (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup))) / 2


def routing_of(model, inputs):
    """Each MoE layer's (softmax over all E router logits, top-k weights) averaged over the
    tokens, as the original logs them, captured with hooks on the routers."""
    captured = []
    hooks = [block.ff.router.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
             for block in model.trf_blocks]
    model(inputs)
    for hook in hooks:
        hook.remove()
    statistics = []
    for block, logits in zip(model.trf_blocks, captured):
        k = block.ff.num_active_experts
        top_logits, top_experts = torch.topk(logits, k, dim=-1)
        weights = torch.softmax(torch.full_like(logits, -torch.inf).scatter(-1, top_experts, top_logits), dim=-1)
        statistics.append((torch.softmax(logits, dim=-1).flatten(0, 1).mean(0).tolist(),
                           weights.flatten(0, 1).mean(0).tolist()))
    return statistics


def switch_balancing_loss(model, router_logits):
    """Ours beyond the original (train.json's moe_balance_loss_weight): the Switch
    Transformer's load-balancing loss, E * sum_i f_i * P_i averaged over the MoE layers, f
    the share of token-to-expert assignments to expert i and P its mean router probability."""
    per_layer = []
    for block, logits in zip(model.trf_blocks, router_logits):
        experts, k = logits.shape[-1], block.ff.num_active_experts
        chosen = torch.topk(logits, k, dim=-1).indices.flatten()
        share = torch.bincount(chosen, minlength=experts).float() / chosen.numel()
        probability = torch.softmax(logits.float(), dim=-1).flatten(0, 1).mean(0)
        per_layer.append(experts * (share * probability).sum())
    return torch.stack(per_layer).mean()


def original_scheduler(optimizer, train: dict, total_steps: int):
    """The original's SequentialLR (section 1.3), built as it builds it from torch's schedulers."""
    peak = train.get("learning_rate", 0.0004)
    warmup = (total_steps * train.get("warmup_period_percent", 0)) // 100
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.00001, end_factor=1.0, total_iters=warmup)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup, eta_min=peak / 10)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[linear, cosine], milestones=[warmup])


def load_like_the_original(checkpoints_dir: Path, name: str, model, optimizer, scaler=None, scheduler=None):
    """The original's load_checkpoint (section 3): the weights strictly (safetensors'
    load_model, which takes a tied model's one matrix), optimizer.pt, scaler.pt with
    AMP, scheduler.pt with a schedule; (the next step, best/meta.json's avg_train_loss)."""
    from safetensors.torch import load_model

    path = Path(checkpoints_dir) / name
    load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt"))
    if scaler is not None:
        scaler.load_state_dict(torch.load(path / "scaler.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    meta = json.loads((path / "meta.json").read_text())
    best = json.loads((Path(checkpoints_dir) / "best" / "meta.json").read_text())["avg_train_loss"]
    return meta["global_step"] + 1, best


def original_meta(min_loss: float, max_loss: float) -> dict:
    """The eleven meta.json keys the original writes for a best checkpoint of a run without
    clipping or experts, its window's losses from min_loss to max_loss."""
    return {"learning_rate": 0.0004, "min_train_loss": min_loss, "max_train_loss": max_loss,
            "avg_train_loss": (min_loss + max_loss) / 2, "max_grad_norms": None, "avg_grad_norms": None,
            "frac_clipped": None, "moe_routing_weights": [], "moe_routing_topk_weights": [], "is_best": True}


def save_like_the_original(checkpoints_dir: Path, step: int, model, optimizer, scheduler, meta: dict,
                           written_at="20260801Z000000", scaler=None) -> Path:
    """The original's save_checkpoint (section 3): save_model (a tied matrix once, as
    out_head.weight), optimizer.pt, scaler.pt with AMP, scheduler.pt with a schedule, its
    eleven meta.json keys with indent 2, then `best` (when best) and `latest` re-linked."""
    from safetensors.torch import save_model

    checkpoints_dir = Path(checkpoints_dir)
    name = f"{written_at}-iteration-{step}"
    path = checkpoints_dir / name
    path.mkdir(parents=True)
    save_model(model, str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), path / "scaler.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
    keys = ("learning_rate", "min_train_loss", "max_train_loss", "avg_train_loss", "max_grad_norms",
            "avg_grad_norms", "frac_clipped", "moe_routing_weights", "moe_routing_topk_weights")
    (path / "meta.json").write_text(json.dumps({**{key: meta[key] for key in keys}, "global_step": step,
                                                "is_best": meta["is_best"]}, indent=2))
    for link in (("best",) if meta["is_best"] else ()) + ("latest",):
        (checkpoints_dir / link).unlink(missing_ok=True)
        (checkpoints_dir / link).symlink_to(name, target_is_directory=True)
    return path


def original_training(model_config: dict, train: dict, tokens: torch.Tensor, world_size: int,
                      resume_from=None, save_at=(), checkpoints_dir=None):
    """The original's run: (final model, a {step: meta-like dict} per checkpoint).

    resume_from: the name of a checkpoint in checkpoints_dir to continue from, loaded as
    the original loads it; its schedule then comes from scheduler.pt (otherwise from the
    closed form). save_at: steps whose checkpoint is also written into checkpoints_dir as
    the original writes it."""
    seed = train.get("random_seed", 42)
    random.seed(seed)
    torch.manual_seed(seed)
    model = NaiveGPTModel(model_config)
    peak = train.get("learning_rate", 0.0004)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=train.get("weight_decay", 0.1))
    accumulation = train.get("gradient_accumulation_steps", 1)
    batch, length = train["microbatch_size"], model_config["context_length"]
    per_step = world_size * accumulation * batch * length
    total_steps = -(-train["min_train_tokens"] // per_step)
    clip = train.get("clipping_max_norm")
    balance = train.get("moe_balance_loss_weight", 0)
    router_logits = []
    if balance:
        for block in model.trf_blocks:
            block.ff.router.register_forward_hook(lambda module, args, output: router_logits.append(output))
    scheduled = bool(train.get("schedule_learning_rate"))
    scheduler = original_scheduler(optimizer, train, total_steps) if scheduled else None
    start, best = 0, None
    if resume_from is not None:
        start, best = load_like_the_original(checkpoints_dir, resume_from, model, optimizer, scheduler=scheduler)
    checkpoints, losses, norms, routing = {}, [], [], []
    for step in range(start, total_steps):
        if resume_from is not None and scheduled:
            learning_rate = optimizer.param_groups[0]["lr"]   # as the original: the scheduler set it
        else:
            learning_rate = (scheduled_learning_rate(step, total_steps, peak, train.get("warmup_period_percent", 0))
                             if scheduled else peak)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        optimizer.zero_grad()
        for micro_step in range(accumulation):
            for rank in range(world_size):
                start_token = ((step * accumulation + micro_step) * world_size + rank) * batch * length
                chunk = tokens[start_token:start_token + batch * length + 1].long()
                inputs, targets = chunk[:-1].view(batch, length), chunk[1:].view(batch, length)
                router_logits.clear()
                loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
                objective = loss + balance * switch_balancing_loss(model, router_logits) if balance else loss
                router_logits.clear()
                (objective / accumulation / world_size).backward()
                if rank == 0:
                    losses.append(loss.item())
                    if "moe" in model_config:
                        with torch.no_grad():
                            routing.append(routing_of(model, inputs))
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % train["checkpoint_interval"] == 0 or step == total_steps - 1:
            average = sum(losses) / len(losses)
            is_best = best is None or average < best
            best = average if is_best else best
            checkpoints[step] = {
                "learning_rate": learning_rate, "min_train_loss": min(losses), "max_train_loss": max(losses),
                "avg_train_loss": average, "is_best": is_best,
                "max_grad_norms": max(norms) if norms else None,
                "avg_grad_norms": sum(norms) / len(norms) if norms else None,
                "frac_clipped": sum(norm > clip for norm in norms) / len(norms) if norms else None,
                "moe_routing_weights": [[layer[0] for layer in micro] for micro in routing],
                "moe_routing_topk_weights": [[layer[1] for layer in micro] for micro in routing]}
            if step in save_at:
                save_like_the_original(checkpoints_dir, step, model, optimizer, scheduler, checkpoints[step])
            losses, norms, routing = [], [], []
    return model, checkpoints
