"""Multi-node torchrun, proven on one machine: two launchers on 127.0.0.1 act as two nodes
of one process each, and must end with the weights of one launcher running two processes.

Each "node" has its own DATASETS_DIR and the dataset comes from the Hub stand-in, so each
node's local rank 0 has to download its own copy.
"""

import subprocess

import pytest
import torch

from helpers import (PROJECT_ROOT, TRAIN, environment, final_weights, free_port, latest, make_run,
                     run_training, torchrun_command, write_toy_dataset)
from servers.hub import HubServer

REPO = "toy-owner/toy-tokens"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_toy_dataset(root / "datasets" / REPO)
    with HubServer(root) as server:
        yield server


def hub_env(hub, home):
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="module")
def one_launcher(tmp_path_factory, hub):
    root = tmp_path_factory.mktemp("single")
    run_dir = make_run(root / "run", train={**TRAIN, "dataset": REPO})
    result = run_training(run_dir, root / "datasets", env=hub_env(hub, root / "hf-home"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def two_launchers(tmp_path, hub, rendezvous):
    """Start two torchrun launchers ("nodes") at once, each with one process and its own
    DATASETS_DIR; return the run directory (shared, as on a network file system)."""
    run_dir = make_run(tmp_path / "run", train={**TRAIN, "dataset": REPO})
    port = free_port()
    launchers = []
    for node in range(2):
        if rendezvous == "static":
            options = ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                       "--master_addr=127.0.0.1", f"--master_port={port}"]
        else:
            options = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=multinode-test"]
        command = torchrun_command(options, run_dir, tmp_path / f"node{node}-datasets")
        launchers.append(subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environment(hub_env(hub, tmp_path / f"node{node}-hf-home"))))
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=300))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for launcher, (_, stderr) in zip(launchers, outputs):
        assert launcher.returncode == 0, stderr[-3000:]
    return run_dir, outputs


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_equal_one_node_with_two_processes(rendezvous, tmp_path, hub, one_launcher):
    downloads_before = hub.downloads_of("train.safetensors")
    run_dir, outputs = two_launchers(tmp_path, hub, rendezvous)

    # Each node's local rank 0 fetched the dataset into that node's DATASETS_DIR.
    for node in range(2):
        copy = tmp_path / f"node{node}-datasets" / REPO / "train.safetensors"
        assert copy.read_bytes() == (one_launcher.parent / "datasets" / REPO / "train.safetensors").read_bytes()
    assert hub.downloads_of("train.safetensors") - downloads_before == 2

    # Global rank 0 alone reported and wrote checkpoints; the weights are bit for bit
    # those of one launcher with the same world size.
    assert "Training finished" in outputs[0][0] or "Training finished" in outputs[1][0]
    assert latest(run_dir).meta["world_size"] == 2
    assert latest(run_dir).meta["history"] == latest(one_launcher).meta["history"]
    expected = final_weights(one_launcher)
    actual = final_weights(run_dir)
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key
