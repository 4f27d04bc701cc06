"""What goes wrong with checkpoints on real disks and real files (issue 15): a full disk
at a save, corrupt or truncated .pt files, garbage meta.json under `latest` or `best`,
and weights loaded against a model.json they were not written for."""

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from support import checkpointing

from support import run_history

from support import weights as weight_files
from support.checkpointing import CheckpointError
from helpers import one_line_error, run_script
from test_checkpointing import MODEL_CONFIG, checkpoint_states, save

MB = 1_000_000


# --- a full disk ---

def big_states():
    """A checkpoint of about 3.1 MB: 1 MiB of weights, 2 MiB of AdamW moments."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(256 * 1024, generator=generator)
    return {"model_state": {"w": weights},
            "optimizer_state": {"state": {0: {"step": torch.tensor(1.0),
                                              "exp_avg": torch.randn(256 * 1024, generator=generator),
                                              "exp_avg_sq": torch.rand(256 * 1024, generator=generator)}},
                                "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "scaler_state": {}, "rng_state": {"world_size": 1, "cpu": [torch.Generator().get_state()]}}


def checkpoint_bytes(path):
    return sum(file.stat().st_size for file in Path(path).iterdir())


@contextlib.contextmanager
def small_filesystem(directory, size):
    """A tmpfs of `size` mounted at directory (root only); skips the test where mounting
    is not permitted. Always unmounted again."""
    directory = Path(directory)
    directory.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux; the injected-ENOSPC tests cover this")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "the injected-ENOSPC tests cover this")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=True)


def fill_leaving(directory, free_bytes):
    """A file that leaves about free_bytes free on directory's file system."""
    filler = Path(directory) / "filler"
    with open(filler, "wb") as file:
        file.write(b"\0" * max(0, shutil.disk_usage(directory).free - free_bytes))
    return filler


def snapshot(checkpoints_dir):
    """Everything a failed save must leave as it was: every entry, link targets, file bytes."""
    state = {}
    for entry in sorted(Path(checkpoints_dir).iterdir()):
        if entry.is_symlink():
            state[entry.name] = ("link", os.readlink(entry))
        elif entry.is_dir():
            state[entry.name] = {file.name: file.read_bytes() for file in sorted(entry.iterdir())}
        else:
            state[entry.name] = ("file", entry.stat().st_size)
    return state


NO_SPACE = re.compile(r"^(?P<dir>\S+): no space left on device for checkpoint "
                      r"(?P<name>\d{8}Z\d{6}-iteration-1) of step 1 "
                      r"\(needs about (?P<needs>[\d.]+) MB, (?P<free>[\d.]+ (bytes|kB|MB|GB|TB)) free\)$")


def as_bytes(text):
    number, unit = text.split()
    return float(number) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def record_failures(monkeypatch, failures):
    """Note which writer raised what, passing every error on."""
    def spying(function, label):
        def call(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                failures.append((label, type(error).__name__))
                raise
        return call
    monkeypatch.setattr(checkpointing, "save_file", spying(checkpointing.save_file, "safetensors"))
    monkeypatch.setattr(checkpointing, "_torch_save", spying(checkpointing._torch_save, "torch.save"))


@pytest.mark.parametrize("free_at_second_save, failure", [
    (None, ("safetensors", "SafetensorError")),   # the disk as the first checkpoint left it
    (1_600_000, ("torch.save", "RuntimeError")),  # the weights fit, AdamW's moments don't:
])                                                # torch's zip writer says "unexpected pos"
def test_a_full_disk_at_the_second_checkpoint(tmp_path, monkeypatch, free_at_second_save, failure):
    size = "4m" if free_at_second_save is None else "8m"
    failures = []
    record_failures(monkeypatch, failures)
    with small_filesystem(tmp_path / "disk", size) as disk:
        checkpoints_dir = disk / "checkpoints"
        states = big_states()
        first = save(checkpoints_dir, 0, 5.0, is_best=True, states=states)
        first_size = checkpoint_bytes(first.path)
        assert 3 * MB < first_size < 3.3 * MB
        filler = fill_leaving(disk, free_at_second_save) if free_at_second_save else None
        before = snapshot(checkpoints_dir)
        free_before = shutil.disk_usage(disk).free
        assert free_before < first_size
        assert checkpointing.low_space_warning(checkpoints_dir) is not None

        with pytest.raises(CheckpointError) as raised:
            save(checkpoints_dir, 1, 4.0, is_best=True, states=states)

        assert failures == [failure]
        message = raised.value.format_message()
        match = NO_SPACE.match(message)
        assert match, message
        assert "enforce fail" not in message and "\n" not in message
        assert match["dir"] == str(checkpoints_dir)
        assert abs(float(match["needs"]) * MB - first_size) < 0.1 * MB    # the checkpoint's size
        # What is free once the partial directory is gone: what the next try would have.
        assert abs(as_bytes(match["free"]) - shutil.disk_usage(disk).free) < 0.01 * MB + 0.05 * free_before
        # Nothing half-written stays behind holding the disk; the old checkpoint, best and
        # latest are exactly as they were.
        assert snapshot(checkpoints_dir) == before
        assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))
        assert shutil.disk_usage(disk).free >= free_before - 4096
        assert checkpointing.link_target(checkpoints_dir, "latest").name == first.name
        assert checkpointing.link_target(checkpoints_dir, "best").name == first.name

        # Space freed: the next save goes through.
        if filler is not None:
            filler.unlink()
        else:
            shutil.rmtree(first.path)
        again = save(checkpoints_dir, 1, 4.0, is_best=True, states=states)
        assert checkpointing.link_target(checkpoints_dir, "latest").name == again.name


class FullDisk:
    """Writes through checkpointing fail with ENOSPC once `budget` bytes are written, at
    the write call (torch's zip writer and json.dump write through it), as on a disk
    with that much space free. Runs on any system."""

    def __init__(self, budget):
        self.left = budget
        self.failed_at = None

    def open(self, path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return self._Limited(file, self, Path(path).name) if "w" in mode else file

    class _Limited:
        def __init__(self, file, disk, name):
            self._file, self._disk, self._name = file, disk, name

        def write(self, data):
            size = len(data.encode() if isinstance(data, str) else memoryview(data).cast("B"))
            if size > self._disk.left:
                room = self._disk.left
                self._file.write(data[:room] if isinstance(data, str)
                                 else memoryview(data).cast("B")[:room].tobytes())
                self._disk.left = 0
                self._disk.failed_at = self._disk.failed_at or self._name
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._disk.left -= size
            return self._file.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self._file.close()

        def __getattr__(self, name):
            return getattr(self._file, name)

    def save_file(self, tensors, filename, metadata=None):
        """safetensors writes from Rust: write the real file, then fail as it fails."""
        save_file(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        if size > self.left:
            os.truncate(filename, self.left)
            self.left = 0
            self.failed_at = self.failed_at or Path(filename).name
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        self.left -= size


WRITE_ORDER = ("model.safetensors", "optimizer.pt", "scaler.pt", "rng_state.pt", "meta.json")


@pytest.mark.parametrize("failing_file", WRITE_ORDER)
def test_an_injected_enospc_at_any_write_is_one_line(tmp_path, monkeypatch, failing_file):
    """safetensors' error has the errno only in its text; torch's zip writer raises
    "unexpected pos" with the OSError as its context; json.dump the OSError itself."""
    checkpoints_dir = tmp_path / "checkpoints"
    states = big_states()
    first = save(checkpoints_dir, 0, 5.0, is_best=True, states=states)
    before = snapshot(checkpoints_dir)
    # Room for the files written before failing_file and half of it.
    sizes = [(first.path / name).stat().st_size for name in WRITE_ORDER]
    position = WRITE_ORDER.index(failing_file)
    disk = FullDisk(sum(sizes[:position]) + sizes[position] // 2)
    monkeypatch.setattr(checkpointing, "open", disk.open, raising=False)
    monkeypatch.setattr(checkpointing, "save_file", disk.save_file)

    with pytest.raises(CheckpointError) as raised:
        save(checkpoints_dir, 1, 4.0, is_best=False, states=states)

    assert disk.failed_at == failing_file
    message = raised.value.format_message()
    match = NO_SPACE.match(message)
    assert match, message
    assert match["dir"] == str(checkpoints_dir)
    assert abs(float(match["needs"]) * MB - checkpoint_bytes(first.path)) < 0.1 * MB
    assert snapshot(checkpoints_dir) == before
    assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))


def test_enospc_while_moving_latest_takes_the_new_checkpoint_back(tmp_path, monkeypatch):
    checkpoints_dir = tmp_path / "checkpoints"
    states = big_states()
    save(checkpoints_dir, 0, 5.0, is_best=True, states=states)
    before = snapshot(checkpoints_dir)
    real_point_link = checkpointing.point_link

    def point_link(directory, link_name, target_name):
        temporary = directory / f".{link_name}.{os.getpid()}.tmp"
        temporary.symlink_to(target_name)   # made, then the rename over `latest` fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpointing, "point_link", point_link)
    with pytest.raises(CheckpointError, match=NO_SPACE.pattern):
        save(checkpoints_dir, 1, 4.0, is_best=True, states=states)
    monkeypatch.setattr(checkpointing, "point_link", real_point_link)
    assert snapshot(checkpoints_dir) == before


def test_other_write_errors_say_what_the_system_said_and_clean_up(tmp_path, monkeypatch):
    checkpoints_dir = tmp_path / "checkpoints"
    save(checkpoints_dir, 0, 5.0, is_best=True)
    before = snapshot(checkpoints_dir)

    def failing_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name == "optimizer.pt":
            file.close()
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return file

    monkeypatch.setattr(checkpointing, "open", failing_open, raising=False)
    with pytest.raises(CheckpointError) as raised:
        save(checkpoints_dir, 1, 4.0, is_best=True)
    message = raised.value.format_message()
    assert re.match(rf"{re.escape(str(checkpoints_dir))}: could not write checkpoint \S+ of step 1 "
                    r"\(.*optimizer.pt: Input/output error\)$", message), message
    assert snapshot(checkpoints_dir) == before


def test_low_space_warning_compares_free_space_with_the_newest_checkpoint(tmp_path, monkeypatch):
    checkpoints_dir = tmp_path / "checkpoints"
    assert checkpointing.low_space_warning(checkpoints_dir) is None       # no directory yet
    checkpoints_dir.mkdir()
    assert checkpointing.low_space_warning(checkpoints_dir) is None       # no checkpoint yet
    saved = save(checkpoints_dir, 0, 5.0, is_best=True, states=big_states())
    size = checkpoint_bytes(saved.path)
    usage = shutil.disk_usage(checkpoints_dir)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda path: usage._replace(free=size // 2))
    warning = checkpointing.low_space_warning(checkpoints_dir)
    assert warning == (f"warning: {checkpoints_dir}: {size // 2 / MB:.1f} MB free, less than the "
                       f"{size / MB:.1f} MB of the newest "
                       f"checkpoint {saved.name}; the next checkpoint will probably not fit")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage._replace(free=size))
    assert checkpointing.low_space_warning(checkpoints_dir) is None


def test_low_space_warning_on_a_real_small_disk(tmp_path):
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        checkpoints_dir = disk / "checkpoints"
        saved = save(checkpoints_dir, 0, 5.0, is_best=True, states=big_states())
        warning = checkpointing.low_space_warning(checkpoints_dir)
        assert warning is not None and warning.startswith(f"warning: {checkpoints_dir}: ")
        assert saved.name in warning and "\n" not in warning
        shutil.rmtree(saved.path)
        assert checkpointing.low_space_warning(checkpoints_dir) is None


# --- corrupt files ---

CORRUPT = "not a valid checkpoint file (corrupt or truncated)"


def corrupt(path, how):
    data = path.read_bytes()
    if how == "random bytes":
        path.write_bytes(os.urandom(len(data)))
    elif how == "truncated to half":
        path.write_bytes(data[:len(data) // 2])
    elif how == "truncated by one byte":
        path.write_bytes(data[:-1])
    elif how == "truncated to 100 bytes":
        path.write_bytes(data[:100])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("file, how", [
    ("optimizer.pt", "random bytes"),
    ("optimizer.pt", "truncated to half"),
    ("optimizer.pt", "truncated by one byte"),
    ("optimizer.pt", "truncated to 100 bytes"),
    ("scaler.pt", "empty"),
    ("rng_state.pt", "truncated to half"),
])
def test_a_corrupt_pt_file_is_called_corrupt_and_nothing_unsafe_is_advised(tmp_path, file, how):
    saved = save(tmp_path, 0, 5.0, is_best=True)
    corrupt(saved.path / file, how)
    with pytest.raises(CheckpointError) as raised:
        checkpointing.read_resume_state(checkpointing.resolve_checkpoint(tmp_path, "latest"))
    message = raised.value.format_message()
    assert message == f"{saved.path / file}: {CORRUPT}"
    assert "weights_only" not in message


def test_a_valid_pt_file_with_a_pickled_class_names_it_without_unsafe_advice(tmp_path):
    saved = save(tmp_path, 0, 5.0, is_best=True)
    state = torch.load(saved.path / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["lr"] = Fraction(1, 1000)     # a class no checkpoint holds
    torch.save(state, saved.path / "optimizer.pt")
    with pytest.raises(CheckpointError) as raised:
        checkpointing.read_resume_state(saved)
    message = raised.value.format_message()
    assert message.startswith(f"{saved.path / 'optimizer.pt'}: ")
    assert "fractions.Fraction" in message and CORRUPT not in message
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("content, problem", [
    (os.urandom(300), "not UTF-8 text"),
    (b"{not json", "not JSON (Expecting property name"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"global_step": "7", "val_loss": 1.0}', "no valid 'global_step' (got \"7\")"),
])
def test_garbage_meta_json_under_latest_is_named(tmp_path, content, problem):
    save(tmp_path, 0, 5.0, is_best=True)
    second = save(tmp_path, 1, 5.5, is_best=False)
    (second.path / "meta.json").write_bytes(content)
    with pytest.raises(CheckpointError) as raised:
        checkpointing.resolve_checkpoint(tmp_path, "latest")
    message = raised.value.format_message()
    assert message.startswith(f"{tmp_path / 'latest'} points at {second.name}, which is incomplete: "
                              f"{second.path / 'meta.json'}: {problem}"), message
    assert "\n" not in message
    # A name given on the command line says the same.
    with pytest.raises(CheckpointError, match=re.escape(f"{second.path / 'meta.json'}: {problem}")):
        checkpointing.resolve_checkpoint(tmp_path, second.name)


def test_latest_pointing_at_a_missing_or_weightless_directory_says_so(tmp_path):
    save(tmp_path, 0, 5.0, is_best=True)
    second = save(tmp_path, 1, 5.5, is_best=False)
    (second.path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'latest'} points at {second.name}, which is incomplete: "
            f"{second.path} has no model.safetensors")):
        checkpointing.resolve_checkpoint(tmp_path, "latest")
    shutil.rmtree(second.path)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'latest'} points at {second.name}, which does not exist")):
        checkpointing.resolve_checkpoint(tmp_path, "latest")


def test_garbage_meta_json_under_best_is_a_warning_at_start_up(tmp_path):
    first = save(tmp_path, 0, 5.0, is_best=True)
    save(tmp_path, 1, 5.5, is_best=False)
    assert checkpointing.link_warnings(tmp_path) == []
    (first.path / "meta.json").write_bytes(b"\x00garbage")
    warnings = checkpointing.link_warnings(tmp_path)
    assert warnings == [
        f"warning: {tmp_path / 'best'} points at {first.name}, which is incomplete: "
        f"{first.path / 'meta.json'}: not JSON (Expecting value: line 1 column 1 (char 0)); "
        f"the best validation loss so far is taken from the other checkpoints (5.5000), and best "
        f"moves to the next checkpoint that beats it"]
    # Resuming from latest still works; best is re-pointed at the next improvement.
    assert checkpointing.resolve_checkpoint(tmp_path, "latest").global_step == 1
    assert run_history.best_loss(tmp_path) == 5.5
    third = save(tmp_path, 2, 5.2, is_best=True)
    assert checkpointing.link_target(tmp_path, "best").name == third.name
    assert checkpointing.link_warnings(tmp_path) == []


def test_a_dangling_best_is_a_warning_too(tmp_path):
    first = save(tmp_path, 0, 5.0, is_best=True)
    shutil.rmtree(first.path)
    assert checkpointing.link_warnings(tmp_path) == [
        f"warning: {tmp_path / 'best'} points at {first.name}, which does not exist; the best "
        f"validation loss so far is taken from the other checkpoints (none), and best moves to "
        f"the next checkpoint that beats it",
        f"warning: {tmp_path / 'latest'} points at {first.name}, which does not exist; "
        f"latest moves to the next checkpoint written"]


# --- the weights know their model ---

def model_json(directory, **changes):
    path = Path(directory) / "model.json"
    path.write_text(json.dumps(MODEL_CONFIG | changes))
    return path


def test_a_checkpoint_records_its_model_config(tmp_path):
    saved = checkpointing.save_checkpoint(
        tmp_path / "checkpoints", meta={"global_step": 0, "val_loss": 1.0, "train_loss": 1.0, "is_best": True},
        model_config=MODEL_CONFIG, **checkpoint_states())
    with safe_open(str(saved.path / "model.safetensors"), "pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["model_config"]) == MODEL_CONFIG
    assert weight_files.weights_model_config(saved.path / "model.safetensors") == MODEL_CONFIG


def test_weights_refuse_a_model_json_with_other_heads(tmp_path):
    saved = checkpointing.save_checkpoint(
        tmp_path / "checkpoints", meta={"global_step": 0, "val_loss": 1.0, "train_loss": 1.0, "is_best": True},
        model_config=MODEL_CONFIG, **checkpoint_states())
    weights = saved.path / "model.safetensors"
    other = model_json(tmp_path, n_heads=4)          # emb_dim 16: the same tensor shapes
    with pytest.raises(CheckpointError) as raised:
        weight_files.load_model(other, weights)
    assert raised.value.format_message() == f"{weights} was written for n_heads 2, {other} has 4"
    # Without a model.json to name (ddp_train's resume), the model's own config is compared.
    from gpt import GPTModel
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} was written for n_heads 2, "
                                                        f"the model has 4")):
        weight_files.load_weights_into(GPTModel(MODEL_CONFIG | {"n_heads": 4}), weights)
    # qkv_bias is compared as JSON writes it.
    with pytest.raises(CheckpointError, match="was written for qkv_bias false, .* has true"):
        weight_files.load_model(model_json(tmp_path, qkv_bias=True), weights)
    # drop_rate is no part of the weights; the same architecture loads.
    model = weight_files.load_model(model_json(tmp_path, drop_rate=0.3), weights)
    assert model.cfg["drop_rate"] == 0.3


def test_weights_without_the_metadata_still_load(tmp_path):
    # The original scripts', ours until now, import_hf's: no model_config in the metadata.
    state = checkpoint_states()["model_state"]
    for metadata in (None, {"format": "pt"}):
        weights = tmp_path / "model.safetensors"
        save_file(state, str(weights), metadata=metadata)
        assert weight_files.weights_model_config(weights) is None
        model = weight_files.load_model(model_json(tmp_path, n_heads=4), weights)
        assert torch.equal(model.state_dict()["tok_emb.weight"], state["tok_emb.weight"])
    saved = save(tmp_path / "checkpoints", 0, 5.0, is_best=True)   # no model_config given
    weight_files.load_model(model_json(tmp_path, n_heads=4), saved.path / "model.safetensors")


def test_unreadable_model_config_metadata_is_one_line(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file(checkpoint_states()["model_state"], str(weights),
              metadata={"format": "pt", "model_config": "{oops"})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{weights}: metadata 'model_config' is not a JSON object")):
        weight_files.load_model(model_json(tmp_path), weights)


def test_test_smoke_refuses_weights_written_for_another_model(tmp_path):
    saved = checkpointing.save_checkpoint(
        tmp_path / "checkpoints", meta={"global_step": 0, "val_loss": 1.0, "train_loss": 1.0, "is_best": True},
        model_config=MODEL_CONFIG, **checkpoint_states())
    other = model_json(tmp_path, n_heads=4)
    result = run_script("test_smoke.py", other, saved.path / "model.safetensors", "--device", "cpu", timeout=120)
    one_line_error(result, "was written for n_heads 2", f"{other} has 4")
