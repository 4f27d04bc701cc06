"""The CUDA paths, for a machine with a GPU: every test here is skipped where
torch.cuda.is_available() is false, and `bench/gpu_check.sh` runs this file first.

What runs on the GPU and nowhere else: the model's kernels against the CPU's numbers,
which attention kernel SDPA picks, the fused loss and torch.compile (inductor's Triton
kernels) on the device, fused AdamW, pinned-memory batch copies, and ddp_train.py
under a 1-GPU torchrun in bf16 and in fp16 with the GradScaler, resumed from a
checkpoint; then test_smoke.py, test_loss.py and export_hf.py on what it trained, and
the preflight.

Tolerances. fp32 comparisons run with TF32 off (training switches it on:
devices.enable_tf32), so CUDA and CPU differ only by summation order: 1e-4. With TF32
on, matmul inputs keep 10 mantissa bits: logits agree within 1e-2. bf16 results are
compared by relative error (2e-2). The resumed runs must equal the uninterrupted ones
bit for bit: both run with torch.use_deterministic_algorithms(True) and
CUBLAS_WORKSPACE_CONFIG=:4096:8, which make CUDA's kernels (cuBLAS, attention backward,
embedding backward) repeat their results exactly; without them atomics may reorder sums.
"""

import contextlib
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from support import checkpointing

from support import weights as weight_files
from support import devices
from support import tokenizer
from support.config import validate_train_config
from gpt import GPTModel, generate
from helpers import (MODEL, PROJECT_ROOT, SCRIPT, SMOKE_SEPARATOR, TRAIN, copy_run_up_to, environment, final_weights, latest,
                     make_run)

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is "
                                "false); bench/gpu_check.sh runs this file on one")
needs_bf16 = pytest.mark.skipif(HAS_CUDA and not torch.cuda.is_bf16_supported(),
                                reason="this GPU has no bf16 (compute capability below 8.0)")
needs_flash = pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability() < (8, 0),
                                 reason="flash attention needs compute capability 8.0 or newer")

CUDA = torch.device("cuda")
# No key bias: its gradient is zero but for rounding (softmax ignores a constant added to
# every score), which relative errors and AdamW's normalised steps would magnify.
SMALL = dict(vocab_size=503, emb_dim=64, context_length=64, n_heads=4, n_layers=2, drop_rate=0.0,
             qkv_bias=False)
# GPT-2's vocabulary, so the scripts can run the real tokenizer on what was trained; the
# toy dataset's ids (< 64) are valid in it.
RUN_MODEL = {**MODEL, "vocab_size": tokenizer.VOCAB_SIZE, "drop_rate": 0.1}
# 1 rank x 2 sequences x 16 tokens a step: 8 steps, checkpoints at 0, 2, 4, 6 and 7.
BF16_TRAIN = {**TRAIN, "dtype": "bf16", "compile": True}
FP16_TRAIN = {**TRAIN, "dtype": "fp16"}
RESUME_FROM_STEP = 4
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
FUSED_ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention",
                       "aten::_scaled_dot_product_efficient_attention",
                       "aten::_scaled_dot_product_cudnn_attention"}


@contextlib.contextmanager
def tf32(enabled):
    """TF32 matmuls on or off inside the block (the same switches as devices.enable_tf32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tokens_for(cfg, batch, length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, length or cfg["context_length"]), generator=generator)


def loss_and_grads(model, inputs, targets, loss_of=None):
    loss = (loss_of or (lambda: model(inputs, targets=targets)))()
    loss.backward()
    grads = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_relative_error(actual, expected, bound, what=""):
    error = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12)).item()
    assert error <= bound, f"{what}: relative error {error:.2e} > {bound}"


# --- the model's kernels ---

def test_cuda_logits_equal_cpu_logits_in_fp32():
    torch.manual_seed(0)
    cpu_model = GPTModel(dict(SMALL, qkv_bias=True)).eval()
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    tokens = tokens_for(SMALL, 3)
    with torch.no_grad():
        expected = cpu_model(tokens)
        with tf32(False):
            exact = cuda_model(tokens.to(CUDA)).cpu()
            loss = cuda_model(tokens.to(CUDA), targets=tokens.roll(-1, 1).to(CUDA)).cpu()
        with tf32(True):
            fast = cuda_model(tokens.to(CUDA)).cpu()
        expected_loss = cpu_model(tokens, targets=tokens.roll(-1, 1))
    torch.testing.assert_close(exact, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, expected, rtol=1e-2, atol=1e-2)


def test_mfu_of_plain_fp32_is_against_a_measured_peak_not_tf32s():
    # "use_amp": false turns TF32 off: the datasheet's fp32 (TF32) peak would make MFU several times too low.
    with tf32(True):
        _, source = devices.mfu_peak_flops(CUDA, "fp32")
    assert devices.datasheet_peak_flops(CUDA, "fp32") is None or source == "the datasheet's fp32 peak"
    with tf32(False):
        peak, source = devices.mfu_peak_flops(CUDA, "fp32")
    assert source == "a fp32 matmul (TF32 off) measured now" and peak > 0
    tf32_peak = devices.datasheet_peak_flops(CUDA, "fp32")
    assert tf32_peak is None or peak < tf32_peak


@needs_flash
def test_sdpa_runs_a_fused_kernel_in_bf16_with_dropout():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    cfg = dict(SMALL, emb_dim=128, n_heads=2, context_length=256, drop_rate=0.1)  # head_dim 64
    torch.manual_seed(0)
    model = GPTModel(cfg).to(CUDA).train()
    inputs, targets = tokens_for(cfg, 2).to(CUDA), tokens_for(cfg, 2, seed=1).to(CUDA)

    def bf16_loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(inputs, targets=targets)

    # Flash attention alone, forward and backward: "No available kernel" if it can't run.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss, grads = loss_and_grads(model, inputs, targets, bf16_loss)
    assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads.values())

    # Left to choose, SDPA runs a fused kernel, never the math fallback that builds the
    # whole score matrix.
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        loss_and_grads(model, inputs, targets, bf16_loss)
    ops = {event.name for event in profiled.events()}
    assert ops & FUSED_ATTENTION_OPS, sorted(name for name in ops if "attention" in name)
    assert "aten::_scaled_dot_product_attention_math" not in ops

    # Its dropout is on and drawn from torch's CUDA generator, so a restored generator
    # state (what a resume does) repeats the masks.
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(bf16_loss().item())
    assert losses[0] == losses[1] != losses[2]


def test_fused_loss_equals_full_logits_loss_on_cuda():
    # GPT-2's vocabulary: 512 rows make two chunks of LinearCrossEntropy.
    cfg = dict(SMALL, vocab_size=tokenizer.VOCAB_SIZE, context_length=256)
    torch.manual_seed(0)
    model = GPTModel(cfg).to(CUDA).train()
    inputs = tokens_for(cfg, 2).to(CUDA)
    targets = tokens_for(cfg, 2, seed=1).to(CUDA)
    targets[0, :7] = -100   # ignored positions, as F.cross_entropy ignores them

    def full_logits_loss():
        return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())

    with tf32(False):
        fused, fused_grads = loss_and_grads(model, inputs, targets)
        full, full_grads = loss_and_grads(model, inputs, targets, full_logits_loss)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    if torch.cuda.is_bf16_supported():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused, fused_grads = loss_and_grads(model, inputs, targets)
            full, full_grads = loss_and_grads(model, inputs, targets, full_logits_loss)
        assert_relative_error(fused, full, 1e-3, "bf16 loss")
        for name, grad in full_grads.items():
            assert_relative_error(fused_grads[name], grad, 2e-2, name)


def test_compiled_training_step_is_one_graph_with_eager_numbers():
    """Inductor on the GPU (Triton kernels): fullgraph=True fails on any graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTModel(SMALL).to(CUDA).train()
    compiled = torch.compile(model, fullgraph=True)
    inputs, targets = tokens_for(SMALL, 2).to(CUDA), tokens_for(SMALL, 2, seed=1).to(CUDA)
    with tf32(False):
        eager_loss, eager_grads = loss_and_grads(model, inputs, targets)
        compiled_loss, compiled_grads = loss_and_grads(model, inputs, targets,
                                                       lambda: compiled(inputs, targets=targets))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)

    # As trained: dropout and the device's default precision (bf16 autocast where supported).
    torch._dynamo.reset()
    dropout_model = GPTModel(dict(SMALL, drop_rate=0.1)).to(CUDA).train()
    compiled = torch.compile(dropout_model, fullgraph=True)

    def trained_loss():
        with devices.autocast(CUDA, devices.default_dtype_name(CUDA)):
            return compiled(inputs, targets=targets)

    loss, grads = loss_and_grads(dropout_model, inputs, targets, trained_loss)
    assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads.values())


def test_build_optimizer_picks_fused_adamw_on_cuda():
    from support.optimizer import build_optimizer

    config = validate_train_config(TRAIN)
    torch.manual_seed(0)
    model = GPTModel(SMALL).to(CUDA)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, config, CUDA)
    assert all(group["fused"] for group in optimizer.param_groups)
    # torch's plain for-loop AdamW with the same settings, on the same gradients.
    plain = torch.optim.AdamW(reference.parameters(), lr=config.learning_rate,
                              weight_decay=config.weight_decay, foreach=False, fused=False)
    inputs, targets = tokens_for(SMALL, 2).to(CUDA), tokens_for(SMALL, 2, seed=1).to(CUDA)
    with tf32(False):
        for _ in range(3):
            for each_model, each_optimizer in ((model, optimizer), (reference, plain)):
                each_model(inputs, targets=targets).backward()
                each_optimizer.step()
                each_optimizer.zero_grad(set_to_none=True)
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_batches_reach_the_gpu_through_pinned_memory(datasets_dir):
    from support.token_data import load_dataset
    from torch.profiler import ProfilerActivity, profile

    batches = load_dataset(datasets_dir / "toy", "train", 256, 0, 1, 2, 16, vocab_size=64)
    batch = batches[3]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
        inputs, targets = devices.to_device(batch, CUDA)
        torch.cuda.synchronize()
    assert inputs.device.type == targets.device.type == "cuda"
    assert torch.equal(inputs.cpu(), batch[0]) and torch.equal(targets.cpu(), batch[1])
    # CUPTI names each host-to-device copy after its source memory: "Memcpy HtoD (Pinned ->
    # Device)", where a pageable source would say "Pageable".
    copies = [event.name for event in profiled.events() if "htod" in event.name.lower()]
    assert len(copies) >= 2 and all("pinned" in name.lower() for name in copies), copies


# --- ddp_train.py under torchrun on one GPU, and the scripts on what it trained ---

def run_on_cuda(run_dir, datasets_dir, *arguments, deterministic=True):
    """ddp_train.py under `torchrun --standalone --nproc_per_node=1` on the GPU. With
    deterministic, through a two-line launcher that switches on
    torch.use_deterministic_algorithms(True) and then runs the script unchanged."""
    script = SCRIPT
    if deterministic:
        script = run_dir.parent / f"deterministic_{run_dir.name}.py"
        script.write_text("import runpy, sys, torch\n"
                          "torch.use_deterministic_algorithms(True)\n"
                          f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
                          f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(script), str(run_dir), str(datasets_dir), *arguments, "--device", "cuda"]
    return subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600,
                          env=environment(DETERMINISTIC if deterministic else None))


def trained_on_cuda(run_dir, datasets_dir, *arguments):
    result = run_on_cuda(run_dir, datasets_dir, *arguments)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, datasets_dir):
    run_dir = make_run(tmp_path_factory.mktemp("cuda-fp16") / "run", RUN_MODEL, FP16_TRAIN)
    trained_on_cuda(run_dir, datasets_dir)
    return run_dir


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, datasets_dir):
    run_dir = make_run(tmp_path_factory.mktemp("cuda-bf16") / "run", RUN_MODEL, BF16_TRAIN)
    trained_on_cuda(run_dir, datasets_dir)
    return run_dir


def assert_resumed_run_is_the_uninterrupted_one(full_run, tmp_path, datasets_dir):
    run_dir = copy_run_up_to(full_run, tmp_path / "resumed", step=RESUME_FROM_STEP)
    result = trained_on_cuda(run_dir, datasets_dir, "latest")
    assert f"at step {RESUME_FROM_STEP + 1}" in result.stdout
    resumed, uninterrupted = latest(run_dir), latest(full_run)
    assert resumed.global_step == uninterrupted.global_step == 7
    assert resumed.meta["history"] == uninterrupted.meta["history"]
    expected = final_weights(full_run)
    for name, tensor in final_weights(run_dir).items():
        assert torch.equal(tensor, expected[name]), name
    return resumed, uninterrupted


@needs_bf16
def test_bf16_compiled_run_resumed_equals_the_uninterrupted_run(bf16_run, tmp_path, datasets_dir):
    resumed, uninterrupted = assert_resumed_run_is_the_uninterrupted_one(bf16_run, tmp_path, datasets_dir)
    assert uninterrupted.meta["dtype"] == "bf16"
    history = uninterrupted.meta["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # it learns


def test_fp16_run_with_grad_scaler_resumed_equals_the_uninterrupted_run(fp16_run, tmp_path, datasets_dir):
    resumed, uninterrupted = assert_resumed_run_is_the_uninterrupted_one(fp16_run, tmp_path, datasets_dir)
    assert uninterrupted.meta["dtype"] == "fp16"
    # The GradScaler's state (its scale and growth count) went through the checkpoint too.
    scalers = [torch.load(checkpoint.path / checkpointing.SCALER_FILE, weights_only=True)
               for checkpoint in (resumed, uninterrupted)]
    assert scalers[0]["scale"] > 0 and scalers[0] == scalers[1]
    history = uninterrupted.meta["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def run_script(*arguments):
    return subprocess.run([sys.executable, *map(str, arguments)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=300, env=environment({"HF_HUB_OFFLINE": "1"}))


def test_scripts_on_a_cuda_trained_checkpoint(fp16_run, tmp_path, datasets_dir):
    """test_smoke.py, test_loss.py and export_hf.py on the GPU run's last checkpoint,
    each against the same weights evaluated on the CPU in fp32."""
    model_json, weights = fp16_run / "model.json", latest(fp16_run).path / checkpointing.MODEL_FILE
    cpu_model = weight_files.load_model(model_json, weights)

    smoke = run_script("test_smoke.py", model_json, weights, "--device", "cuda", "--temperature", "0",
                       "--num-tokens", "8")
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    prompt = tokenizer.encode("Every effort moves you")
    continuation = tokenizer.decode(generate(cpu_model, [prompt], 8)[0])
    assert smoke.stdout == f"Every effort moves you\n{SMOKE_SEPARATOR}\n{continuation}\n"

    loss = run_script("test_loss.py", datasets_dir, model_json, weights, "--dataset", datasets_dir / "toy",
                      "--start-token", "0", "--batches", "4", "--batch-size", "2", "--device", "cuda",
                      "--dtype", "fp32")
    assert loss.returncode == 0, loss.stderr[-3000:]
    printed = float(re.search(r"^Loss against our test dataset: ([0-9.]+)", loss.stdout, re.MULTILINE).group(1))
    values = load_file(str(datasets_dir / "toy" / "validation.safetensors"))["tokens"].long()[:4 * 2 * 16 + 1]
    with torch.no_grad():
        batches = [(values[i * 32:i * 32 + 32].view(2, 16), values[i * 32 + 1:i * 32 + 33].view(2, 16))
                   for i in range(4)]
        expected = sum(F.cross_entropy(cpu_model(x).flatten(0, 1), y.flatten()).item() for x, y in batches) / 4
    assert printed == pytest.approx(expected, abs=1e-3)   # printed with 3 decimals

    exported = run_script("export_hf.py", model_json, weights, tmp_path / "export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export").to(CUDA).eval()
    tokens = tokens_for(RUN_MODEL, 2)
    with torch.no_grad(), tf32(False):
        torch.testing.assert_close(theirs(tokens.to(CUDA)).logits.cpu(), cpu_model(tokens),
                                   rtol=1e-4, atol=1e-4)


def test_preflight_on_cuda(tmp_path, datasets_dir):
    """The preflight as a user runs it before a long GPU run, in the device's default
    precision; it trains a few steps and writes nothing into the run. (Uncompiled: the
    compiled 1-GPU run is test_bf16_compiled_run_resumed_equals_the_uninterrupted_run's.)"""
    run_dir = make_run(tmp_path / "run", RUN_MODEL, {**TRAIN, "dtype": None})
    before = sorted(path.name for path in run_dir.iterdir())
    result = run_on_cuda(run_dir, datasets_dir, "--preflight", deterministic=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "tokens/s" in result.stdout
    assert sorted(path.name for path in run_dir.iterdir()) == before
    assert not os.path.exists(run_dir / "checkpoints")
