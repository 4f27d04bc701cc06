"""Choosing the device, the distributed backend and the numeric precision."""

import contextlib

import torch


def default_device_name() -> str:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> torch.device:
    """A torch.device from a user's --device value (None = the default)."""
    device = torch.device(name or default_device_name())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device '{name}' requested but MPS is not available")
    return device


def choose_device_and_dtype(device_name: str | None, dtype_name: str | None):
    """A script's --device and --dtype checked together: (torch.device, dtype name).
    No dtype means the device's default. Raises ValueError naming what is wrong."""
    device = resolve_device(device_name)
    if dtype_name == "bf16" and not supports_bf16(device):
        raise ValueError(f"{device} does not support bf16; use fp16 or fp32")
    return device, dtype_name or default_dtype_name(device)


def training_dtype(train_json, config, device: torch.device) -> tuple[str, str | None]:
    """The precision a run trains in, and a note to print when train.json's choice means
    something else on this device: `dtype`; else the later original's `use_amp` (true:
    fp16 autocast with a GradScaler, as it does on GPUs even where bf16 would run; false:
    plain fp32); else the device's default. A choice the device or the parallelism can't
    train in is a ConfigError naming the key."""
    from .config import ConfigError

    note = None
    wanted = config.dtype
    if wanted is None and config.use_amp is not None:
        wanted = "fp16" if config.use_amp else "fp32"
        if config.use_amp and device.type != "cuda":
            wanted = default_dtype_name(device)
            note = (f"note: {train_json}: \"use_amp\": true means fp16 autocast with a GradScaler on a GPU; "
                    f"on {device.type} this run trains in {wanted} instead (set \"use_amp\": false for fp32)")
    try:
        _, dtype_name = choose_device_and_dtype(str(device), wanted)
    except ValueError:
        raise ConfigError(f"{train_json}: key 'dtype' is \"bf16\", which {device} "
                          f"does not support; use \"fp16\" or \"fp32\"") from None
    # FSDP mixes precision by its own policy, without a (sharded) gradient scaler.
    if config.parallelism == "fsdp" and dtype_name == "fp16":
        raise ConfigError(f"{train_json}: key 'parallelism' is \"fsdp\", which trains in "
                          f"bf16 or fp32 only, and {device} does not support bf16: set \"dtype\": "
                          f"\"fp32\", or use \"parallelism\": \"ddp\"")
    return dtype_name, note


def to_device(batch, device: torch.device):
    """A batch's (inputs, targets) on the training device."""
    inputs, targets = batch
    if device.type == "cuda":
        # Page-locked host memory lets the copy run asynchronously, overlapping the
        # previous step's kernels instead of stalling the host.
        return (inputs.pin_memory().to(device, non_blocking=True),
                targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs at all on this device (maybe emulated, on older CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


def cpu_has_native_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16, AMX, Arm BF16). Without them a CPU converts
    bf16 to fp32 around every matmul, which is slower than plain fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            flags = set()
            for line in file:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype_name(device: torch.device) -> str:
    """bf16 where it is fast; else the seed's fp16 + GradScaler on CUDA, fp32 on a CPU."""
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16" if supports_bf16(device) else "fp16"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, dtype_name: str):
    """Autocast context for a dtype name; fp32 means no autocast at all."""
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype_name])


# Dense (no sparsity) peak tensor-core FLOP/s from the vendors' datasheets, for MFU.
# Keyed by a substring of torch.cuda.get_device_name(); first match wins. "fp32" is the
# TF32 tensor-core peak on Ampere and newer, because enable_tf32 runs fp32 matmuls there;
# V100 and T4 have no TF32 and keep their plain fp32 figure.
GPU_PEAK_FLOPS = [  # (name, {dtype: FLOP/s})
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),   # before "L4", which it contains
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def enable_tf32(device: torch.device, enabled: bool = True) -> None:
    """On CUDA, run fp32 matmuls and convolutions (the fp32 dtype, and whatever autocast
    leaves in fp32) on TF32 tensor cores: ~8x an A100's or H100's plain fp32 rate. Off
    for the later original's "use_amp": false, which trains in true fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def datasheet_peak_flops(device: torch.device, dtype_name: str) -> float | None:
    """The datasheet's dense peak for this GPU and dtype, or None if we don't know it."""
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype_name)


def mfu_peak_flops(device: torch.device, dtype_name: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) that MFU is measured against: the datasheet's
    dense peak of a known GPU, else a large matmul measured now (a CPU's practical peak).
    The table's fp32 is the TF32 tensor cores' figure: with TF32 off (enable_tf32, for the
    later original's "use_amp": false) fp32 runs several times slower, so it is measured."""
    plain_fp32 = device.type == "cuda" and dtype_name == "fp32" and not torch.backends.cuda.matmul.allow_tf32
    peak = None if plain_fp32 else datasheet_peak_flops(device, dtype_name)
    if peak is not None:
        return peak, f"the datasheet's {dtype_name} peak"
    return measure_matmul_flops(device, dtype_name), f"a {dtype_name} matmul{' (TF32 off)' if plain_fp32 else ''} measured now"


def gpu_peak_flops(device_name: str, dtype_name: str) -> float | None:
    for key, peaks in GPU_PEAK_FLOPS:
        if key in device_name:
            return peaks.get(dtype_name)
    return None


def measure_matmul_flops(device: torch.device, dtype_name: str, max_size: int = 2048,
                         seconds: float = 0.2) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak of a CPU, or the
    fallback for a GPU missing from the table. The size grows from 256 while one
    product takes under 50 ms, so a dtype a CPU only emulates can't stall start-up.
    Each product is timed alone (at least three, for `seconds` in all) and the median
    kept, at that size and at half of it,
    and the faster of the two returned: a busy moment on a shared machine moves it
    little (one long average swung from 0.03 to 0.37 TFLOP/s between runs)."""
    import statistics
    import time

    dtype = TORCH_DTYPES[dtype_name]
    # A private generator: measuring must not move the global one (dropout, resume).
    generator = torch.Generator(device).manual_seed(0)

    def square(size):
        return torch.randn(size, size, device=device, generator=generator).to(dtype)

    def seconds_per_product(a, b):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        return time.perf_counter() - start

    size = 256
    while True:
        a, b = square(size), square(size)
        a @ b  # warm-up: kernel selection, page faults
        if size >= max_size or seconds_per_product(a, b) > 0.05:
            break
        size *= 2
    best, largest = 0.0, (a, b)   # the largest pair is warmed up already
    for n in sorted({max(256, size // 2), size}):
        if n == size:
            a, b = largest
        else:
            a, b = square(n), square(n)
            a @ b
        times, start = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < seconds / 2:
            times.append(seconds_per_product(a, b))
        best = max(best, 2 * n ** 3 / statistics.median(times))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def training_flops_per_token(cfg: dict) -> float:
    """Model FLOPs of one training token (forward + backward), the PaLM-paper count:
    6 x (parameters used in matmuls: everything but the two embedding lookups)
    + 12 x n_layers x emb_dim x context_length for the attention scores and mixing."""
    d, layers, vocab = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    bias = 3 * d if cfg["qkv_bias"] else 0
    per_block = 4 * d * d + bias + d + 8 * d * d + 5 * d + 4 * d   # attention, MLP, two norms
    matmul_parameters = layers * per_block + 2 * d + vocab * d    # + final norm, output head
    return 6 * matmul_parameters + 12 * layers * d * cfg["context_length"]
