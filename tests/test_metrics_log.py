"""runs/RUN/metrics.jsonl, TensorBoard and W&B across resumes: real torchrun runs, the
events read back with tensorboard's own reader and W&B's offline run files with its
protobuf records. (Per-step rows against an independent computation, and the rows
left by SIGKILLed sessions, are checked in test_ddp_train.py and test_unattended.py.)"""

import glob
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from helpers import MODEL, TRAIN, copy_run_up_to, latest, make_run, metrics_rows, one_line_error, run_training
from support.metrics import METRICS_FILE, WANDB_ID_FILE

# 2 ranks x 2 micro-steps x 2 sequences x 16 tokens = 128 tokens a global step: 768
# tokens make 6 steps, checkpoints at 0, 4 and 5, training rows at 0, 3, 4 and 5.
LOGGED = {**TRAIN, "min_train_tokens": 768, "gradient_accumulation_steps": 2, "validation_interval": 4,
          "log_interval": 3, "tensorboard": True, "wandb_project": "tests"}
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, datasets_dir):
    run_dir = make_run(tmp_path_factory.mktemp("logged") / "run", MODEL, LOGGED)
    result = run_training(run_dir, datasets_dir, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def wandb_records(run_file):
    """The protobuf records of a W&B run file (a LevelDB-style log of 32 KiB blocks
    after a 7-byte header, each chunk with a 7-byte header of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:   # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):   # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file):
    # A key is either `key`, or (names with a slash) the parts in `nested_key`.
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in wandb_records(run_file) if record.WhichOneof("record_type") == "history"]


def test_rows_per_log_interval_and_checkpoint(logged_run):
    rows = metrics_rows(logged_run)
    assert [(row["kind"], row["step"]) for row in rows] == [
        ("train", 0), ("validation", 0), ("train", 3), ("train", 4), ("validation", 4),
        ("train", 5), ("validation", 5)]
    train = {row["step"]: row for row in rows if row["kind"] == "train"}
    validation = {row["step"]: row for row in rows if row["kind"] == "validation"}
    # A row's loss is the mean over its steps: a checkpoint's train loss (steps 1-4)
    # is the steps-weighted mean of rows 3 (steps 1-3) and 4.
    assert validation[4]["train_loss"] == pytest.approx((3 * train[3]["loss"] + train[4]["loss"]) / 4, abs=1e-6)
    assert validation[0]["train_loss"] == pytest.approx(train[0]["loss"], abs=1e-6)
    assert train[5]["tokens_seen"] == 6 * 128
    assert all(0 <= row["clipped_fraction"] <= 1 and row["grad_norm"] > 0 for row in train.values())
    assert (logged_run / "checkpoints").is_dir() and validation[5]["checkpoint"] == os.readlink(
        logged_run / "checkpoints" / "latest")


def test_resume_rewinds_the_log_tensorboard_and_wandb(logged_run, tmp_path, datasets_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # As if the run had crashed after step 5's rows but before its checkpoint: resumed
    # from step 4, the log, TensorBoard and W&B must show step 5 once.
    run_dir = copy_run_up_to(logged_run, tmp_path / "resumed", step=4)
    result = run_training(run_dir, datasets_dir, "latest", env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics_rows(run_dir, comparable=True) == metrics_rows(logged_run, comparable=True)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = metrics_rows(run_dir)
    for tag, kind, key in [("train/loss", "train", "loss"), ("train/learning_rate", "train", "learning_rate"),
                           ("train/grad_norm", "train", "grad_norm"), ("validation/val_loss", "validation", "val_loss")]:
        scalars = events.Scalars(tag)
        expected = [(row["step"], row[key]) for row in logged if row["kind"] == kind]
        assert [scalar.step for scalar in scalars] == [step for step, _ in expected], tag
        assert [scalar.value for scalar in scalars] == pytest.approx([value for _, value in expected], rel=1e-6)

    # One W&B run id for both sessions; the resumed session logged from step 5 on.
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert run_id == (logged_run / WANDB_ID_FILE).read_text().strip()
    run_files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(run_files) == 2
    first, resumed = (wandb_history(run_file) for run_file in run_files)
    assert [row["global_step"] for row in first] == [0, 0, 3, 4, 4, 5, 5]
    assert [row["global_step"] for row in resumed] == [5, 5]
    assert resumed[0]["train/loss"] == pytest.approx(logged[-2]["loss"], rel=1e-12)
    assert resumed[1]["validation/val_loss"] == pytest.approx(logged[-1]["val_loss"], rel=1e-12)


def test_a_garbage_line_is_reported_and_the_log_rebuilt(logged_run, tmp_path, datasets_dir):
    run_dir = copy_run_up_to(logged_run, tmp_path / "garbage", step=4, train={**LOGGED, "wandb_project": None})
    lines = (run_dir / METRICS_FILE).read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    (run_dir / METRICS_FILE).write_text("".join(lines))
    result = run_training(run_dir, datasets_dir, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{run_dir / METRICS_FILE} line 3 is not a metrics row" in result.stdout
    # Nothing lost but the garbage (step 3's training row): the old file is kept beside the
    # new one, which keeps every readable row.
    [aside] = [name for name in os.listdir(run_dir) if name.startswith(f"{METRICS_FILE}.corrupt-")]
    assert (run_dir / aside).read_text() == "".join(lines)
    expected = metrics_rows(logged_run, comparable=True)
    assert metrics_rows(run_dir, comparable=True) == expected[:2] + expected[3:]

    # A garbage line where a checkpoint's row was: that row comes back from the history.
    lines = (run_dir / METRICS_FILE).read_text().splitlines(keepends=True)
    assert json.loads(lines[1])["kind"] == "validation"
    lines[1] = "garbage\n"
    (run_dir / METRICS_FILE).write_text("".join(lines))
    shutil.rmtree(latest(run_dir).path)   # resume from step 4 again
    os.unlink(run_dir / "checkpoints" / "latest")
    assert run_training(run_dir, datasets_dir, "auto").returncode == 0
    rebuilt = metrics_rows(run_dir, comparable=True)
    assert [(row["kind"], row["step"]) for row in rebuilt][:2] == [("train", 0), ("validation", 0)]
    assert rebuilt[1]["val_loss"] == expected[1]["val_loss"]


def test_a_torn_last_line_costs_only_that_line(logged_run, tmp_path, datasets_dir):
    # The normal shape of a crash: the last row half-written. Resumed, the log keeps every
    # readable row, and ends as the uninterrupted run's.
    run_dir = copy_run_up_to(logged_run, tmp_path / "torn", step=4, train={**LOGGED, "wandb_project": None})
    text = (run_dir / METRICS_FILE).read_text()
    (run_dir / METRICS_FILE).write_text(text + '{"kind": "train", "step": 5, "lo')
    result = run_training(run_dir, datasets_dir, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was torn by a crash: dropped, every other row kept" in result.stdout
    assert not any(name.startswith(f"{METRICS_FILE}.corrupt-") for name in os.listdir(run_dir))
    assert metrics_rows(run_dir, comparable=True) == metrics_rows(logged_run, comparable=True)


def test_a_fresh_start_keeps_an_earlier_log_aside(logged_run, tmp_path, datasets_dir):
    run_dir = tmp_path / "again"
    shutil.copytree(logged_run, run_dir, symlinks=True)
    (run_dir / "train.json").write_text(json.dumps({**TRAIN, "log_interval": 2, "gradient_accumulation_steps": 2}))
    shutil.move(run_dir / "checkpoints", tmp_path / "old-checkpoints")
    old_log = (run_dir / METRICS_FILE).read_text()
    result = run_training(run_dir, datasets_dir, nproc=None)
    assert result.returncode == 0, result.stderr[-3000:]
    [aside] = [name for name in os.listdir(run_dir) if name.startswith(f"{METRICS_FILE}.2")]
    assert f"kept the earlier run's log as {aside}" in result.stdout
    assert (run_dir / aside).read_text() == old_log
    # One process, 4 steps of 2 micro-batches; rows every 2 steps and at checkpoints 0, 2, 3.
    assert [(row["kind"], row["step"]) for row in metrics_rows(run_dir)] == [
        ("train", 0), ("validation", 0), ("train", 2), ("validation", 2), ("train", 3), ("validation", 3)]


def test_an_enabled_logger_without_its_package_is_one_line(tmp_path, datasets_dir):
    # A Python whose import system can't find wandb, as where the extra isn't installed.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoWandb:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'wandb' or name.startswith('wandb.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoWandb())\n")
    run_dir = make_run(tmp_path / "run", MODEL, {**TRAIN, "wandb_project": "tests"})
    result = run_training(run_dir, datasets_dir, nproc=None, env={"PYTHONPATH": str(site)})
    one_line_error(result, f"{run_dir / 'train.json'}: key 'wandb_project' is set, but the wandb package is "
                           f"not installed", "uv sync --extra wandb")
    assert sorted(os.listdir(run_dir)) == ["model.json", "train.json"]


def test_a_tensorboard_directory_that_cant_be_made_is_one_line(tmp_path, datasets_dir):
    run_dir = make_run(tmp_path / "run", MODEL, {**TRAIN, "tensorboard": True})
    (run_dir / "tensorboard").write_text("a file in the way")
    result = run_training(run_dir, datasets_dir, nproc=None)
    one_line_error(result, f"{run_dir / 'tensorboard'}: can't create the TensorBoard directory")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / METRICS_FILE).exists()



def test_a_wandb_start_that_fails_leaves_the_run_directory_as_it_was(tmp_path, datasets_dir):
    # Online, with no API key and no terminal to ask for one: W&B refuses to start.
    run_dir = make_run(tmp_path / "run", MODEL, {**TRAIN, "wandb_project": "tests", "tensorboard": True})
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": None, "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_SILENT": "true", "HOME": str(tmp_path / "home")}
    result = run_training(run_dir, datasets_dir, nproc=None, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "W&B project 'tests': " in result.stderr.strip().splitlines()[-1]
    # No wandb-run-id, no wandb/, no tensorboard/ (the run's lock file is there from before the loggers).
    assert sorted(os.listdir(run_dir)) == [".training.lock", "model.json", "train.json"]
