"""Checkpoint directories: layout, atomic saves, listing, links, pruning, crashes mid-save."""

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from support import charts as chart
from support import checkpointing
from support import run_history
from support import weights as weight_files
from support.checkpointing import CheckpointError
from gpt import GPTModel
from helpers import MODEL, write_original_checkpoint

MODEL_CONFIG = {**MODEL, "emb_dim": 16, "context_length": 8, "n_layers": 1}


def trained_state():
    """A tiny model and the optimizer/scaler state after one AdamW step."""
    torch.manual_seed(0)
    model = GPTModel(MODEL_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    inputs = torch.randint(0, 64, (2, 8))
    model(inputs).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scaler


def checkpoint_states():
    model, optimizer, scaler = trained_state()
    return {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "scaler_state": scaler.state_dict(),
            "rng_state": {"world_size": 1, "cpu": [torch.Generator().manual_seed(7).get_state()]}}


def save(checkpoints_dir, step, val_loss, is_best, keep=None, states=None):
    meta = {"train_loss": val_loss + 0.5, "val_loss": val_loss, "global_step": step,
            "is_best": is_best}
    return checkpointing.save_checkpoint(checkpoints_dir, meta=meta, keep=keep,
                                         **(states or checkpoint_states()))


def visible_entries(checkpoints_dir):
    return sorted(entry.name for entry in Path(checkpoints_dir).iterdir() if not entry.name.startswith("."))


def assert_consistent(checkpoints_dir):
    """What any crash must leave: every visible checkpoint name complete, links valid."""
    checkpoints_dir = Path(checkpoints_dir)
    listed = {c.name for c in checkpointing.list_checkpoints(checkpoints_dir)}
    for name in visible_entries(checkpoints_dir):
        if name in checkpointing.LINK_NAMES:
            target = checkpointing.link_target(checkpoints_dir, name)
            assert target is not None and target.name in listed, f"{name} points at an incomplete checkpoint"
        else:
            assert name in listed, f"{name} is visible but incomplete"
            for file in (checkpointing.MODEL_FILE, checkpointing.OPTIMIZER_FILE,
                         checkpointing.SCALER_FILE, checkpointing.META_FILE):
                assert (checkpoints_dir / name / file).is_file()
            checkpointing.read_resume_state(checkpointing.resolve_checkpoint(checkpoints_dir, name))
    return listed


def test_layout_matches_the_original_scripts(tmp_path):
    checkpoints_dir = tmp_path / "checkpoints"
    saved = save(checkpoints_dir, 100, 3.5, is_best=True)
    assert checkpointing.NAME_PATTERN.match(saved.name)
    assert saved.name.endswith("-iteration-100")
    assert sorted(os.listdir(saved.path)) == ["meta.json", "model.safetensors", "optimizer.pt",
                                              "rng_state.pt", "scaler.pt"]
    for link in ("best", "latest"):
        assert os.readlink(checkpoints_dir / link) == saved.name  # relative
    meta = json.loads((saved.path / "meta.json").read_text())
    assert list(meta)[:4] == ["train_loss", "val_loss", "global_step", "is_best"]
    assert meta["global_step"] == 100 and meta["is_best"] is True

    # The weights load strictly into the model, the .pt files without pickle execution.
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(MODEL_CONFIG))
    loaded = weight_files.load_model(model_json, checkpoints_dir / "best" / "model.safetensors")
    expected, _, _ = trained_state()
    for key, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    optimizer_state = torch.load(saved.path / "optimizer.pt", weights_only=True)
    assert optimizer_state["param_groups"][0]["lr"] == 1e-3
    state = checkpointing.read_resume_state(saved)
    assert torch.equal(state.rng_state["cpu"][0], torch.Generator().manual_seed(7).get_state())
    assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))  # no leftovers


def test_latest_always_moves_best_only_on_improvement(tmp_path):
    first = save(tmp_path, 0, 4.0, is_best=True)
    second = save(tmp_path, 10, 4.5, is_best=False)
    assert checkpointing.link_target(tmp_path, "best").name == first.name
    assert checkpointing.link_target(tmp_path, "latest").name == second.name
    assert run_history.best_loss(tmp_path) == 4.0
    assert [c.global_step for c in checkpointing.list_checkpoints(tmp_path)] == [0, 10]


def test_keep_checkpoints_keeps_the_newest_plus_best(tmp_path):
    save(tmp_path, 0, 5.0, is_best=True)
    best = save(tmp_path, 1, 1.0, is_best=True)
    for step in (2, 3, 4):
        save(tmp_path, step, 2.0 + step, is_best=False, keep=2)
    steps = [c.global_step for c in checkpointing.list_checkpoints(tmp_path)]
    assert steps == [1, 3, 4]
    assert checkpointing.link_target(tmp_path, "best").name == best.name
    assert checkpointing.link_target(tmp_path, "latest").global_step == 4
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_listing_skips_leftovers_and_reads_original_checkpoints(tmp_path):
    write_original_checkpoint(tmp_path, 0, {"train_loss": 6.25, "val_loss": 6.0, "is_best": True},
                              model_config=MODEL_CONFIG)
    write_original_checkpoint(tmp_path, 100, {"train_loss": 5.25, "val_loss": 5.0, "is_best": True},
                              model_config=MODEL_CONFIG, written_at="20250101Z000100")
    # The original scripts, killed mid-save, left a directory without meta.json.
    torn = tmp_path / "20250101Z000200-iteration-200"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 10)
    # Our own interrupted saves and deletions, a corrupt meta, strays.
    (tmp_path / ".partial-20250101Z000300-iteration-300").mkdir()
    (tmp_path / ".deleting-20250101Z000000-iteration-0").mkdir()
    broken = tmp_path / "20250101Z000400-iteration-400"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"x")
    (broken / "meta.json").write_text("{not json")
    (tmp_path / "20250101Z000500-iteration-500").write_text("a file, not a directory")
    (tmp_path / "notes.txt").write_text("hello")
    os.symlink("20250101Z000400-iteration-400", tmp_path / ".latest.123.tmp")

    listed = checkpointing.list_checkpoints(tmp_path)
    assert [c.global_step for c in listed] == [0, 100]
    latest = checkpointing.resolve_checkpoint(tmp_path, "latest")
    assert latest.global_step == 100
    state = checkpointing.read_resume_state(latest)
    assert state.rng_state is None and state.scaler_state["scale"] == 65536.0
    assert run_history.best_loss(tmp_path) == 5.0
    assert [p["global_step"] for p in run_history.loss_history(tmp_path)] == [0, 100]
    assert [p["global_step"] for p in run_history.loss_history(tmp_path, up_to_step=50)] == [0]

    removed = checkpointing.remove_leftovers(tmp_path)
    assert sorted(removed) == [".deleting-20250101Z000000-iteration-0", ".latest.123.tmp",
                               ".partial-20250101Z000300-iteration-300"]
    assert torn.is_dir() and broken.is_dir()  # not ours to delete: only skipped


def test_resolve_errors_name_what_exists(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoints"):
        checkpointing.resolve_checkpoint(tmp_path, "latest")
    saved = save(tmp_path, 5, 3.0, is_best=True)
    with pytest.raises(CheckpointError, match=f"does not exist.*newest: {saved.name}"):
        checkpointing.resolve_checkpoint(tmp_path, "20250101Z000000-iteration-7")
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        checkpointing.resolve_checkpoint(tmp_path, "../elsewhere")
    (tmp_path / "20250101Z000000-iteration-3").mkdir()
    with pytest.raises(CheckpointError, match="is incomplete"):
        checkpointing.resolve_checkpoint(tmp_path, "20250101Z000000-iteration-3")
    assert checkpointing.resolve_checkpoint(tmp_path, saved.name).global_step == 5


def test_pt_files_are_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "payload": Path("/")}, path)  # not a plain value
    with pytest.raises(CheckpointError, match="optimizer.pt: holds a pickled pathlib.PosixPath"):
        weight_files.read_torch_file(path)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"not a valid checkpoint file \(corrupt or truncated\)"):
        weight_files.read_torch_file(path)


def _save_in_child(checkpoints_dir, states, kill_at):
    # Only file writing happens in the forked child: no OpenMP work after fork.
    os.environ[checkpointing.KILL_AT_VARIABLE] = kill_at
    save(checkpoints_dir, 3, 3.0, is_best=True, keep=2, states=states)
    os._exit(0)  # not reached when the kill point fires


@pytest.mark.parametrize("kill_at, latest_step, best_step, step_3_listed, leftover", [
    ("partial@3", 2, 1, False, ".partial-"),          # in the hidden directory, model file written
    ("before-rename@3", 2, 1, False, ".partial-"),    # every file written and synced, not renamed
    ("after-rename@3", 2, 1, True, None),             # visible under its name; links not moved yet
    ("after-latest@3", 3, 1, True, None),             # latest moved, best not yet
    ("mid-prune@0", 3, 3, True, ".deleting-"),        # an old one renamed away, not yet removed
])
def test_sigkill_during_a_save_leaves_only_complete_checkpoints(
        tmp_path, kill_at, latest_step, best_step, step_3_listed, leftover):
    checkpoints_dir = tmp_path / "checkpoints"
    states = checkpoint_states()
    save(checkpoints_dir, 0, 5.0, is_best=True, states=states)
    save(checkpoints_dir, 1, 4.0, is_best=True, states=states)
    save(checkpoints_dir, 2, 4.5, is_best=False, states=states)

    child = multiprocessing.get_context("fork").Process(
        target=_save_in_child, args=(checkpoints_dir, states, kill_at))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL

    listed = assert_consistent(checkpoints_dir)
    assert checkpointing.link_target(checkpoints_dir, "latest").global_step == latest_step
    assert checkpointing.link_target(checkpoints_dir, "best").global_step == best_step
    assert (3 in {c.global_step for c in checkpointing.list_checkpoints(checkpoints_dir)}) == step_3_listed
    hidden = [name for name in os.listdir(checkpoints_dir) if name.startswith(".")]
    assert [name[:len(leftover)] for name in hidden] == ([leftover] if leftover else [])
    # The chart reads the same directory without tripping.
    points, best = chart.chart_points(checkpoints_dir)
    assert [p["global_step"] for p in points] == sorted(c.global_step for c in
                                                      checkpointing.list_checkpoints(checkpoints_dir))
    chart.draw_loss_chart(points, best, tmp_path / "chart.png")

    # The next run cleans up and carries on.
    checkpointing.remove_leftovers(checkpoints_dir)
    assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))
    assert {c.name for c in checkpointing.list_checkpoints(checkpoints_dir)} == listed
    again = save(checkpoints_dir, 3, 3.0, is_best=True, keep=2, states=states)
    assert checkpointing.link_target(checkpoints_dir, "latest").name == again.name
    assert_consistent(checkpoints_dir)


def test_a_failed_write_is_one_error_and_leaves_the_old_checkpoints(tmp_path):
    import resource

    checkpoints_dir = tmp_path / "checkpoints"
    first = save(checkpoints_dir, 0, 5.0, is_best=True)
    states = checkpoint_states()
    # A file-size limit stands in for a full disk (it binds root too): writes past it fail.
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, previous_limit[1]))
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint .* of step 1"):
            save(checkpoints_dir, 1, 4.0, is_best=True, states=states)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert [c.name for c in checkpointing.list_checkpoints(checkpoints_dir)] == [first.name]
    assert checkpointing.link_target(checkpoints_dir, "latest").name == first.name
    assert not any(name.startswith(".") for name in os.listdir(checkpoints_dir))  # removed at once
