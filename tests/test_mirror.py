"""support/mirror.py: checkpoints copied off the machine and fetched back.

Real directories, real processes (the copier SIGKILLed halfway through a copy), and the
real huggingface_hub client against tests/servers/hub.py over HTTP. Every check compares
bytes: a copy that is not byte-exact or not complete fails.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from servers.hub import HubServer
from support import mirror, mirror_targets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_mirror_token"

# The copying side as training runs it, in a process of its own: hand over the
# checkpoints named on the command line, wait, and print what did not get there.
COPIER = """
import json, sys
from support.mirror import CheckpointMirror
target, checkpoints_dir, keep, tries, handovers = sys.argv[1:]
copier = CheckpointMirror(target, checkpoints_dir, keep=json.loads(keep), tries=int(tries),
                          first_delay=0.01, say=lambda line: print(line, flush=True))
for directory, best in json.loads(handovers):
    copier.hand_over(directory, best)
print(json.dumps({"not_mirrored": copier.wait(show_progress=False)}))
"""


def run_copier(target, checkpoints_dir, handovers, keep=None, tries=5, env=None):
    handovers = [[str(directory), best] for directory, best in handovers]
    return subprocess.run([sys.executable, "-c", COPIER, str(target), str(checkpoints_dir), json.dumps(keep),
                           str(tries), json.dumps(handovers)],
                          cwd=PROJECT_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def copier_result(result):
    """(the lines about failures, the names not mirrored) of a copier that ended."""
    assert result.returncode == 0, result.stdout + result.stderr
    *lines, last = result.stdout.strip().splitlines()
    return failures(lines), json.loads(last)["not_mirrored"]


def failures(lines):
    # Several checkpoints handed over at once may also be told that copying lags behind.
    return [line for line in lines if "could not" in line or "gave up" in line]


def warnings(lines):
    return [line for line in lines if line.startswith("warning:")]


class Lines(list):
    """A `say` callback that keeps the lines and tells a waiting test about each."""

    def __init__(self):
        super().__init__()
        self.arrived = threading.Event()

    def __call__(self, line):
        self.append(line)
        self.arrived.set()


def fake_checkpoint(checkpoints_dir, second, step, model_bytes=50_000):
    """A complete checkpoint directory as checkpointing lays it out (random bytes for the
    torch files: the mirror copies bytes, it never loads them)."""
    directory = Path(checkpoints_dir) / f"20250101Z0000{second:02d}-iteration-{step}"
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(os.urandom(model_bytes))
    for name in ("optimizer.pt", "scaler.pt", "rng_state.pt"):
        (directory / name).write_bytes(os.urandom(3000))
    (directory / "meta.json").write_text(json.dumps({"global_step": step, "val_loss": 5.0 - step / 100}))
    return directory


def files_of(directory):
    """{name: bytes} of a directory's files."""
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


def assert_mirrored(mirror_dir, checkpoint_files, name):
    """The mirrored checkpoint holds exactly the checkpoint's bytes, plus a manifest of them."""
    copied = files_of(Path(mirror_dir) / name)
    manifest = json.loads(copied.pop(mirror_targets.MANIFEST_FILE))
    assert copied == checkpoint_files
    assert set(manifest["files"]) == set(checkpoint_files)
    for file_name, content in checkpoint_files.items():
        assert manifest["files"][file_name]["size"] == len(content)
        assert manifest["files"][file_name]["sha256"] == hashlib.sha256(content).hexdigest()


def visible(directory):
    """Every name in a directory, hidden ones too."""
    return {path.name for path in Path(directory).iterdir()}


# --- the target ---

def test_names_agree_with_checkpointing():
    from support import checkpointing

    assert mirror_targets.NAME_PATTERN.pattern == checkpointing.NAME_PATTERN.pattern
    assert (mirror_targets.PARTIAL_PREFIX, mirror_targets.DOOMED_PREFIX) == (checkpointing.PARTIAL_PREFIX, checkpointing.DOOMED_PREFIX)


def test_parse_target(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert mirror_targets.parse_target("hf://me/my-run.v2") == mirror_targets.HubTarget("me/my-run.v2")
    assert mirror_targets.parse_target(str(tmp_path / "new")) == mirror_targets.DirectoryTarget(tmp_path / "new")
    assert mirror_targets.parse_target("../elsewhere", run_dir) == mirror_targets.DirectoryTarget(run_dir / "../elsewhere")
    (tmp_path / "a-file").write_text("")
    refused = {
        5: "must be a directory or hf://OWNER/NAME, got 5",
        "": 'must be a directory or hf://OWNER/NAME, got ""',
        "hf://just-a-name": 'is "hf://just-a-name": a Hub repository is hf://OWNER/NAME',
        "hf://datasets/me/x": "checkpoints go to a model repository",
        "hf://me/bad name": "not a Hub repository name",
        "hf://me/a--b": "not a Hub repository name",
        str(tmp_path / "a-file"): "which is a file, not a directory",
        str(tmp_path / "no-mount" / "run"): f"but {tmp_path / 'no-mount'} does not exist (is the storage mounted?)",
        "checkpoints/mirror": "inside the run's own checkpoints directory",
    }
    for value, message in refused.items():
        with pytest.raises(ValueError) as caught:
            mirror_targets.parse_target(value, run_dir)
        assert message in str(caught.value), (value, str(caught.value))


# --- a directory mirror ---

def test_directory_mirror_copies_every_byte_and_prunes_keeping_best(tmp_path):
    checkpoints_dir, mirror_dir = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    checkpoints = [fake_checkpoint(checkpoints_dir, second, step) for second, step in ((1, 10), (2, 20), (3, 30), (4, 40))]
    originals = {checkpoint.name: files_of(checkpoint) for checkpoint in checkpoints}
    best = checkpoints[0].name
    lines = Lines()
    copier = mirror.CheckpointMirror(str(mirror_dir), checkpoints_dir, keep=2, say=lines, first_delay=0.01)
    for checkpoint in checkpoints:
        copier.hand_over(checkpoint, best)
    assert copier.wait(show_progress=False) == []
    copier.stop()

    # keep 2 -> the two newest, and best besides: the second is pruned from the mirror.
    kept = [checkpoints[0].name, checkpoints[2].name, checkpoints[3].name]
    assert visible(mirror_dir) == {*kept, mirror_targets.LINKS_FILE}
    for name in kept:
        assert_mirrored(mirror_dir, originals[name], name)
    assert json.loads((mirror_dir / mirror_targets.LINKS_FILE).read_text()) == {"latest": checkpoints[3].name, "best": best}
    assert mirror_targets.DirectoryTarget(mirror_dir).complete_names() == kept
    # The local checkpoints are untouched, and the queue is empty again.
    assert {checkpoint.name: files_of(checkpoint) for checkpoint in checkpoints} == originals
    assert visible(checkpoints_dir / mirror_targets.QUEUE_DIR) == set()
    assert failures(lines) == []
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        copier.hand_over(checkpoints_dir, best)


def test_a_checkpoint_pruned_locally_before_its_copy_still_arrives(tmp_path):
    import torch
    from support import checkpointing
    from support import weights as weight_files

    checkpoints_dir = tmp_path / "run" / "checkpoints"
    blocker = tmp_path / "storage"
    blocker.write_text("not mounted yet")   # the mirror's parent is a file: every copy fails
    target = mirror_targets.DirectoryTarget(blocker / "mirror")

    def save(step):
        return checkpointing.save_checkpoint(
            checkpoints_dir, model_state={"weight": torch.randn(64, 64)},
            optimizer_state={"state": {}, "param_groups": []}, scaler_state={},
            rng_state={"cpu": torch.get_rng_state()}, keep=1,
            meta={"global_step": step, "train_loss": 1.0, "val_loss": 1.0, "is_best": False})

    lines = Lines()
    copier = mirror.CheckpointMirror(target, checkpoints_dir, say=lines, first_delay=0.05)
    first = save(1)
    first_files = files_of(first.path)
    copier.hand_over(first.path, None)   # returns although the copy can't be made yet
    assert lines.arrived.wait(10), "no warning for the failed first try"
    assert f"could not copy {first.name}" in lines[0] and "try 2 of 5" in lines[0], lines
    second = save(2)                     # keep_checkpoints=1 deletes the first checkpoint locally
    assert not first.path.exists()
    copier.hand_over(second.path, None)
    blocker.unlink()
    blocker.mkdir()                      # the storage comes up
    assert copier.wait(show_progress=False) == []
    assert_mirrored(blocker / "mirror", first_files, first.name)
    assert_mirrored(blocker / "mirror", files_of(second.path), second.name)
    assert all(line.startswith(f"warning: mirror {target}: could not copy {first.name} (") for line in lines)

    # What a resume reads, from the fetched copy: the newest, its weights and states.
    fresh = tmp_path / "fresh" / "checkpoints"
    mirror.fetch_newest(target, fresh, say=Lines(), first_delay=0.01)
    resumed = checkpointing.resolve_checkpoint(fresh, "latest")
    assert resumed.name == second.name and resumed.global_step == 2
    state = checkpointing.read_resume_state(resumed)
    assert torch.equal(state.rng_state["cpu"], torch.load(second.path / "rng_state.pt")["cpu"])
    assert torch.equal(weight_files.read_weights(resumed.path / "model.safetensors")["weight"],
                       weight_files.read_weights(second.path / "model.safetensors")["weight"])


def test_stop_ends_the_copying_at_once_and_leaves_the_queue_for_the_next_start(tmp_path):
    checkpoints_dir = tmp_path / "run" / "checkpoints"
    checkpoint = fake_checkpoint(checkpoints_dir, 1, 10)
    original = files_of(checkpoint)
    blocker = tmp_path / "storage"
    blocker.write_text("not mounted yet")
    lines = Lines()
    copier = mirror.CheckpointMirror(mirror_targets.DirectoryTarget(blocker / "mirror"), checkpoints_dir, say=lines,
                                     first_delay=600)
    copier.hand_over(checkpoint, None)
    assert lines.arrived.wait(10)   # failed once, now waiting 600 s before the second try
    started = time.monotonic()
    assert copier.stop() == [checkpoint.name]
    assert time.monotonic() - started < 2
    assert copier.wait(show_progress=False) == [checkpoint.name]
    assert visible(checkpoints_dir / mirror_targets.QUEUE_DIR) == {checkpoint.name}
    blocker.unlink()
    blocker.mkdir()
    copier = mirror.CheckpointMirror(blocker / "mirror", checkpoints_dir, say=Lines(), first_delay=0.01)
    assert copier.wait(show_progress=False) == []
    assert_mirrored(blocker / "mirror", original, checkpoint.name)


@pytest.mark.parametrize("point", ["mid-file", "before-rename"])
def test_a_copy_killed_halfway_never_counts(tmp_path, point):
    checkpoints_dir, mirror_dir = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    first = fake_checkpoint(checkpoints_dir, 1, 10)
    # Bigger than one copy chunk, so that "mid-file" kills it halfway through the file.
    second = fake_checkpoint(checkpoints_dir, 2, 20, model_bytes=mirror_targets.COPY_CHUNK + 1_000_000)
    first_files, second_files = files_of(first), files_of(second)
    copier = mirror.CheckpointMirror(mirror_dir, checkpoints_dir, say=Lines(), first_delay=0.01)
    copier.hand_over(first, None)
    assert copier.wait(show_progress=False) == []
    copier.stop()

    killed = run_copier(mirror_dir, checkpoints_dir, [(second, None)],
                        env={"MIRROR_TEST_KILL_AT": f"{point}@{second.name}"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    partial = mirror_dir / f"{mirror_targets.PARTIAL_PREFIX}{second.name}"
    if point == "mid-file":
        assert (partial / "model.safetensors").stat().st_size == mirror_targets.COPY_CHUNK   # half a file
        assert not (partial / mirror_targets.MANIFEST_FILE).exists()
    else:
        assert (partial / mirror_targets.MANIFEST_FILE).is_file()   # complete, but never renamed into place
    assert mirror_targets.DirectoryTarget(mirror_dir).complete_names() == [first.name]
    assert not (mirror_dir / second.name).exists()

    fresh = tmp_path / "fresh" / "checkpoints"
    lines = Lines()
    fetched = mirror.fetch_newest(mirror_dir, fresh, say=lines, first_delay=0.01)
    assert fetched == fresh / first.name and files_of(fetched) == first_files
    assert lines == [f"mirror {mirror_dir}: fetching {first.name} (59.0 kB)"]

    # The snapshot outlived the kill: the next start copies it, though the checkpoint
    # itself has been pruned locally meanwhile.
    for path in second.iterdir():
        path.unlink()
    second.rmdir()
    lines = Lines()
    copier = mirror.CheckpointMirror(mirror_dir, checkpoints_dir, say=lines, first_delay=0.01)
    assert copier.wait(show_progress=False) == []
    assert lines[0] == f"mirror {mirror_dir}: copying 1 checkpoint(s) an earlier run left waiting: {second.name}"
    assert_mirrored(mirror_dir, second_files, second.name)
    assert visible(mirror_dir) == {first.name, second.name, mirror_targets.LINKS_FILE}   # the leftover is gone


# --- fetching on a fresh machine ---

def mirrored(tmp_path, count, best_index, keep=None):
    """A directory mirror holding `count` checkpoints; returns (mirror dir, {name: files})."""
    checkpoints_dir, mirror_dir = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    checkpoints = [fake_checkpoint(checkpoints_dir, index + 1, (index + 1) * 10) for index in range(count)]
    copier = mirror.CheckpointMirror(mirror_dir, checkpoints_dir, keep=keep, say=Lines(), first_delay=0.01)
    for checkpoint in checkpoints:
        copier.hand_over(checkpoint, checkpoints[best_index].name)
    assert copier.wait(show_progress=False) == []
    copier.stop()
    return mirror_dir, {checkpoint.name: files_of(checkpoint) for checkpoint in checkpoints}


def test_fetch_into_an_empty_directory_is_byte_exact_and_restores_the_links(tmp_path):
    from support import checkpointing

    mirror_dir, originals = mirrored(tmp_path, 3, best_index=1)
    names = list(originals)
    # A newer directory without a manifest (another tool's copy, cut short) is no checkpoint.
    unfinished = fake_checkpoint(mirror_dir, 9, 90)
    assert mirror_targets.DirectoryTarget(mirror_dir).complete_names() == names
    fresh = tmp_path / "fresh" / "checkpoints"
    lines = Lines()
    fetched = mirror.fetch_newest(str(mirror_dir), fresh, say=lines, first_delay=0.01)
    assert not (fresh / unfinished.name).exists()
    assert fetched == fresh / names[2]
    assert lines == [f"mirror {mirror_dir}: fetching {name} (59.0 kB)" for name in (names[2], names[1])]
    # The newest, and best (an older one) so that the best loss so far is known on resume.
    assert visible(fresh) == {"best", names[1], names[2], "latest"}
    for name in names[1:]:
        assert files_of(fresh / name) == originals[name]
    assert os.readlink(fresh / "latest") == names[2] and os.readlink(fresh / "best") == names[1]
    assert [c.name for c in checkpointing.list_checkpoints(fresh)] == names[1:]
    assert checkpointing.link_target(fresh, "latest").name == names[2]

    with pytest.raises(mirror_targets.MirrorError, match="already holds 2 checkpoint"):
        mirror.fetch_newest(mirror_dir, fresh, say=lines, first_delay=0.01)
    assert mirror.fetch_newest(tmp_path / "no-mirror-yet", tmp_path / "other" / "checkpoints") is None


def test_fetch_falls_back_from_a_corrupt_newest(tmp_path):
    mirror_dir, originals = mirrored(tmp_path, 3, best_index=2)
    names = list(originals)
    corrupt = mirror_dir / names[2] / "optimizer.pt"
    content = bytearray(corrupt.read_bytes())
    content[1234] ^= 0x01
    corrupt.write_bytes(bytes(content))
    fresh = tmp_path / "fresh" / "checkpoints"
    lines = Lines()
    fetched = mirror.fetch_newest(mirror_dir, fresh, say=lines, first_delay=0.01)
    assert fetched == fresh / names[1] and files_of(fetched) == originals[names[1]]
    # One line for the corrupt one; it was best too, so `best` is left unset.
    assert len(warnings(lines)) == 1, lines
    assert warnings(lines)[0].startswith(f"warning: mirror {mirror_dir}: {names[2]}: optimizer.pt does not "
                                         f"match its manifest (sha256 ")
    assert warnings(lines)[0].endswith(f"fetching {names[1]} instead")
    assert visible(fresh) == {names[1], "latest"}

    # A truncated file of the only one left: nothing passes, and nothing is fetched.
    only = tmp_path / "only"
    mirror_dir, originals = mirrored(only, 1, best_index=0)
    name = next(iter(originals))
    (mirror_dir / name / "model.safetensors").write_bytes(originals[name]["model.safetensors"][:-1])
    lines = Lines()
    with pytest.raises(mirror_targets.MirrorError, match="none of its 1 checkpoint"):
        mirror.fetch_newest(mirror_dir, only / "fresh", say=lines, first_delay=0.01)
    assert warnings(lines) == [f"warning: mirror {mirror_dir}: {name}: model.safetensors has 49999 bytes, "
                               f"its manifest says 50000; no checkpoint before it"]
    assert visible(only / "fresh") == set()


# --- a Hub mirror ---

def hub_env(hub, tmp_path):
    # Xet needs storage servers of its own: the client's LFS path is what the stand-in speaks.
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}


def test_hub_mirror_uploads_prunes_and_fetches(tmp_path, monkeypatch):
    checkpoints_dir = tmp_path / "run" / "checkpoints"
    checkpoints = [fake_checkpoint(checkpoints_dir, second, step) for second, step in ((1, 10), (2, 20), (3, 30))]
    originals = {checkpoint.name: files_of(checkpoint) for checkpoint in checkpoints}
    names = list(originals)
    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        hub.fail_commits = 1   # the first commit gets a 500: one warning, then it goes through
        lines, not_mirrored = copier_result(run_copier(
            "hf://me/run-mirror", checkpoints_dir, [(checkpoint, names[0]) for checkpoint in checkpoints],
            keep=1, env=hub_env(hub, tmp_path)))
        assert not_mirrored == []
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"warning: mirror hf://me/run-mirror: could not copy {names[0]} (HfHubHTTPError: ")
        assert "500 Internal Server Error" in lines[0] and "/api/models/me/run-mirror/commit/main" in lines[0]
        assert lines[0].endswith("); try 2 of 5 in 0.01 s")

        assert hub.private == {"me/run-mirror": True}
        repo = tmp_path / "hub" / "models" / "me" / "run-mirror"
        # keep 1: the newest, and best (the first); the second was deleted by a commit.
        assert visible(repo) == {names[0], names[2], mirror_targets.LINKS_FILE}
        for name in (names[0], names[2]):
            assert_mirrored(repo, originals[name], name)
        assert json.loads((repo / mirror_targets.LINKS_FILE).read_text()) == {"latest": names[2], "best": names[0]}
        assert [summary for _, summary in hub.commits] == [f"Checkpoint {name}" for name in names] + [
            f"Prune checkpoints {names[1]}"]
        # The binary files went by LFS (to storage, without the token; once, though the
        # first commit failed), the JSON ones in the commit.
        uploads = [path.removeprefix("/lfs-upload/") for method, path in hub.requests if method == "PUT"]
        assert sorted(uploads) == sorted(hashlib.sha256(content).hexdigest() for files in originals.values()
                                         for name, content in files.items() if name != "meta.json")
        assert all(auth == f"Bearer {TOKEN}" for (method, path), auth in zip(hub.requests, hub.authorizations)
                   if not path.startswith("/lfs-upload/") and path != "/api/agent-harnesses")

        # Fetching on a fresh machine, through hf_hub_download; the newest corrupted on
        # the Hub falls back to the one before, which here is also best.
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        fresh = tmp_path / "fresh" / "checkpoints"
        assert mirror.fetch_newest("hf://me/run-mirror", fresh, say=Lines(), first_delay=0.01) == fresh / names[2]
        assert files_of(fresh / names[2]) == originals[names[2]]
        assert files_of(fresh / names[0]) == originals[names[0]]
        assert os.readlink(fresh / "latest") == names[2] and os.readlink(fresh / "best") == names[0]
        assert visible(fresh) == {"best", names[0], names[2], "latest"}
        assert not any(path.is_symlink() for name in (names[0], names[2]) for path in (fresh / name).iterdir())

        stored = repo / names[2] / "model.safetensors"
        content = bytearray(stored.read_bytes())
        content[-1] ^= 0xFF
        stored.write_bytes(bytes(content))
        again = tmp_path / "again" / "checkpoints"
        lines = Lines()
        assert mirror.fetch_newest("hf://me/run-mirror", again, say=lines, first_delay=0.01) == again / names[0]
        assert files_of(again / names[0]) == originals[names[0]]
        assert len(warnings(lines)) == 1 and "model.safetensors does not match its manifest" in warnings(lines)[0]
        assert warnings(lines)[0].endswith(f"fetching {names[0]} instead")
        assert visible(again) == {"best", names[0], "latest"}

        # No such repository: nothing to fetch, unless no token is set (a private one
        # looks missing then, and starting afresh would be wrong).
        assert mirror.fetch_newest("hf://me/no-such-repo", tmp_path / "none", say=Lines(), first_delay=0.01) is None
        monkeypatch.delenv("HF_TOKEN")
        with pytest.raises(mirror_targets.MirrorError, match="no Hugging Face token is set"):
            mirror.fetch_newest("hf://me/run-mirror", tmp_path / "none", say=Lines(), first_delay=0.01)


def test_a_failing_hub_gives_one_warning_per_try_and_names_what_did_not_get_there(tmp_path, monkeypatch):
    checkpoints_dir = tmp_path / "run" / "checkpoints"
    checkpoints = [fake_checkpoint(checkpoints_dir, 1, 10), fake_checkpoint(checkpoints_dir, 2, 20)]
    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        hub.fail_all = 500
        lines, not_mirrored = copier_result(run_copier(
            "hf://me/run-mirror", checkpoints_dir, [(checkpoint, None) for checkpoint in checkpoints],
            tries=3, env=hub_env(hub, tmp_path)))
        # A mirror that can't be read on a fresh machine stops the run: starting afresh
        # would later prune the good checkpoints in it.
        hub.fail_all = 403
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        fetch_lines = Lines()
        with pytest.raises(mirror_targets.MirrorError) as caught:
            mirror.fetch_newest("hf://me/run-mirror", tmp_path / "fresh", say=fetch_lines, tries=2, first_delay=0.01)
    assert caught.value.format_message().startswith(
        "mirror hf://me/run-mirror: could not list the mirrored checkpoints after 2 tries (HfHubHTTPError: ")
    assert "403 Forbidden" in caught.value.format_message()
    assert len(fetch_lines) == 1 and fetch_lines[0].endswith("try 2 of 2 in 0.01 s")
    assert not_mirrored == [checkpoint.name for checkpoint in checkpoints]
    assert len(lines) == 6, lines
    for checkpoint, tries in zip(checkpoints, (lines[:3], lines[3:])):
        assert tries[0].startswith(f"warning: mirror hf://me/run-mirror: could not copy {checkpoint.name} "
                                   f"(HfHubHTTPError: ")
        assert tries[0].endswith("try 2 of 3 in 0.01 s") and tries[1].endswith("try 3 of 3 in 0.02 s")
        assert tries[2].startswith(f"warning: mirror hf://me/run-mirror: gave up on {checkpoint.name} after 3 "
                                   f"tries (HfHubHTTPError: ")
        assert tries[2].endswith("it is not mirrored")
        assert all("500 Internal Server Error" in line and "/api/repos/create" in line for line in tries)
    # Given up: the snapshots are gone, and the checkpoints are where they were.
    assert visible(checkpoints_dir / mirror_targets.QUEUE_DIR) == set()
    assert all((checkpoint / "model.safetensors").is_file() for checkpoint in checkpoints)


# --- through ddp_train.py: a machine whose checkpoints are gone resumes from the mirror ---

@pytest.mark.parametrize("kind", ["directory", "hub"])
def test_a_run_whose_checkpoints_are_gone_resumes_from_its_mirror_bit_for_bit(kind, tmp_path, datasets_dir):
    from contextlib import nullcontext

    from helpers import MODEL, TRAIN, final_weights, latest, make_run, run_training

    with HubServer(tmp_path / "hub", token=TOKEN) if kind == "hub" else nullcontext() as hub:
        target = "hf://me/run" if hub else str(tmp_path / "mirror")
        storage = tmp_path / "hub" / "models" / "me" / "run" if hub else tmp_path / "mirror"
        env = hub_env(hub, tmp_path) if hub else None
        # 4 steps, checkpoints at 0, 2 and 3, each copied to the mirror as it is written.
        train = {**TRAIN, "checkpoint_mirror": target}
        first = make_run(tmp_path / "first", MODEL, train)
        result = run_training(first, datasets_dir, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        names = sorted(name for name in visible(storage) if name != mirror_targets.LINKS_FILE)
        assert [name.rsplit("-", 1)[1] for name in names] == ["0", "2", "3"]
        assert files_of(storage / names[-1]) == files_of(latest(first).path) | {
            mirror_targets.MANIFEST_FILE: (storage / names[-1] / mirror_targets.MANIFEST_FILE).read_bytes()}
        # The machine went before step 3's copy was complete: the mirror's newest is step 2.
        shutil.rmtree(storage / names[-1])
        links = json.loads((storage / mirror_targets.LINKS_FILE).read_text())
        (storage / mirror_targets.LINKS_FILE).write_text(json.dumps({**links, "latest": names[1]}))
        # A fresh machine: the run's configs, no checkpoints.
        fresh = make_run(tmp_path / "fresh", MODEL, train)
        result = run_training(fresh, datasets_dir, "auto", env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
        assert f"resuming from {names[1]} at step 3" in result.stdout, result.stdout
        for key, tensor in final_weights(first).items():
            assert torch.equal(final_weights(fresh)[key], tensor), key
