"""Data pipeline benchmarks, ours against the seed's method, side by side.

    uv run python bench/bench_data.py [--tokens 20] [--big-tokens 50] [--token-file-gb 1.1]

1. Preparing a corpus (parquet -> train/validation token files). The same parquet corpus
   (built offline by make_sample_corpus.py, at least --tokens million GPT-2 tokens) goes
   through
     - the seed's method: Hugging Face datasets' load_dataset("parquet") with the 99% split,
       encode_batch over 1000-row slices into Python lists, torch tensors, save_file;
     - prepare_datasets.py, with all cores and with one worker.
   Each runs as its own child process; we report wall time (interpreter start included),
   tokens/s, and peak RSS: of the largest single process (getrusage / wait4) and of the
   whole process tree (sampled from /proc every 50 ms, so Linux only). Both outputs are
   checked to hold the same tokens. With --big-tokens, prepare_datasets.py runs once more
   on a bigger corpus, to show that its memory does not grow with the corpus.

2. Opening a split for training. A token file of at least --token-file-gb GB; a child
   process opens it and reads 100 batches of 6 x 1024 tokens, either through token_data
   (one pread per batch) or as the seed did (safetensors load_file of the whole tensor).

Numbers depend on the machine and on what else runs on it; compare the ratios within
one run. Work files go to --work-dir (default: a directory in the system temp folder) and
are reused between runs.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

BATCH_SIZE, SEQ_LENGTH, BATCHES = 6, 1024, 100


# --- measuring a child process ---

# The command runs under this small launcher, not straight from the benchmark: Linux keeps
# the memory high-water mark of a process across exec, so a child forked from a big parent
# would report the parent's size. The launcher is small, and measures from the inside:
# wall time, ru_maxrss from wait4 (the largest single process of the command's tree, in
# KiB on Linux), and the whole tree's resident memory, sampled from /proc every 50 ms.
LAUNCHER = r"""
import json, os, subprocess, sys, time
from pathlib import Path

def tree_rss(pid):
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return total

started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
tree_peak = 0
while True:
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid:
        break
    tree_peak = max(tree_peak, tree_rss(process.pid))
    time.sleep(0.05)
seconds = time.perf_counter() - started
largest = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": seconds, "largest": largest, "tree": max(tree_peak, largest),
                  "exit": os.waitstatus_to_exitcode(status)}))
"""


def measure(command):
    """Run `command`; returns (seconds, largest-process peak RSS, process-tree peak RSS)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, command)], cwd=PROJECT,
                            env=environment, capture_output=True, text=True)
    if result.returncode != 0 or json.loads(result.stdout)["exit"] != 0:
        raise click.ClickException(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")
    outcome = json.loads(result.stdout)
    return outcome["seconds"], outcome["largest"], outcome["tree"], result.stderr


# --- what the children run ---

def seed_prepare(input_dir, output_dir, cache_dir):
    """The seed's prepare_datasets.py, step for step (tokenizer built offline, same encoding)."""
    import torch
    from datasets import load_dataset
    from safetensors.torch import save_file

    from support import tokenizer

    splits = load_dataset("parquet", data_files=f"{input_dir}/sample/10BT/*.parquet",
                          split={"train": "train[:99%]", "validation": "train[99%:]"},
                          cache_dir=str(cache_dir))
    encoding = tokenizer.get_tokenizer()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("validation", "train"):
        dataset = splits[name]
        results = []
        for start in range(0, len(dataset), 1000):
            texts = dataset[start:start + 1000]["text"]
            all_tokens = []
            for tokens in encoding.encode_batch(texts, allowed_special={"<|endoftext|>"}):
                all_tokens.extend(tokens)
                all_tokens.append(encoding.eot_token)
            results.append(torch.tensor(all_tokens, dtype=torch.uint16))
        save_file({"tokens": torch.cat(results)}, output_dir / f"{name}.safetensors")


def read_batches_ours(dataset_dir):
    from support import token_data

    batches = token_data.load_dataset(dataset_dir, "train", -1, 0, 1, BATCH_SIZE, SEQ_LENGTH)
    checksum = 0
    for index in range(BATCHES):
        x, y = batches[index * (len(batches) // BATCHES)]
        checksum += int(x.sum()) + int(y.sum())
    print(json.dumps({"checksum": checksum}))


def imports_only(dataset_dir):
    """What both readers import, and the same tensor work on batches of zeros: torch's
    first operations start thread pools and allocators, which is no cost of reading."""
    import safetensors.torch  # noqa: F401
    import torch

    from support import token_data  # noqa: F401
    x = torch.zeros(BATCH_SIZE, SEQ_LENGTH, dtype=torch.uint16)
    checksum = sum(int(x.to(torch.long).sum()) for _ in range(BATCHES))
    print(json.dumps({"checksum": checksum}))


def read_batches_eager(dataset_dir):
    """For scale: the whole file read into memory first, which is what load_file avoids."""
    import torch
    from safetensors.torch import load

    all_tokens = load((Path(dataset_dir) / "train.safetensors").read_bytes())["tokens"]
    global_batch = BATCH_SIZE * SEQ_LENGTH
    xs = all_tokens[:(len(all_tokens) - 1) // global_batch * global_batch].reshape(-1, BATCH_SIZE, SEQ_LENGTH)
    checksum = 0
    for index in range(BATCHES):
        position = index * (len(xs) // BATCHES)
        checksum += int(xs[position].to(torch.long).sum())
        checksum += int(all_tokens[position * global_batch + 1:(position + 1) * global_batch + 1].to(torch.long).sum())
    print(json.dumps({"checksum": checksum}))


def read_batches_seed(dataset_dir):
    import torch
    from safetensors.torch import load_file

    all_tokens = load_file(Path(dataset_dir) / "train.safetensors")["tokens"]
    global_batch = BATCH_SIZE * SEQ_LENGTH
    needed = (len(all_tokens) - 1) // global_batch * global_batch + 1
    all_tokens = all_tokens[:needed]
    xs = all_tokens[:-1].reshape(-1, BATCH_SIZE, SEQ_LENGTH)  # the seed's BigTrainDataset
    ys = all_tokens[1:].reshape(-1, BATCH_SIZE, SEQ_LENGTH)
    checksum = 0
    for index in range(BATCHES):
        position = index * (len(xs) // BATCHES)
        x, y = xs[position].to(torch.long), ys[position].to(torch.long)
        checksum += int(x.sum()) + int(y.sum())
    print(json.dumps({"checksum": checksum}))


# --- the benchmarks ---

def human_bytes(count):
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def print_table(headers, rows):
    # Not timing.print_table: that module imports torch, which this process keeps out.
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))
    print()


def corpus_of(work_dir, megabytes):
    corpus = work_dir / f"corpus-{megabytes}mb"
    if not (corpus / "sample" / "10BT").is_dir():
        print(f"building a {megabytes} MB parquet corpus in {corpus} ...", flush=True)
        subprocess.run([sys.executable, str(PROJECT / "make_sample_corpus.py"), str(corpus),
                        "--megabytes", str(megabytes), "--documents-per-file", "20000",
                        "--force"], check=True, stdout=subprocess.DEVNULL)
    return corpus


def split_tokens(dataset_dir, split):
    """The tokens of a split file, memory-mapped; read here without torch, to keep this process small."""
    import numpy as np

    path = Path(dataset_dir) / f"{split}.safetensors"
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))["tokens"]
    assert header["dtype"] == "U16"
    count = header["shape"][0]
    if count == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=8 + header_length + header["data_offsets"][0],
                     shape=(count,))


def token_count(dataset_dir):
    return sum(len(split_tokens(dataset_dir, split)) for split in ("train", "validation"))


def same_tokens(first_dir, second_dir):
    import numpy as np
    return all(np.array_equal(split_tokens(first_dir, split), split_tokens(second_dir, split))
               for split in ("train", "validation"))


def prepare_benchmark(work_dir, million_tokens, big_million_tokens, workers):
    # About 3.5 bytes of this text per GPT-2 token; a little extra so the floor is met.
    megabytes = int(million_tokens * 3.6) + 1
    corpus = corpus_of(work_dir, megabytes)
    seed_output, ours_output = work_dir / "seed-tokens", work_dir / "ours-tokens"
    cache = work_dir / "hf-datasets-cache"
    rows = []

    def run(label, command, output_dir):
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)  # the seed's method converts parquet to Arrow first
        print(f"running {label} ...", flush=True)
        seconds, largest, tree, _ = measure(command)
        tokens = token_count(output_dir)
        rows.append([label, f"{tokens / 1e6:.1f}M", f"{seconds:.1f}", f"{tokens / seconds:,.0f}",
                     human_bytes(largest), human_bytes(tree)])
        return tokens / seconds, tree

    seed_rate, seed_rss = run("seed method (datasets + lists)",
                              [sys.executable, __file__, "--child", "seed-prepare", str(corpus),
                               str(seed_output), str(cache)], seed_output)
    ours_rate, ours_rss = run(f"prepare_datasets.py, {workers} workers",
                              [sys.executable, "prepare_datasets.py", str(corpus), str(ours_output),
                               "--workers", str(workers)], ours_output)
    same = same_tokens(seed_output, ours_output)
    one_rate, one_rss = run("prepare_datasets.py, 1 worker",
                            [sys.executable, "prepare_datasets.py", str(corpus), str(ours_output),
                             "--workers", "1"], ours_output)
    if big_million_tokens:  # the same two again on a bigger corpus: whose memory grows?
        big_corpus = corpus_of(work_dir, int(big_million_tokens * 3.6) + 1)
        run("seed method, bigger corpus",
            [sys.executable, __file__, "--child", "seed-prepare", str(big_corpus),
             str(seed_output), str(cache)], seed_output)
        run(f"prepare_datasets.py, {workers} workers, bigger corpus",
            [sys.executable, "prepare_datasets.py", str(big_corpus), str(ours_output),
             "--workers", str(workers)], ours_output)
    print(f"Preparing a corpus: parquet -> uint16 token files ({os.cpu_count()} CPUs)")
    print_table(["method", "tokens", "seconds", "tokens/s", "peak RSS (largest process)",
                 "peak RSS (process tree)"], rows)
    print(f"ours ({workers} workers) vs seed: {ours_rate / seed_rate:.2f}x tokens/s, "
          f"{seed_rss / ours_rss:.1f}x less memory (process tree); "
          f"1 worker vs seed: {one_rate / seed_rate:.2f}x tokens/s, {seed_rss / one_rss:.1f}x less memory")
    print(f"identical tokens: {'yes' if same else 'NO'}\n")
    shutil.rmtree(cache, ignore_errors=True)


def write_token_file(path, gigabytes):
    """A train split of about `gigabytes` GB of uint16 tokens, written in chunks."""
    import numpy as np

    from support.token_files import TokenFileWriter

    count = int(gigabytes * 1e9) // 2
    if path.is_file() and path.stat().st_size >= count * 2:
        return
    print(f"writing a {gigabytes} GB token file {path} ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = TokenFileWriter(path)
    chunk = (np.arange(2**22, dtype=np.int64) % 50257).astype("<u2")
    for start in range(0, count, len(chunk)):
        writer.write(chunk[:min(len(chunk), count - start)])
    writer.finish()
    writer.commit()


def access_benchmark(work_dir, gigabytes):
    dataset_dir = work_dir / "big-split"
    write_token_file(dataset_dir / "train.safetensors", gigabytes)
    size = (dataset_dir / "train.safetensors").stat().st_size
    rows, results = [], {}
    for label, mode in (("baseline: the same imports and tensor work, nothing read", "imports-only"),
                        ("seed: load_file of the whole tensor", "read-seed"),
                        ("ours: token_data, one pread per batch", "read-ours"),
                        ("whole file read into memory first", "read-eager")):
        print(f"running {label} ...", flush=True)
        seconds, largest, tree, output = measure([sys.executable, __file__, "--child", mode,
                                                  str(dataset_dir)])
        results[mode] = (largest, json.loads(output.strip().splitlines()[-1])["checksum"])
        rows.append([label, f"{seconds:.1f}", human_bytes(largest)])
    print(f"Opening a {human_bytes(size)} split and reading {BATCHES} batches of "
          f"{BATCH_SIZE} x {SEQ_LENGTH} tokens (child process; time includes start-up)")
    print_table(["method", "seconds", "peak RSS"], rows)
    baseline = results["imports-only"][0]
    print(f"above the baseline: seed load_file {human_bytes(results['read-seed'][0] - baseline)}, "
          f"ours {human_bytes(results['read-ours'][0] - baseline)}, whole file read "
          f"{human_bytes(results['read-eager'][0] - baseline)}; same batches: "
          f"{'yes' if len({results[mode][1] for mode in ('read-seed', 'read-ours', 'read-eager')}) == 1 else 'NO'}")
    print("(safetensors' load_file memory-maps the file: the pages it reads are mapped into the "
          "process and count towards its RSS, until a whole epoch has touched them all; ours "
          "reads each batch with pread and maps none)\n")


@click.command()
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(tempfile.gettempdir()) / "bench-data", show_default=True)
@click.option("--tokens", "million_tokens", type=click.FloatRange(min=0.1), default=20.0,
              show_default=True, help="Corpus size for the side-by-side run, in million tokens.")
@click.option("--big-tokens", "big_million_tokens", type=click.FloatRange(min=0), default=50.0,
              show_default=True, help="Corpus for the memory-stays-flat run (0: skip).")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count(), show_default="all cores")
@click.option("--token-file-gb", type=click.FloatRange(min=0.01), default=1.1, show_default=True)
@click.option("--skip-prepare", is_flag=True)
@click.option("--skip-access", is_flag=True)
def main(work_dir, million_tokens, big_million_tokens, workers, token_file_gb, skip_prepare,
         skip_access):
    work_dir.mkdir(parents=True, exist_ok=True)
    if not skip_prepare:
        prepare_benchmark(work_dir, million_tokens, big_million_tokens, workers)
    if not skip_access:
        access_benchmark(work_dir, token_file_gb)


CHILDREN = {"seed-prepare": seed_prepare, "read-ours": read_batches_ours,
            "read-seed": read_batches_seed, "imports-only": imports_only,
            "read-eager": read_batches_eager}

if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # bench_data.py --child MODE PATH...: what children run
        CHILDREN[sys.argv[2]](*sys.argv[3:])
    else:
        main()
