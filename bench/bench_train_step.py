"""Training-step throughput and MFU: our step against a naive step and against the peer
users would otherwise pick, Hugging Face transformers' GPT2LMHeadModel.

    uv run python bench/bench_train_step.py [--batch N] [--repeats N] [--dtype fp32|bf16|fp16]
                         [--peers/--no-peers] [--precisions fp32,bf16|fp32|bf16] [--json PATH]

The seed's 163M configuration (emb 768, 12 layers, 12 heads, context 1024, dropout 0.1).
One step is forward, backward and an AdamW update. Every step starts from the same
weights, and all of them are timed alternately in this one process, after warm-up.

  ours:  gpt.GPTModel (fused SDPA / layer_norm / GELU kernels; on a CPU with dropout,
         block-by-block causal attention), the fused linear + cross-entropy loss,
         ddp_train's fused AdamW, torch.compile on CUDA.
  naive: bench/naive_gpt.py (explicit masked softmax attention, hand-written GELU and
         LayerNorm), full logits + F.cross_entropy, for-loop AdamW; fp16 autocast with a
         GradScaler on CUDA (the seed's), the same dtype as ours on a CPU.
  transformers: GPT2LMHeadModel built from GPT2Config as a user would (its default
         gelu_new, dropout 0.1 everywhere), attn_implementation="sdpa", the output head
         untied from the embedding as ours is, its own loss through `labels=`, torch's
         fused AdamW (the Trainer's default optimizer on torch >= 2.8), compiled where ours is.

Ours and transformers run in fp32 and in bf16 autocast, bf16 only where it is native
(a GPU that supports it, a CPU with AVX512-BF16 / AMX); the naive step and ours compare
in --dtype (default: what ddp_train.py picks for the device).

MFU = model FLOPs per token x tokens/s / peak FLOP/s, with model FLOPs per token =
6 x (parameters used in matmuls) + 12 x n_layers x emb_dim x context_length
(devices.training_flops_per_token), the same for every row: the three models have the
same matmuls. Peak: the datasheet's dense figure for a known GPU, else a large matmul
measured in this run, in the precision the row ran in.
"""

import json
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import devices  # noqa: E402
from support import hf_gpt2  # noqa: E402
from support import safe_files  # noqa: E402
from support.config import load_model_config, load_train_config  # noqa: E402
from support.optimizer import build_optimizer  # noqa: E402
from gpt import GPTModel  # noqa: E402
from naive_gpt import NaiveGPTModel  # noqa: E402
from timing import alternate, print_table  # noqa: E402

SEED_RUN = Path(__file__).resolve().parent.parent / "runs" / "163m-fineweb-edu"
SEED_163M = load_model_config(SEED_RUN / "model.json")
SEED_TRAIN = load_train_config(SEED_RUN / "train.json")  # AdamW settings for build_optimizer
PEER = "transformers GPT2LMHeadModel"


def make_step(model, loss_of, optimizer, device, dtype_name, scaler, inputs, targets):
    def step():
        with devices.autocast(device, dtype_name):
            loss = loss_of(model, inputs, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def fused_loss(model, inputs, targets):
    return model(inputs, targets=targets)


def full_logits_loss(model, inputs, targets):
    return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())


def transformers_loss(model, inputs, targets):
    # As users train it: labels are the inputs, shifted by one inside the model.
    return model(input_ids=inputs, labels=inputs, use_cache=False).loss


def native_bf16(device: torch.device) -> bool:
    """bf16 at full speed: a CPU without bf16 instructions only emulates it (slower than fp32)."""
    if device.type == "cpu":
        return devices.cpu_has_native_bf16()
    return devices.supports_bf16(device)


def transformers_gpt2(cfg, ours: GPTModel, device):
    """GPT2LMHeadModel of cfg's shape holding our model's weights (hf_gpt2's mapping)."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"],
                        n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
                        resid_pdrop=cfg["drop_rate"], embd_pdrop=cfg["drop_rate"],
                        attn_pdrop=cfg["drop_rate"], layer_norm_epsilon=hf_gpt2.LAYER_NORM_EPS,
                        tie_word_embeddings=False, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    tensors, tied = hf_gpt2.to_transformers(ours.state_dict(), cfg)
    assert not tied
    # strict=False: some transformers releases keep attention-mask buffers we don't map.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all(name.endswith(("attn.bias", "attn.masked_bias")) for name in missing), \
        (missing, unexpected)
    return model.to(device).train(), transformers.__version__


def check_same_function(ours, peer, device, cfg):
    """Both models give one loss on the same tokens (dropout off, fp32): the peer runs the
    same computation, so the timings compare like with like. Returns the two losses."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 129), generator=generator).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ours.eval(), peer.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # TF32 would blur the comparison
    with torch.no_grad():
        # transformers shifts the labels left by one inside: labels=inputs scores position
        # t against inputs[t + 1] = targets[t], for every position but the last...
        peer_loss = peer(input_ids=inputs, labels=inputs, use_cache=False).loss.item()
        # ...so ours leaves the last one out too (-100: ignored).
        our_loss = ours(inputs, targets=torch.cat(
            [targets[:, :-1], torch.full_like(targets[:, -1:], -100)], 1)).item()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ours.train(), peer.train()
    if abs(our_loss - peer_loss) > 1e-3:
        raise click.ClickException(f"transformers' loss {peer_loss:.5f} differs from ours "
                                   f"{our_loss:.5f} at the same weights")
    return our_loss, peer_loss


@click.command()
@click.option("--batch", default=None, type=int, help="Micro-batch (default: 2 on CPU, 16 on GPU).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--dtype", "dtype_name", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Precision of ours against the naive step (default: what ddp_train.py picks "
                   "for the device).")
@click.option("--device", "device_name", default=None)
@click.option("--compile/--no-compile", "use_compile", default=None,
              help="torch.compile ours and transformers' model (default: on CUDA only).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Also time transformers' GPT2LMHeadModel.")
@click.option("--precisions", default="fp32,bf16", show_default=True,
              type=click.Choice(["fp32,bf16", "fp32", "bf16"]),
              help="Precisions of ours and transformers side by side (bf16 only where native).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows to this JSON file.")
def main(batch, repeats, dtype_name, device_name, use_compile, peers, precisions, json_path):
    device = devices.resolve_device(device_name)
    batch = batch or (16 if device.type == "cuda" else 2)
    dtype_name = dtype_name or devices.default_dtype_name(device)
    naive_dtype = "fp16" if device.type == "cuda" else dtype_name
    use_compile = device.type == "cuda" if use_compile is None else use_compile
    devices.enable_tf32(device)
    peer_dtypes = [name for name in precisions.split(",") if name != "bf16" or native_bf16(device)]
    compiled = ", compiled" if use_compile else ""

    torch.manual_seed(0)
    naive = NaiveGPTModel(SEED_163M).to(device)
    ours = GPTModel(SEED_163M).to(device)
    ours.load_state_dict(naive.state_dict())
    seq = SEED_163M["context_length"]
    inputs = torch.randint(0, SEED_163M["vocab_size"], (batch, seq), device=device)
    targets = torch.randint(0, SEED_163M["vocab_size"], (batch, seq), device=device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"training step, 163M config, batch {batch} x {seq} tokens on {name} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")

    # One model and optimizer per implementation, shared by its precisions: the weights
    # drift apart between steps, which moves no timing.
    our_model = torch.compile(ours) if use_compile else ours
    our_optimizer = build_optimizer(ours, SEED_TRAIN, device)
    candidates = {}   # label -> (step, implementation, dtype)

    def add(label, implementation, model, loss_of, optimizer, step_dtype):
        scaler = torch.amp.GradScaler(device.type, enabled=step_dtype == "fp16")
        candidates[label] = (make_step(model, loss_of, optimizer, device, step_dtype, scaler,
                                       inputs, targets), implementation, step_dtype)

    add(f"naive ({naive_dtype})", "naive", naive, full_logits_loss,
        torch.optim.AdamW(naive.parameters(), lr=4e-4, weight_decay=0.1, foreach=False), naive_dtype)
    for step_dtype in dict.fromkeys([dtype_name] + (peer_dtypes if peers else [])):
        add(f"ours ({step_dtype}{compiled})", "ours", our_model, fused_loss, our_optimizer, step_dtype)

    if peers:
        peer, version = transformers_gpt2(SEED_163M, ours, device)
        our_count = sum(p.numel() for p in ours.parameters())
        peer_count = sum(p.numel() for p in peer.parameters())
        # GPT-2's fused Q/K/V projection always has a bias; ours has none (qkv_bias false).
        qkv_bias = 0 if SEED_163M["qkv_bias"] else 3 * SEED_163M["emb_dim"] * SEED_163M["n_layers"]
        assert peer_count == our_count + qkv_bias, (peer_count, our_count)
        our_loss, peer_loss = check_same_function(ours, peer, device, SEED_163M)
        print(f"parameters: ours {our_count:,}; {PEER} (transformers {version}, sdpa, untied head) "
              f"{peer_count:,}, its Q/K/V bias ({qkv_bias:,}) the only difference; "
              f"loss at the same weights, dropout off: ours {our_loss:.4f}, transformers {peer_loss:.4f}")
        peer_model = torch.compile(peer) if use_compile else peer
        peer_optimizer = torch.optim.AdamW(peer.parameters(), lr=SEED_TRAIN.learning_rate,
                                           weight_decay=SEED_TRAIN.weight_decay, fused=True)
        for step_dtype in peer_dtypes:
            add(f"transformers ({step_dtype}{compiled})", "transformers", peer_model,
                transformers_loss, peer_optimizer, step_dtype)
        if "bf16" in precisions and "bf16" not in peer_dtypes:
            print(f"bf16 rows skipped: no native bf16 on {name}"
                  + (" (no AVX512-BF16 or AMX), where emulated bf16 is slower than fp32"
                     if device.type == "cpu" else ""))

    step_dtypes = list(dict.fromkeys(step_dtype for _, _, step_dtype in candidates.values()))
    peaks = {step_dtype: devices.mfu_peak_flops(device, step_dtype) for step_dtype in step_dtypes}
    medians = alternate({label: step for label, (step, _, _) in candidates.items()},
                        repeats=repeats, warmup=2 if use_compile else 1, device=device)
    # A measured peak only ever reads low (a busy moment): measured again after the
    # steps, the higher of the two is kept.
    peaks = {step_dtype: max(peak, devices.mfu_peak_flops(device, step_dtype), key=lambda p: p[0])
             for step_dtype, peak in peaks.items()}
    tokens = batch * seq
    flops_per_token = devices.training_flops_per_token(SEED_163M)
    ours_seconds = {step_dtype: medians[label] for label, (_, implementation, step_dtype)
                    in candidates.items() if implementation == "ours"}

    results = []
    for label, (_, implementation, step_dtype) in candidates.items():
        seconds = medians[label]
        # Ours against this row: the naive step in --dtype, transformers in its own precision.
        versus = ours_seconds[dtype_name if implementation == "naive" else step_dtype]
        results.append({"label": label, "implementation": implementation, "dtype": step_dtype,
                        "compiled": use_compile and implementation != "naive",
                        "seconds": seconds, "tokens_per_second": tokens / seconds,
                        "ours_faster_by": None if implementation == "ours" else seconds / versus,
                        "mfu": flops_per_token * tokens / seconds / peaks[step_dtype][0]})
    print_table(["step", "s/step (median)", "tokens/s", "ours is faster by", "MFU"],
                [[row["label"], f"{row['seconds']:.3f}", f"{row['tokens_per_second']:,.0f}",
                  "-" if row["ours_faster_by"] is None else f"{row['ours_faster_by']:.2f}x",
                  f"{row['mfu']:.1%}"] for row in results])
    print(f"ours / naive: {medians[f'naive ({naive_dtype})'] / ours_seconds[dtype_name]:.2f}x")
    print(f"model FLOPs per token: {flops_per_token / 1e9:.3f} GFLOP "
          f"(6 x matmul parameters + 12 x layers x emb_dim x context)")
    print_table(["peak dtype", "source", "peak TFLOP/s"],
                [[peak_dtype, source, f"{peak / 1e12:.3f}"] for peak_dtype, (peak, source) in peaks.items()])
    if json_path is not None:  # for bench/gpu_check.sh's table
        safe_files.write_atomically(json_path, json.dumps({
            "device": name, "torch": torch.__version__, "batch": batch, "context_length": seq,
            "rows": results, "peaks": {key: {"flops": peak, "source": source}
                                       for key, (peak, source) in peaks.items()}}, indent=1))


if __name__ == "__main__":
    main()
