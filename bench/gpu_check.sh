#!/usr/bin/env bash
# The first thing to run on a GPU machine: the CUDA tests, the 163M preflight and the
# training-step and generation benchmarks, then ONE table to paste into
# docs/performance.md (device, date, torch version, figures). Each step has a time limit,
# so the whole stays under 9 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh                  # from anywhere
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh   # no GPU: the same steps, shrunk, on the CPU
#
# Needs only a Python with torch >= 2.6 and the project's runtime packages (numpy, click,
# tqdm, safetensors, tiktoken, transformers, pytest, matplotlib for the loss chart): no uv,
# no network. The dataset is made up on the spot: random GPT-2 token ids in a temporary
# directory, as large as the 163M config's train.json asks (a sparse file, a few MB on
# disk). A step that fails doesn't stop the others; the table says which failed, the exit
# status is non-zero, and the logs are kept.
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Seconds each step may take: 500 in all, and a few more to make the dataset and the table.
TESTS_LIMIT=200
PREFLIGHT_LIMIT=50
TRAIN_STEP_LIMIT=180
GENERATE_LIMIT=40
HEALTH_LIMIT=30

fail() { echo "gpu_check.sh: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || fail "no Python interpreter '$PYTHON' (set PYTHON=/path/to/python)"
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = ["torch", "numpy", "click", "tqdm", "safetensors", "tiktoken", "transformers", "pytest",
          "matplotlib", "huggingface_hub"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)
[[ -z "$missing" ]] || fail "$PYTHON lacks the package(s): $missing (install them, e.g. $PYTHON -m pip install $missing)"

ON_CPU=0
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    [[ "${GPU_CHECK_ALLOW_CPU:-0}" == 1 ]] || fail "no CUDA GPU: torch.cuda.is_available() is false for $PYTHON (GPU_CHECK_ALLOW_CPU=1 runs the steps shrunk on the CPU)"
    ON_CPU=1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
echo "gpu_check.sh: working in $WORK"
failures=0
: >"$WORK/steps.tsv"

# run_step NAME LIMIT COMMAND...: runs one step with its output shown and logged to
# $WORK/NAME.log; records its exit status and seconds; never stops the script.
run_step() {
    local name=$1 limit=$2 status=0 start=$SECONDS
    shift 2
    echo
    echo "=== $name (at most ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" || status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$WORK/steps.tsv"
    if [[ $status != 0 ]]; then
        failures=$((failures + 1))
        echo "=== $name FAILED (exit status $status$([[ $status == 124 ]] && echo ": over ${limit}s"))"
    fi
}

# --- the 163M run with a made-up dataset of its size ---
"$PYTHON" - "$WORK" "$ON_CPU" <<'EOF'
import json, struct, sys
from pathlib import Path

import numpy as np

work, on_cpu = Path(sys.argv[1]), sys.argv[2] == "1"
source = Path("runs/163m-fineweb-edu")
model = json.loads((source / "model.json").read_text())
train = json.loads((source / "train.json").read_text())
dataset = work / "datasets" / "random-gpt2-tokens"
dataset.mkdir(parents=True)
# The config as it stands (uncompiled: an inductor compilation of the 163M model would take
# a minute of the budget; the training-step benchmark measures compiled); on a CPU, one
# sequence a micro-step.
train.update(dataset=str(dataset), **({"minibatch_size": 1} if on_cpu else {}))
run = work / "run-163m"
run.mkdir()
(run / "model.json").write_text(json.dumps(model, indent=2))
(run / "train.json").write_text(json.dumps(train, indent=2))


def write_tokens(path, count, random_count):
    """A safetensors file of `count` uint16 token ids: random ones first, zeros after. The
    zeros are a hole in a sparse file, so 3 billion tokens take megabytes of disk."""
    header = json.dumps({"tokens": {"dtype": "U16", "shape": [count], "data_offsets": [0, 2 * count]}})
    header = header.encode() + b" " * (-len(header) % 8)
    ids = np.random.default_rng(0).integers(0, model["vocab_size"], random_count, dtype=np.uint16)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)) + header + ids.tobytes())
        file.truncate(8 + len(header) + 2 * count)


slack = 1 << 20
write_tokens(dataset / "train.safetensors", train["min_train_tokens"] + slack, slack)
validation_tokens = (train["validation_batches"] * train["minibatch_size"] * model["context_length"])
write_tokens(dataset / "validation.safetensors", train["start_val_token"] + validation_tokens + slack,
             train["start_val_token"] + validation_tokens + 1)
print(f"gpu_check.sh: {run}: runs/163m-fineweb-edu with dataset {dataset} (random token ids)")
EOF

if [[ $ON_CPU == 1 ]]; then
    TRAIN_STEP_ARGS=(--batch 1 --repeats 1)
    GENERATE_ARGS=(--new-tokens 8 --batch-sizes 1)
    HEALTH_ARGS=(--emb-dim 256 --n-layers 4 --repeats 2)
    TESTS_LIMIT=60 PREFLIGHT_LIMIT=600 TRAIN_STEP_LIMIT=600 GENERATE_LIMIT=120 HEALTH_LIMIT=120
else
    # bf16 only: each precision compiles two more 163M graphs (ours and transformers'),
    # about a minute apiece; `bench/bench_train_step.py` alone runs fp32 as well.
    TRAIN_STEP_ARGS=(--batch 16 --repeats 10 --precisions bf16)
    GENERATE_ARGS=()
    HEALTH_ARGS=(--batch 16 --repeats 10)
fi

run_step tests "$TESTS_LIMIT" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_moe.py
run_step preflight "$PREFLIGHT_LIMIT" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    ddp_train.py "$WORK/run-163m" "$WORK/datasets" --preflight
run_step train_step "$TRAIN_STEP_LIMIT" "$PYTHON" bench/bench_train_step.py "${TRAIN_STEP_ARGS[@]}" \
    --json "$WORK/train_step.json"
run_step generate "$GENERATE_LIMIT" "$PYTHON" bench/bench_generate.py "${GENERATE_ARGS[@]}"
run_step health_check "$HEALTH_LIMIT" "$PYTHON" bench/bench_health_check.py "${HEALTH_ARGS[@]}"

# --- the table ---
echo
"$PYTHON" - "$WORK" <<'EOF'
import datetime, json, re, sys
from pathlib import Path

import torch
import transformers

work = Path(sys.argv[1])
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    steps[name] = (int(status), int(seconds))


def log(name):
    path = work / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def outcome(name):
    status, seconds = steps[name]
    if status == 0:
        return f"ok, {seconds} s"
    return f"**FAILED** ({'over its time limit' if status == 124 else f'exit status {status}'}), {seconds} s"


if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    device = (f"{props.name}, compute capability {props.major}.{props.minor}, "
              f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
else:
    device = "CPU (GPU_CHECK_ALLOW_CPU=1)"
rows = [("device", device),
        ("date", datetime.date.today().isoformat()),
        ("torch / transformers", f"{torch.__version__} / {transformers.__version__}")]

summary = [line for line in log("tests").splitlines() if re.search(r"\b(passed|failed|skipped|error)", line)]
rows.append(("`tests/test_cuda.py`, `tests/test_moe.py`", f"{summary[-1].strip('= ') if summary else 'no summary'}; {outcome('tests')}"))

# The preflight's report: from its first line naming tokens/s to the end, less torchrun's
# own log lines (W1202 12:00:00 ...), table columns joined by single spaces.
preflight = []
for line in log("preflight").splitlines():
    if preflight or "tokens/s" in line:
        if line.strip() and not re.match(r"^[WIE]\d{4} ", line):
            preflight.append(" ".join(line.split()))
train = json.loads((work / "run-163m" / "train.json").read_text())
rows.append((f"preflight, runs/163m-fineweb-edu ({'compiled' if train.get('compile') else 'uncompiled'}, "
             f"minibatch {train['minibatch_size']}), 1 process",
             "<br>".join(preflight) + f"; {outcome('preflight')}" if preflight else outcome("preflight")))

bench_path = work / "train_step.json"
if bench_path.exists():
    bench = json.loads(bench_path.read_text())
    for row in bench["rows"]:
        versus = "" if row["ours_faster_by"] is None else f", ours {row['ours_faster_by']:.2f}x faster"
        rows.append((f"training step, batch {bench['batch']} x {bench['context_length']}: {row['label']}",
                     f"{row['tokens_per_second']:,.0f} tokens/s, MFU {row['mfu']:.1%}{versus}"))
else:
    rows.append(("training step (`bench/bench_train_step.py`)", outcome("train_step")))

generation = re.findall(r"^\s*(\d+)\s+([\d,.]+)\s+([\d,.]+)\s+([\d.]+x)\s*$", log("generate"), re.MULTILINE)
for batch, recompute, cached, speedup in generation:
    rows.append((f"greedy generation, batch {batch} (`bench/bench_generate.py`)",
                 f"{cached} tokens/s with the KV cache, {recompute} recomputing, {speedup}"))
if not generation:
    rows.append(("greedy generation (`bench/bench_generate.py`)", outcome("generate")))

checked = re.search(r"^\s*checked\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s*$", log("health_check"), re.MULTILINE)
alone = re.search(r"the check alone: ([\d.]+) ms.*host waits in what the check adds: (.*)$", log("health_check"),
                  re.MULTILINE)
if checked and alone:
    rows.append(("non-finite-step check (`bench/bench_health_check.py`: " + log("health_check").splitlines()[0] + ")",
                 f"checked step {checked.group(3)}x the unchecked one; the check alone {alone.group(1)} ms; "
                 f"host waits: {alone.group(2)}"))
else:
    rows.append(("non-finite-step check (`bench/bench_health_check.py`)", outcome("health_check")))
rows.append(("all of bench/gpu_check.sh", f"{sum(seconds for _, seconds in steps.values())} s of steps"))

print("| what | measured |")
print("|---|---|")
for what, figure in rows:
    print(f"| {what} | {figure} |")
EOF

if [[ $failures != 0 ]]; then
    echo "gpu_check.sh: $failures step(s) failed; logs kept in $WORK" >&2
    exit 1
fi
rm -rf "$WORK"
