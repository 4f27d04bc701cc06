"""What the tests share: running a script as a user runs it (run_script, run_training), a toy
token dataset, tiny run directories and checkpoints, free ports, and checks of a run's output."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpt import GPTModel
from support import checkpointing

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT_ROOT / "ddp_train.py"

# The line test_smoke.py prints between the prompt and the continuation.
SMOKE_SEPARATOR = "--- generated ---"

MODEL = {"vocab_size": 64, "emb_dim": 32, "context_length": 16, "n_heads": 2, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": False}
# 2 ranks x 2 sequences x 16 tokens = 64 tokens a global step: 256 tokens make 4 steps,
# checkpoints at steps 0, 2 and 3. 3 validation batches on 2 ranks: one rank has a spare
# round, which FSDP must still run in step with the other.
TRAIN = {"dataset": "toy", "min_train_tokens": 256, "start_train_token": 0, "start_val_token": 0,
         "minibatch_size": 2, "validation_interval": 2, "validation_batches": 3,
         "learning_rate": 0.01, "warmup_steps": 1, "lr_schedule": "cosine", "min_learning_rate": 0.001,
         "grad_clip": 0.5, "dtype": "fp32", "seed": 7}


def pattern_tokens(count, seed):
    """Token ids below 64 with structure to learn: a repeating ramp, 20% noise."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.arange(count) % 61
    noise = torch.randint(0, 64, (count,), generator=generator)
    return torch.where(torch.rand(count, generator=generator) < 0.2, noise, ramp).to(torch.uint16)


def write_toy_dataset(directory):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": pattern_tokens(4096, 0)}, str(directory / "train.safetensors"))
    save_file({"tokens": pattern_tokens(1024, 1)}, str(directory / "validation.safetensors"))
    return directory


def make_run(path, model=None, train=None):
    path = Path(path)
    path.mkdir(parents=True)
    (path / "model.json").write_text(json.dumps(model or MODEL))
    (path / "train.json").write_text(json.dumps(train or TRAIN))
    return path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(launcher_options, run_dir, datasets_dir, *arguments):
    return ([sys.executable, "-m", "torch.distributed.run", *launcher_options, str(SCRIPT),
             str(run_dir), str(datasets_dir), *arguments, "--device", "cpu"])


def environment(extra=None):
    """The tests' environment for a script: one thread per process (two pytest workers share
    two cores, and torchrun's ranks share them again), plus `extra`, where a variable given
    as None is left out."""
    merged = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    return {name: value for name, value in merged.items() if value is not None}


def run_script(script, *arguments, cwd=PROJECT_ROOT, env=None, timeout=300, **options):
    """A top-level script run as a user runs it, `python SCRIPT ARGUMENTS...`, in a
    subprocess with its output captured as text: the one way the tests run scripts (they
    import only the support package and gpt.py). `options` go to subprocess.run (input=...)."""
    return subprocess.run([sys.executable, str(PROJECT_ROOT / script), *map(str, arguments)],
                          cwd=cwd, env=environment(env), capture_output=True, text=True, timeout=timeout,
                          **options)


def start_script(script, *arguments, cwd=PROJECT_ROOT, env=None, **options):
    """run_script's process started and left running (subprocess.Popen, text mode): for a
    test that signals it or watches it. `options` go to Popen (stdout=..., stderr=...)."""
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / script), *map(str, arguments)],
                            cwd=cwd, env=environment(env), text=True, **options)


def run_training(run_dir, datasets_dir, *arguments, nproc=2, env=None, torchrun_options=()):
    """ddp_train.py under a single-node torchrun with nproc processes (and torchrun_options,
    e.g. --max-restarts=2), or as one plain `python ddp_train.py` process when nproc is None."""
    if nproc:
        command = torchrun_command(["--standalone", f"--nproc_per_node={nproc}", *torchrun_options], run_dir,
                                   datasets_dir, *arguments)
    else:
        return run_script(SCRIPT.name, run_dir, datasets_dir, *arguments, "--device", "cpu", env=env)
    return subprocess.run(command, capture_output=True, text=True, env=environment(env),
                          cwd=PROJECT_ROOT, timeout=300)


def trained(run_dir, datasets_dir, *arguments):
    """run_training that must succeed; returns run_dir."""
    result = run_training(run_dir, datasets_dir, *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def write_tiny_checkpoint(directory, config, seed=0):
    """model.json + model.safetensors of a freshly initialised GPTModel; returns the model."""
    torch.manual_seed(seed)
    model = GPTModel(config)
    (Path(directory) / "model.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(Path(directory) / "model.safetensors"))
    return model.eval()


def write_original_checkpoint(checkpoints_dir, step, meta, *, model_config=None, written_at="20250101Z000000",
                              scaler=None, model=None):
    """A checkpoint as the original scripts (bf269c6) wrote it: model.safetensors without
    metadata, optimizer.pt, scaler.pt and meta.json, no RNG states; `latest` and `best`
    pointed at it as they did (unlink, then symlink). meta is meta.json's content (their
    train_loss, val_loss, is_best; global_step is added); the model is a fresh one after an
    AdamW step on random tokens (seeded by step) unless given. Returns the directory."""
    config = model_config or MODEL
    if model is None:
        torch.manual_seed(step)
        model = GPTModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    model(torch.randint(0, config["vocab_size"], (2, config["context_length"]))).sum().backward()
    optimizer.step()
    name = f"{written_at}-iteration-{step}"
    checkpoints_dir = Path(checkpoints_dir)
    path = checkpoints_dir / name
    path.mkdir(parents=True)
    save_file(model.state_dict(), str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save((scaler or torch.amp.GradScaler("cpu")).state_dict(), path / "scaler.pt")
    meta = {**meta, "global_step": step}
    (path / "meta.json").write_text(json.dumps(meta))
    for link in ("latest",) + (("best",) if meta.get("is_best") else ()):
        if os.path.lexists(checkpoints_dir / link):
            os.unlink(checkpoints_dir / link)
        os.symlink(name, checkpoints_dir / link)
    return path


def assert_close_weights(actual, expected, atol):
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=atol, msg=key)


def one_line_error(result, *fragments, exit_code=1):
    """A user mistake: the given exit code, one line on stderr holding every fragment."""
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def latest(run_dir):
    return checkpointing.link_target(Path(run_dir) / "checkpoints", "latest")


def final_weights(run_dir):
    return load_file(str(latest(run_dir).path / checkpointing.MODEL_FILE))


def copy_run_up_to(source_run, destination, step, train=None):
    """A copy of a finished run whose checkpoints stop at `step` (as if it had stopped
    there), with `latest` and `best` pointing where they pointed then; `train` replaces
    its train.json."""
    import shutil
    destination = Path(destination)
    shutil.copytree(source_run, destination, symlinks=True)
    if train is not None:
        (destination / "train.json").write_text(json.dumps(train))
    checkpoints_dir = destination / "checkpoints"
    kept = []
    for checkpoint in checkpointing.list_checkpoints(checkpoints_dir):
        if checkpoint.global_step > step:
            shutil.rmtree(checkpoint.path)
        else:
            kept.append(checkpoint)
    checkpointing.point_link(checkpoints_dir, "latest", kept[-1].name)
    checkpointing.point_link(checkpoints_dir, "best", min(kept, key=lambda c: c.meta["val_loss"]).name)
    return destination


# What two runs of the same config log alike: everything but the clock, the memory and
# the checkpoints' time-stamped names.
RUN_DEPENDENT_KEYS = ("tokens_per_second", "mfu", "elapsed_seconds", "cpu_rss_bytes",
                      "cuda_max_allocated_bytes", "checkpoint")


def metrics_rows(run_dir, comparable=False):
    """metrics.jsonl's rows, every line a valid row; with comparable=True, without the
    keys that differ between two runs of one config."""
    from support.metrics import METRICS_FILE, read_metrics

    rows, bad_lines = read_metrics(Path(run_dir) / METRICS_FILE)
    assert not bad_lines
    if comparable:
        rows = [{key: value for key, value in row.items() if key not in RUN_DEPENDENT_KEYS} for row in rows]
    return rows

