"""token_data.py: memory-mapped splits, the seed's batch arithmetic, and Hub-or-local datasets."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from servers.hub import HubServer
from support.token_data import DatasetError, load_dataset, open_tokens, resolve_dataset_dir, split_path

PROJECT = Path(__file__).resolve().parent.parent


def write_split(directory, split, tokens, name="tokens"):
    """A split as the seed's prepare_datasets.py wrote it: safetensors' save_file."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: tokens}, directory / f"{split}.safetensors")
    return directory / f"{split}.safetensors"


def seed_layout(tokens, start, needed, batch_size, seq_length):
    """The seed's BigTrainDataset: tokens[:-1] and tokens[1:] reshaped to (-1, B, T)."""
    taken = tokens[start:start + needed]
    return (taken[:-1].reshape(-1, batch_size, seq_length),
            taken[1:].reshape(-1, batch_size, seq_length))


@pytest.fixture
def dataset(tmp_path):
    tokens = torch.arange(1000, dtype=torch.int64).to(torch.uint16)
    write_split(tmp_path, "train", tokens)
    return tmp_path, tokens.to(torch.int64)


@pytest.mark.parametrize("world_size, minibatch_size, seq_length, start", [
    (1, 2, 8, 0), (2, 3, 5, 7), (4, 1, 16, 100), (3, 2, 11, 999 - 3 * 2 * 11 * 15),
])
def test_all_tokens_gives_whole_global_batches_in_the_seeds_layout(dataset, world_size,
                                                                   minibatch_size, seq_length, start):
    directory, tokens = dataset
    global_batch = world_size * minibatch_size * seq_length
    batches = load_dataset(directory, "train", -1, start, world_size, minibatch_size, seq_length)
    # As many whole global batches as fit after `start`, keeping one token for the last target.
    expected_global_batches = (1000 - start - 1) // global_batch
    assert len(batches) == expected_global_batches * world_size
    xs, ys = seed_layout(tokens, start, expected_global_batches * global_batch + 1,
                         minibatch_size, seq_length)
    for index in range(len(batches)):
        x, y = batches[index]
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (minibatch_size, seq_length)
        assert torch.equal(x, xs[index]) and torch.equal(y, ys[index])
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_all_tokens_when_the_split_is_an_exact_multiple_keeps_the_extra_token(tmp_path):
    # 960 tokens = 10 global batches of 96 exactly: the tenth has no target for its last
    # token, so 9 are used (the seed's arithmetic asked for 961 and stopped with an error).
    write_split(tmp_path, "train", torch.arange(960, dtype=torch.int32))
    assert len(load_dataset(tmp_path, "train", -1, 0, 2, 3, 16)) == 9 * 2
    assert len(load_dataset(tmp_path, "train", -1, 0, 2, 3, 16).tokens) == 9 * 96 + 1


@pytest.mark.parametrize("min_tokens, global_batches", [(1, 1), (95, 1), (96, 1), (97, 2), (500, 6)])
def test_min_tokens_rounds_up_to_whole_global_batches_plus_one_token(dataset, min_tokens,
                                                                     global_batches):
    directory, tokens = dataset
    batches = load_dataset(directory, "train", min_tokens, 3, 2, 3, 16)  # 96 tokens a global batch
    assert len(batches) == global_batches * 2
    assert len(batches.tokens) == global_batches * 96 + 1
    xs, ys = seed_layout(tokens, 3, global_batches * 96 + 1, 3, 16)
    assert torch.equal(batches[len(batches) - 1][1], ys[-1])


def test_too_few_tokens_and_bad_starts_say_what_is_wanted_and_available(dataset):
    directory, _ = dataset
    path = split_path(directory, "train")
    with pytest.raises(DatasetError) as error:
        load_dataset(directory, "train", 960, 50, 2, 3, 16)
    assert error.value.message == (
        f"{path}: not enough tokens: 961 wanted from token 50 (20 batch(es) of 3 sequences x 16 "
        f"tokens, plus one), 950 available")
    with pytest.raises(DatasetError) as error:
        load_dataset(directory, "train", -1, 950, 2, 3, 16)
    assert "not enough tokens: 97 wanted from token 950" in error.value.message
    with pytest.raises(DatasetError) as error:
        load_dataset(directory, "train", -1, 1000, 1, 1, 8)
    assert error.value.message == f"{path}: start token 1,000 is past the end of the split (1,000 tokens)"
    with pytest.raises(DatasetError, match="start token -1 is negative"):
        load_dataset(directory, "train", -1, -1, 1, 1, 8)
    with pytest.raises(DatasetError, match="validation.safetensors: file not found"):
        load_dataset(directory, "validation", -1, 0, 1, 1, 8)


def test_tokens_are_memory_mapped_in_any_integer_dtype(tmp_path):
    for dtype in (torch.uint16, torch.int32, torch.int64):
        path = write_split(tmp_path / str(dtype), "train", torch.tensor([50256, 1, 2, 65535]).to(dtype))
        tokens = open_tokens(path)
        assert isinstance(tokens, np.memmap)
        assert tokens.tolist() == [50256, 1, 2, 65535]


def test_malformed_files_are_refused_with_the_reason(tmp_path):
    cases = {
        "float": lambda path: save_file({"tokens": torch.zeros(4)}, path),
        "name": lambda path: save_file({"ids": torch.zeros(4, dtype=torch.int32)}, path),
        "two": lambda path: save_file({"tokens": torch.zeros(4, dtype=torch.int32),
                                       "more": torch.zeros(1, dtype=torch.int32)}, path),
        "matrix": lambda path: save_file({"tokens": torch.zeros(2, 2, dtype=torch.int32)}, path),
        "garbage": lambda path: path.write_bytes(b"\xff" * 64),
        "short": lambda path: path.write_bytes(b"\x01\x02"),
    }
    for name, write in cases.items():
        write(tmp_path / f"{name}.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    save_file({"tokens": torch.arange(100, dtype=torch.int32)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-10])

    def reason(name):
        with pytest.raises(DatasetError) as error:
            open_tokens(tmp_path / f"{name}.safetensors")
        assert error.value.message.startswith(f"{tmp_path / name}.safetensors: ")
        return error.value.message.split(".safetensors: ", 1)[1]

    assert reason("float") == "tensor 'tokens' has dtype F32; token ids must be one of U16, I32, U32, I64"
    assert reason("name") == "expected exactly one tensor named 'tokens', found ['ids']"
    assert reason("two").startswith("expected exactly one tensor named 'tokens', found")
    assert reason("matrix") == "tensor 'tokens' has shape [2, 2]; expected 1-D"
    assert reason("garbage") == "not a safetensors file"
    assert reason("short") == "not a safetensors file"
    assert reason("truncated") == "tensor 'tokens' claims 100 tokens, but the file holds 97: truncated or corrupt"
    assert reason("missing") == "file not found"


def test_local_directories_are_used_as_they_are(tmp_path):
    write_split(tmp_path / "datasets" / "my-tokens", "train", torch.arange(10, dtype=torch.int32))
    assert resolve_dataset_dir("my-tokens", tmp_path / "datasets") == tmp_path / "datasets" / "my-tokens"
    absolute = tmp_path / "elsewhere"
    absolute.mkdir()
    assert resolve_dataset_dir(str(absolute), tmp_path / "datasets") == absolute
    with pytest.raises(DatasetError, match="dataset directory .*/nowhere does not exist$"):
        resolve_dataset_dir(str(tmp_path / "nowhere"), tmp_path / "datasets")
    with pytest.raises(DatasetError) as error:
        resolve_dataset_dir("not-here", tmp_path / "datasets")
    assert error.value.message == (
        f"dataset directory {tmp_path / 'datasets' / 'not-here'} does not exist (and 'not-here' "
        f"is not a Hugging Face repo id of the form owner/name)")


# resolve_dataset_dir against the Hub stand-in. huggingface_hub reads HF_ENDPOINT when it
# is imported, so each scenario runs in a fresh process, as ddp_train.py would.
RESOLVE = """
import json, os, sys, urllib.request, warnings
sys.path.insert(0, {project!r})
from support import token_data
for index, (dataset, datasets_dir, splits) in enumerate(json.loads(sys.argv[1])):
    try:  # a marker in the server's request log, to tell which call made which requests
        urllib.request.urlopen(os.environ["HF_ENDPOINT"] + f"/__marker__/{{index}}")
    except Exception:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = {{"path": str(token_data.resolve_dataset_dir(dataset, datasets_dir, tuple(splits)))}}
        except token_data.DatasetError as error:
            outcome = {{"error": error.message}}
    outcome["warnings"] = [str(warning.message) for warning in caught]
    print(json.dumps(outcome))
"""


def resolve_in_subprocess(endpoint, home, calls, token="hub-token"):
    environment = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_TOKEN=token,
                       HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                       OMP_NUM_THREADS="1")
    environment.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", RESOLVE.format(project=str(PROJECT)),
                             json.dumps([[d, str(root), list(s)] for d, root, s in calls])],
                            env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def requests_between_markers(hub):
    """The server's request log, cut into one list per call of the subprocess."""
    calls = []
    for method, path in hub.requests:
        if path.startswith("/__marker__/"):
            calls.append([])
        elif calls:
            calls[-1].append((method, path))
    return calls


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_hub_datasets_are_downloaded_once_and_used_offline(tmp_path):
    hub_root = tmp_path / "hub"
    repo = hub_root / "datasets" / "gpjt" / "tiny-tokens"
    train = write_split(repo, "train", torch.arange(5000, dtype=torch.int32).to(torch.uint16))
    validation = write_split(repo, "validation", torch.arange(300, dtype=torch.int32).to(torch.uint16))
    (repo / "README.md").write_text("not needed for training")
    write_split(hub_root / "datasets" / "gpjt" / "train-only", "train", torch.arange(5, dtype=torch.int32))
    datasets = tmp_path / "datasets"
    # Made by prepare_datasets.py and named like a repo id, but never on the Hub.
    write_split(datasets / "someone" / "local-tokens", "train", torch.arange(9, dtype=torch.int32))
    write_split(datasets / "someone" / "local-tokens", "validation", torch.arange(9, dtype=torch.int32))

    with HubServer(hub_root, token="hub-token") as hub:
        outcomes = resolve_in_subprocess(hub.url, tmp_path / "hf-home", [
            ("gpjt/tiny-tokens", datasets, ("train", "validation")),
            ("gpjt/tiny-tokens", datasets, ("train", "validation")),
            ("gpjt/tiny-tokens", tmp_path / "eval-only", ("validation",)),
            ("someone/local-tokens", datasets, ("train", "validation")),
            ("nobody/missing", datasets, ("train", "validation")),
            ("gpjt/train-only", datasets, ("train", "validation")),
        ])
        log = requests_between_markers(hub)
        assert {authorization for (_, path), authorization in zip(hub.requests, hub.authorizations)
                if not path.startswith("/__marker__/")} == {"Bearer hub-token"}

    downloaded = datasets / "gpjt" / "tiny-tokens"
    assert outcomes[0] == {"path": str(downloaded), "warnings": []}
    assert (downloaded / "train.safetensors").read_bytes() == train.read_bytes()
    assert (downloaded / "validation.safetensors").read_bytes() == validation.read_bytes()
    assert not (downloaded / "README.md").exists()  # only the split files
    fetched = [path.rsplit("/", 1)[1] for method, path in log[0] if method == "GET" and "/resolve/" in path]
    assert sorted(fetched) == ["train.safetensors", "validation.safetensors"]

    # Called again: the files are current, so nothing is downloaded a second time.
    assert outcomes[1] == {"path": str(downloaded), "warnings": []}
    assert not [path for method, path in log[1] if method == "GET" and "/resolve/" in path]

    assert outcomes[2]["path"] == str(tmp_path / "eval-only" / "gpjt" / "tiny-tokens")
    assert sorted(path.name for path in Path(outcomes[2]["path"]).glob("*.safetensors")) == [
        "validation.safetensors"]

    assert outcomes[3] == {"path": str(datasets / "someone" / "local-tokens"), "warnings": []}
    assert log[3] == []  # a local directory: the Hub is not asked

    assert outcomes[4]["error"].startswith(
        f"could not download dataset nobody/missing into {datasets / 'nobody' / 'missing'}: "
        f"RepositoryNotFoundError: ")
    assert outcomes[5]["error"] == "dataset gpjt/train-only on the Hugging Face Hub has no validation.safetensors"

    # The Hub out of reach: files already downloaded are used, with a warning.
    offline = resolve_in_subprocess(f"http://127.0.0.1:{closed_port()}", tmp_path / "hf-home", [
        ("gpjt/tiny-tokens", datasets, ("train", "validation")),
        ("gpjt/never-fetched", datasets, ("train", "validation")),
    ])
    assert offline[0]["path"] == str(downloaded)
    assert offline[0]["warnings"] == [
        f"could not update dataset gpjt/tiny-tokens from the Hugging Face Hub (ConnectError: "
        f"[Errno 111] Connection refused); using the files already in {downloaded}"]
    assert offline[1]["error"] == (
        f"could not download dataset gpjt/never-fetched into {datasets / 'gpjt' / 'never-fetched'}: "
        f"ConnectError: [Errno 111] Connection refused")

    batches = load_dataset(downloaded, "validation", -1, 0, 1, 2, 8)
    assert len(batches) == 299 // 16 and batches[0][0][0, :3].tolist() == [0, 1, 2]


def file_backed_resident_kib():
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssFile:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_reading_batches_does_not_grow_resident_memory(tmp_path):
    # 32 MB of tokens; 300 batches spread over all of it. Through the memory map each
    # batch would map its pages (and the kernel's fault-around neighbours) into this
    # process: megabytes of RSS. Positioned reads map nothing.
    tokens = torch.arange(16 * 2**20, dtype=torch.int64).remainder(50257).to(torch.uint16)
    write_split(tmp_path, "train", tokens)
    batches = load_dataset(tmp_path, "train", -1, 5, 1, 4, 64)
    stride = len(batches) // 300
    before = file_backed_resident_kib()
    for index in range(0, len(batches), stride):
        x, y = batches[index]
        start = 5 + index * 256
        assert torch.equal(x.flatten(), tokens[start:start + 256].long())
        assert torch.equal(y.flatten(), tokens[start + 1:start + 257].long())
    assert file_backed_resident_kib() - before < 1024


def test_a_split_truncated_after_opening_is_one_line_not_a_crash(tmp_path):
    path = write_split(tmp_path, "train", torch.arange(1000, dtype=torch.int32))
    batches = load_dataset(tmp_path, "train", -1, 0, 1, 2, 8)
    assert batches[len(batches) - 1][0].numel() == 16
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size - 400 * 4)  # as a download or copy still in progress
    with pytest.raises(DatasetError, match=r"batch 61 is past the end of the file"):
        batches[61]
    assert batches[0][0].flatten().tolist() == list(range(16))
