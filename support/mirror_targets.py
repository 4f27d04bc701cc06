"""Where checkpoints are mirrored: a directory on other storage, or a private Hugging Face
Hub model repository; what a mirrored checkpoint is (its files and a manifest of their
sizes and sha256, written last); parsing train.json's `checkpoint_mirror`. The copying
and the fetching are mirror.py's.

Light on purpose (no torch): the copying process of the tests imports only this.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import click

from . import safe_files

HUB_SCHEME = "hf://"
MANIFEST_FILE = "manifest.json"
LINKS_FILE = "links.json"
QUEUE_DIR = ".mirror-queue"          # in the checkpoints directory: hard links work there
HANDOVER_FILE = ".handover.json"     # in a queued snapshot: what `best` was at the hand-over
# As checkpointing spells them (tests/test_mirror.py checks that they agree): importing
# checkpointing would bring torch into every process that only copies files.
NAME_PATTERN = re.compile(r"^(?P<time>\d{8}Z\d{6})-iteration-(?P<step>\d+)$")
PARTIAL_PREFIX = ".partial-"
DOOMED_PREFIX = ".deleting-"
COPY_CHUNK = 8 * 1024 * 1024
TRIES = 5                # copies (and downloads) tried before a checkpoint is given up
FIRST_DELAY = 2.0        # seconds before the second try; doubled for each one after


class MirrorError(click.ClickException):
    """The mirror can't be read when a run needs it (fetching on a fresh machine)."""


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def name_order(name: str) -> tuple:
    """Oldest first, as checkpointing lists them: by the time in the name, then the step."""
    match = NAME_PATTERN.match(name)
    return match["time"], int(match["step"])


# --- the target: parsing train.json's value ---

def parse_target(value, run_dir=None):
    """train.json's `checkpoint_mirror` as a DirectoryTarget or HubTarget.

    A relative directory is relative to run_dir (when given). Raises ValueError with a
    message that reads after "train.json: key 'checkpoint_mirror' ". A directory that
    does not exist yet is fine (it is made at the first copy), but its parent must: a
    mistyped mount point would otherwise fill the local disk that is about to vanish."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a directory or hf://OWNER/NAME, got {json.dumps(value)}")
    if value.startswith(HUB_SCHEME):
        return HubTarget(_hub_repo_id(value))
    path = Path(value).expanduser()
    if run_dir is not None and not path.is_absolute():
        path = Path(run_dir) / path
    if path.exists() and not path.is_dir():
        raise ValueError(f"is {json.dumps(value)}, which is a file, not a directory")
    if not path.exists() and not path.parent.is_dir():
        raise ValueError(f"is {json.dumps(value)}, but {path.parent} does not exist "
                         f"(is the storage mounted?)")
    if run_dir is not None:
        checkpoints = (Path(run_dir) / "checkpoints").resolve()
        resolved = path.resolve()
        if resolved == checkpoints or checkpoints in resolved.parents:
            raise ValueError(f"is {json.dumps(value)}, inside the run's own checkpoints directory "
                             f"{checkpoints}: the mirror must be somewhere else")
    return DirectoryTarget(path)


def _hub_repo_id(value: str) -> str:
    repo_id = value[len(HUB_SCHEME):]
    if repo_id.split("/")[0] in ("datasets", "spaces"):
        raise ValueError(f"is {json.dumps(value)}: checkpoints go to a model repository, hf://OWNER/NAME")
    if repo_id.count("/") != 1:
        raise ValueError(f"is {json.dumps(value)}: a Hub repository is hf://OWNER/NAME")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"is {json.dumps(value)}, not a Hub repository name: OWNER and NAME take letters, "
                         f"digits, '-', '_' and '.', at most 96 characters") from None
    return repo_id


class CopyStopped(Exception):
    """stop() was called while a copy ran."""


class ManifestMismatch(Exception):
    """A mirrored checkpoint that is not what its manifest says: fetching falls back."""


def _test_kill_point(point: str, name: str) -> None:
    # Tests set MIRROR_TEST_KILL_AT=POINT@NAME to SIGKILL the copying process at that point
    # of the copy of checkpoint NAME (as checkpointing's CHECKPOINTING_TEST_KILL_AT).
    if os.environ.get("MIRROR_TEST_KILL_AT") == f"{point}@{name}":
        os.kill(os.getpid(), signal.SIGKILL)


def _copy_file(source: Path, destination: Path, progress, stopping, name: str) -> str:
    """Copy source to destination, synced to disk; returns the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        size = os.fstat(reader.fileno()).st_size
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
            digest.update(chunk)
            progress(len(chunk))
            if reader.tell() < size:
                _test_kill_point("mid-file", name)
            if stopping():
                raise CopyStopped()
        safe_files.flush_to_disk(writer)
    return digest.hexdigest()


def hash_file(path: Path, stopping=lambda: False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        while chunk := reader.read(COPY_CHUNK):
            digest.update(chunk)
            if stopping():
                raise CopyStopped()
    return digest.hexdigest()


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


@dataclasses.dataclass(frozen=True)
class DirectoryTarget:
    """A directory on storage that outlives the machine, holding this run's checkpoints."""
    path: Path

    def __str__(self):
        return str(self.path)

    def prepare(self, say) -> None:
        """Before the first copy: the directory exists, and what a killed copy or deletion
        left is gone (one run writes to a mirror, as one trainer to a run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():
            if entry.name.startswith((PARTIAL_PREFIX, DOOMED_PREFIX)) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)

    def complete_names(self) -> list[str]:
        """The mirrored checkpoints whose manifest is there, oldest first."""
        if not self.path.is_dir():
            return []
        names = [entry.name for entry in self.path.iterdir()
                 if NAME_PATTERN.match(entry.name) and not entry.is_symlink()
                 and (entry / MANIFEST_FILE).is_file()]
        return sorted(names, key=name_order)

    def put(self, snapshot: Path, name: str, manifest: dict, links: dict, progress, stopping) -> None:
        final = self.path / name
        if not (final / MANIFEST_FILE).is_file():   # else an earlier try got as far as the rename
            partial = self.path / f"{PARTIAL_PREFIX}{name}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            for file_name, expected in manifest["files"].items():
                copied = _copy_file(snapshot / file_name, partial / file_name, progress, stopping, name)
                if copied != expected["sha256"]:
                    raise OSError(errno.EIO, f"{file_name} read back other bytes than were hashed at the "
                                             f"hand-over", str(snapshot / file_name))
            with open(partial / MANIFEST_FILE, "wb") as file:
                file.write(_json_bytes(manifest))
                safe_files.flush_to_disk(file)
            safe_files.fsync_dir(partial)
            _test_kill_point("before-rename", name)
            if final.exists():   # a directory of that name without a manifest: not ours to trust
                self._remove(name)
            os.rename(partial, final)
            safe_files.fsync_dir(self.path)
        safe_files.write_atomically(self.path / LINKS_FILE, _json_bytes(links))
        safe_files.fsync_dir(self.path)

    def remove(self, names) -> None:
        for name in names:
            self._remove(name)
        safe_files.fsync_dir(self.path)

    def _remove(self, name: str) -> None:
        # Out of sight first: a crash mid-removal leaves a hidden leftover, not a
        # checkpoint with half its files under its name.
        doomed = self.path / f"{DOOMED_PREFIX}{name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(self.path / name, doomed)
        shutil.rmtree(doomed)

    def download_file(self, relative: str, into: Path) -> Path:
        source = self.path / relative
        destination = into / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, destination)
        except FileNotFoundError:
            raise ManifestMismatch(f"{relative} is missing") from None
        return destination


@dataclasses.dataclass(frozen=True)
class HubTarget:
    """A Hub model repository (HF_ENDPOINT and HF_TOKEN are read when it is used)."""
    repo_id: str

    def __str__(self):
        return f"{HUB_SCHEME}{self.repo_id}"

    def api(self):
        from huggingface_hub import HfApi
        QUIET_HUB_LOGS.attach()
        # HF_ENDPOINT as it is now: huggingface_hub itself reads it once, when imported.
        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)

    def prepare(self, say) -> None:
        from huggingface_hub.utils import disable_progress_bars
        # The client's own upload bars, drawn from this thread, would garble the trainer's.
        disable_progress_bars()
        api = self.api()
        api.create_repo(self.repo_id, private=True, exist_ok=True)
        if not getattr(api.repo_info(self.repo_id), "private", True):
            say(f"warning: mirror {self}: the repository is public, so anyone can download these checkpoints")

    def complete_names(self) -> list[str]:
        from huggingface_hub.utils import RepositoryNotFoundError
        api = self.api()
        try:
            paths = api.list_repo_files(self.repo_id)
        except RepositoryNotFoundError:
            if hub_token() is None:
                raise MirrorError(f"mirror {self}: not found, and no Hugging Face token is set (HF_TOKEN or "
                                  f"`hf auth login`): a private repository can't be read without one") from None
            return []
        names = {path.split("/")[0] for path in paths
                 if path.count("/") == 1 and path.endswith("/" + MANIFEST_FILE)
                 and NAME_PATTERN.match(path.split("/")[0])}
        return sorted(names, key=name_order)

    def put(self, snapshot: Path, name: str, manifest: dict, links: dict, progress, stopping) -> None:
        from huggingface_hub import CommitOperationAdd
        # One commit: the Hub applies it whole or not at all, so the manifest is never
        # there without every file it lists.
        operations = [CommitOperationAdd(f"{name}/{file_name}", str(snapshot / file_name))
                      for file_name in manifest["files"]]
        operations.append(CommitOperationAdd(f"{name}/{MANIFEST_FILE}", _json_bytes(manifest)))
        operations.append(CommitOperationAdd(LINKS_FILE, _json_bytes(links)))
        self.api().create_commit(self.repo_id, operations, commit_message=f"Checkpoint {name}")
        progress(sum(entry["size"] for entry in manifest["files"].values()))

    def remove(self, names) -> None:
        from huggingface_hub import CommitOperationDelete
        operations = [CommitOperationDelete(f"{name}/", is_folder=True) for name in names]
        self.api().create_commit(self.repo_id, operations,
                                 commit_message=f"Prune checkpoints {', '.join(names)}")

    def download_file(self, relative: str, into: Path) -> Path:
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
        try:
            return Path(self.api().hf_hub_download(self.repo_id, relative, local_dir=into))
        except LocalEntryNotFoundError:
            raise   # the Hub could not be reached (the client's name for it): retried
        except EntryNotFoundError:
            raise ManifestMismatch(f"{relative} is missing") from None


class _QuietThreads(logging.Filter):
    """Drops log records from the threads that talk to the Hub for the mirror: the
    client logs each of its own retries ("Retrying in 1s [Retry 1/5]."), which would land
    in the middle of the trainer's progress bar, and the mirror says what failed in one
    line of its own."""

    def __init__(self):
        super().__init__()
        self.threads = set()

    def filter(self, record):
        return record.thread not in self.threads

    def attach(self):
        # huggingface_hub prints through a handler of its own (made when it is imported),
        # and through the root logger's where logging is configured.
        for handler in logging.getLogger("huggingface_hub").handlers + logging.getLogger().handlers:
            if self not in handler.filters:
                handler.addFilter(self)

    @contextlib.contextmanager
    def in_this_thread(self):
        thread = threading.get_ident()
        self.threads.add(thread)
        try:
            yield
        finally:
            self.threads.discard(thread)


QUIET_HUB_LOGS = _QuietThreads()


def hub_token():
    from huggingface_hub import get_token
    return get_token()


def as_target(target):
    """A parsed target as it is; a string (or path) parsed."""
    if isinstance(target, (DirectoryTarget, HubTarget)):
        return target
    return parse_target(str(target))


def reason_of(error: BaseException) -> str:
    """An error in one line: the file and what the system said, or the client's first line."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    if isinstance(error, click.ClickException):
        return error.format_message()
    return safe_files.first_line(error)


def make_manifest(snapshot: Path, name: str, stopping) -> dict:
    files = {}
    for path in sorted(snapshot.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files[path.name] = {"size": path.stat().st_size, "sha256": hash_file(path, stopping)}
    return {"checkpoint": name, "files": files}
