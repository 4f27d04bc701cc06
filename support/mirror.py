"""Checkpoints mirrored off the machine: to a directory on other storage, or to a
private Hugging Face Hub model repository.

A cloud instance's local disk goes when the instance is terminated, and every
checkpoint on it. train.json's `checkpoint_mirror` names where copies go:

    "/mnt/persistent/my-run"   a directory (a network or persistent file system)
    "hf://OWNER/NAME"          a Hub model repository, created private if missing

Either way the mirror holds one directory per checkpoint, under the checkpoint's own
name, and a small links.json:

    MIRROR/20251209Z143355-iteration-1000/
        model.safetensors  optimizer.pt  scaler.pt  rng_state.pt  meta.json
        manifest.json      every other file's name, size and sha256; written last
    MIRROR/links.json      {"latest": NAME, "best": NAME}: what the links pointed at

A mirrored checkpoint counts only once its manifest is there. A directory mirror
copies into a hidden `.partial-NAME`, syncs it, writes the manifest, and renames it
into place; the Hub gets the files, the manifest and links.json in one commit, which
the Hub applies whole or not at all. So a copy killed halfway never looks complete.

The training loop never waits for a copy. Global rank 0 hands each checkpoint over
right after saving it; the hand-over makes a snapshot of it, hard links in the hidden
queue `checkpoints/.mirror-queue/NAME/` (a copy where the file system refuses hard
links), so that keep_checkpoints may delete the checkpoint before the copy has run.
A background thread copies the snapshots one by one, oldest first, and removes each
once it is mirrored (or given up on). A failure is retried with exponential backoff,
each failure one line through the caller's `say`; after the last try that checkpoint
is given up, and the next one is tried. After each copy, mirrored checkpoints beyond
keep_checkpoints are deleted oldest first, never the one `best` points at.

Snapshots still queued when the process dies (Ctrl-C, SIGTERM, SIGKILL, a crash) stay
in the queue, and the next CheckpointMirror on that checkpoints directory copies them
first. On a fresh machine, fetch_newest brings the newest complete mirrored
checkpoint back, every file checked against its manifest.

Light on purpose (no torch): the copying process of the tests imports only this.
"""

import collections
import dataclasses
import json
import os
import shutil
import sys
import threading
import time

from pathlib import Path


from . import safe_files
from .mirror_targets import (CopyStopped, FIRST_DELAY, HANDOVER_FILE, HubTarget, LINKS_FILE, MANIFEST_FILE,
                             ManifestMismatch, MirrorError, NAME_PATTERN, PARTIAL_PREFIX, QUEUE_DIR,
                             QUIET_HUB_LOGS, TRIES, as_target, hash_file, hub_token, make_manifest,
                             name_order, reason_of, say_on_stderr)


# --- copying in the background ---

@dataclasses.dataclass
class _Handover:
    name: str
    snapshot: Path
    best: str | None
    size: int
    manifest: dict | None = None   # worked out at the first try, kept for the retries


class CheckpointMirror:
    """Copies checkpoints to a mirror in a background thread. Global rank 0 makes one
    after the run's checkpoints directory is ready; other ranks make none.

        mirror = CheckpointMirror(target, checkpoints_dir, keep=keep_checkpoints, say=progress.write)
        mirror.hand_over(saved.path, best_name)   # after each save_checkpoint; returns at once
        missing = mirror.wait()                   # at the end: names not mirrored
        mirror.stop()                             # being killed: stop copying now

    `say` gets one line at a time (failures start with "warning:"), from the copying thread.
    """

    def __init__(self, target, checkpoints_dir, *, keep: int | None = None, say=say_on_stderr,
                 tries: int = TRIES, first_delay: float = FIRST_DELAY):
        self.target = as_target(target)
        self.checkpoints_dir = Path(checkpoints_dir)
        self.queue_dir = self.checkpoints_dir / QUEUE_DIR
        self.keep, self.say, self.tries, self.first_delay = keep, say, tries, first_delay
        self._changed = threading.Condition()
        self._waiting = collections.deque()   # _Handover, oldest first
        self._busy = None                     # the _Handover being copied
        self._busy_bytes = 0                  # of it, copied by the current try
        self._finished_bytes = 0              # of every hand-over done with (mirrored or not)
        self._not_mirrored = []               # names given up on
        self._stopping = threading.Event()
        self._prepared = False
        self._hard_links = True
        if isinstance(self.target, HubTarget) and hub_token() is None:
            say(f"warning: mirror {self.target}: no Hugging Face token is set (HF_TOKEN or `hf auth login`); "
                f"uploads will fail")
        try:
            self._queue_leftovers()
        except OSError as error:
            say(f"warning: mirror {self.target}: could not read what earlier runs left in "
                f"{self.queue_dir} ({reason_of(error)}); it is not copied")
        # A daemon: an interpreter that exits (a crash, Ctrl-C) is not held up by a copy;
        # what it had not copied stays queued for the next start.
        self._thread = threading.Thread(target=self._copy_all, name="checkpoint-mirror", daemon=True)
        self._thread.start()

    # --- the training thread's side ---

    def hand_over(self, checkpoint_dir, best_name: str | None = None) -> None:
        """Queue a complete checkpoint directory for copying. best_name is the checkpoint
        `best` points at now (kept by the mirror's pruning). Never raises for a failure
        of the disk: that is a warning, and the checkpoint is not mirrored."""
        checkpoint_dir = Path(checkpoint_dir).resolve()   # `latest` is the checkpoint it points at
        name = checkpoint_dir.name
        if not NAME_PATTERN.match(name):
            raise ValueError(f"{checkpoint_dir} is not a checkpoint directory (like 20251209Z143355-iteration-1000)")
        if self._stopping.is_set():
            self._give_up_on(name)
            return
        try:
            handover = self._snapshot(checkpoint_dir, best_name)
        except OSError as error:
            self.say(f"warning: mirror {self.target}: could not queue {name} for copying "
                     f"({reason_of(error)}); it will not be mirrored")
            self._give_up_on(name)
            return
        if handover is None:
            return  # handed over before
        with self._changed:
            self._waiting.append(handover)
            backlog = len(self._waiting)
            self._changed.notify_all()
        if backlog >= 3:
            self.say(f"warning: mirror {self.target}: {backlog} checkpoints are waiting to be copied; "
                     f"copying is slower than checkpoints are written")

    def _give_up_on(self, name: str) -> None:
        with self._changed:
            self._not_mirrored.append(name)

    def _snapshot(self, checkpoint_dir: Path, best_name) -> _Handover | None:
        """Hard links (or copies) of the checkpoint's files in the queue, which pruning
        can't remove; made under a hidden name and renamed, as checkpoints are."""
        name = checkpoint_dir.name
        final = self.queue_dir / name
        if final.exists():
            return None
        self.queue_dir.mkdir(exist_ok=True)
        partial = self.queue_dir / f"{PARTIAL_PREFIX}{name}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            size = self._link_or_copy_files(checkpoint_dir, partial)
            (partial / HANDOVER_FILE).write_text(json.dumps({"best": best_name}), encoding="utf-8")
            os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)   # a failed snapshot holds no disk
        return _Handover(name, final, best_name, size)

    def _link_or_copy_files(self, checkpoint_dir: Path, snapshot: Path) -> int:
        size = 0
        for source in sorted(checkpoint_dir.iterdir()):
            if not source.is_file() or source.name.startswith("."):
                continue
            size += source.stat().st_size
            if self._hard_links:
                try:
                    os.link(source, snapshot / source.name)
                    continue
                except OSError as error:
                    self._hard_links = False
                    self.say(f"warning: mirror {self.target}: {self.queue_dir} refuses hard links "
                             f"({reason_of(error)}); checkpoints are copied there for the mirror, which "
                             f"holds training up while they are")
            shutil.copyfile(source, snapshot / source.name)
        return size

    def _queue_leftovers(self) -> None:
        """Queue again what an earlier process handed over and did not get to copy."""
        if not self.queue_dir.is_dir():
            return
        found = []
        for entry in self.queue_dir.iterdir():
            if entry.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
            elif NAME_PATTERN.match(entry.name) and entry.is_dir():
                try:
                    best = json.loads((entry / HANDOVER_FILE).read_text(encoding="utf-8")).get("best")
                except (OSError, ValueError, AttributeError):
                    best = None
                size = sum(path.stat().st_size for path in entry.iterdir()
                           if path.is_file() and not path.name.startswith("."))
                found.append(_Handover(entry.name, entry, best, size))
        found.sort(key=lambda handover: name_order(handover.name))
        self._waiting.extend(found)
        if found:
            self.say(f"mirror {self.target}: copying {len(found)} checkpoint(s) an earlier run left "
                     f"waiting: {', '.join(handover.name for handover in found)}")

    def wait(self, show_progress: bool = True) -> list[str]:
        """Wait until every checkpoint handed over is mirrored or given up, with a bar of
        the bytes copied (plain lines when stderr is no terminal). Returns the names that
        did not get there, oldest first."""
        from tqdm import tqdm

        with self._changed:
            pending = list(self._waiting) + ([self._busy] if self._busy else [])
            total = sum(handover.size for handover in pending) - self._busy_bytes
            start = self._finished_bytes + self._busy_bytes
        interactive = show_progress and sys.stderr.isatty()
        if pending and show_progress and not interactive:
            self.say(f"mirror {self.target}: waiting for {len(pending)} checkpoint(s) to be copied")
        bar = tqdm(total=total, unit="B", unit_scale=True, dynamic_ncols=True, leave=False,
                   desc=f"mirroring to {self.target}", disable=not (interactive and pending))
        with bar:
            while True:
                with self._changed:
                    done = not self._waiting and self._busy is None
                    if not done:
                        self._changed.wait(0.2)
                    copied = self._finished_bytes + self._busy_bytes - start
                bar.n = max(0, min(copied, total))
                bar.refresh()
                if done or not self._thread.is_alive():
                    break
        return self.not_mirrored()

    def stop(self) -> list[str]:
        """Stop copying now (the process is being killed): the copy under way stops at its
        next chunk (an upload to the Hub can't be cut short: the thread is a daemon, and
        dies with the process); what was not copied stays queued for the next start.
        Returns the names not mirrored."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=1.0)
        return self.not_mirrored()

    def not_mirrored(self) -> list[str]:
        with self._changed:
            names = self._not_mirrored + [handover.name for handover in self._waiting]
            if self._busy is not None:
                names.append(self._busy.name)
        return sorted(set(names), key=name_order)

    # --- the copying thread ---

    def _copy_all(self) -> None:
        with QUIET_HUB_LOGS.in_this_thread():
            self._copy_until_stopped()

    def _copy_until_stopped(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._stopping.is_set():
                    self._changed.wait()
                if self._stopping.is_set():
                    return
                handover = self._busy = self._waiting.popleft()
            mirrored = self._copy_with_retries(handover)
            if self._stopping.is_set():
                return   # the snapshot stays queued for the next start
            shutil.rmtree(handover.snapshot, ignore_errors=True)
            with self._changed:
                if not mirrored:
                    self._not_mirrored.append(handover.name)
                self._busy, self._busy_bytes = None, 0
                self._finished_bytes += handover.size
                self._changed.notify_all()

    def _copy_with_retries(self, handover: _Handover) -> bool:
        for attempt in range(1, self.tries + 1):
            try:
                self._copy(handover)
                return True
            except CopyStopped:
                return False
            except Exception as error:  # whatever storage or network does, never into training
                if attempt == self.tries:
                    self.say(f"warning: mirror {self.target}: gave up on {handover.name} after {self.tries} "
                             f"tries ({reason_of(error)}); it is not mirrored")
                    return False
                delay = self.first_delay * 2 ** (attempt - 1)
                self.say(f"warning: mirror {self.target}: could not copy {handover.name} "
                         f"({reason_of(error)}); try {attempt + 1} of {self.tries} in {delay:g} s")
                if self._stopping.wait(delay):
                    return False
        return False

    def _copy(self, handover: _Handover) -> None:
        with self._changed:
            self._busy_bytes = 0
        if not self._prepared:
            self.target.prepare(self.say)
            self._prepared = True
        if handover.manifest is None:
            handover.manifest = make_manifest(handover.snapshot, handover.name, self._stopping.is_set)
        links = {"latest": handover.name, "best": handover.best}
        self.target.put(handover.snapshot, handover.name, handover.manifest, links,
                        self._count_bytes, self._stopping.is_set)
        if self.keep is not None:
            self._prune(handover)

    def _count_bytes(self, count: int) -> None:
        with self._changed:
            self._busy_bytes += count

    def _prune(self, handover: _Handover) -> None:
        """Delete the oldest mirrored checkpoints beyond keep (as keep_checkpoints does
        locally), never the one `best` points at nor the one just copied. A failure here
        is a warning: the copy itself is done."""
        try:
            names = self.target.complete_names()
            protected = {handover.best, handover.name}
            doomed = [name for name in names[:max(0, len(names) - self.keep)] if name not in protected]
            if doomed:
                self.target.remove(doomed)
        except Exception as error:  # as for copies: never into training
            self.say(f"warning: mirror {self.target}: could not delete old mirrored checkpoints "
                     f"({reason_of(error)}); tried again after the next copy")


# --- fetching on a fresh machine ---

def fetch_newest(target, checkpoints_dir, *, say=say_on_stderr, tries: int = TRIES,
                 first_delay: float = FIRST_DELAY) -> Path | None:
    """Bring the newest complete mirrored checkpoint into an empty checkpoints directory
    and point `latest` (and `best`, when the mirror says which and it passes its checks
    too) at it. Every file is checked against the manifest (size and sha256); one that
    fails says so in one line, and the checkpoint before it is tried. Returns the
    checkpoint's directory, or None when the mirror holds none.

    Raises MirrorError when the mirror can't be read (after `tries`), when none of its
    checkpoints passes its checks, or when checkpoints_dir already holds checkpoints:
    a run that started fresh instead would later prune the mirror's good ones."""
    with QUIET_HUB_LOGS.in_this_thread():
        return _fetch_newest(as_target(target), Path(checkpoints_dir), say, tries, first_delay)


def _fetch_newest(target, checkpoints_dir: Path, say, tries: int, first_delay: float) -> Path | None:
    # Not at the top: it brings torch, which the copying side does without.
    from .checkpointing import list_checkpoints, point_link
    from .safe_files import format_bytes

    local = list_checkpoints(checkpoints_dir)
    if local:
        raise MirrorError(f"{checkpoints_dir} already holds {len(local)} checkpoint(s), newest "
                          f"{local[-1].name}: fetching from mirror {target} is for an empty one")
    retrying = _Retrying(target, say, tries, first_delay)
    names = retrying.run("list the mirrored checkpoints", target.complete_names)
    if not names:
        return None
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    links = _read_links(target, checkpoints_dir, retrying)
    fetched, failed = None, set()
    for position in range(len(names) - 1, -1, -1):
        name = names[position]
        problem = _fetch_one(target, name, checkpoints_dir, retrying, say, format_bytes)
        if problem is None:
            fetched = name
            break
        failed.add(name)
        instead = f"fetching {names[position - 1]} instead" if position > 0 else "no checkpoint before it"
        say(f"warning: mirror {target}: {name}: {problem}; {instead}")
    if fetched is None:
        raise MirrorError(f"mirror {target}: none of its {len(names)} checkpoint(s) matches its manifest; "
                          f"nothing was fetched")
    point_link(checkpoints_dir, "latest", fetched)
    best = links.get("best")
    if best == fetched:
        point_link(checkpoints_dir, "best", best)
    elif isinstance(best, str) and best in names and best not in failed:
        problem = _fetch_one(target, best, checkpoints_dir, retrying, say, format_bytes)
        if problem is None:
            point_link(checkpoints_dir, "best", best)
        else:
            say(f"warning: mirror {target}: {best} (best): {problem}; `best` is left unset")
    return checkpoints_dir / fetched


class _Retrying:
    """Runs a step of fetching, retried with backoff on what the storage or network does
    (a line for each failure); a checkpoint that fails its checks is no retry."""

    def __init__(self, target, say, tries, first_delay):
        self.target, self.say, self.tries, self.first_delay = target, say, tries, first_delay

    def run(self, what: str, action, *arguments):
        for attempt in range(1, self.tries + 1):
            try:
                return action(*arguments)
            except (ManifestMismatch, MirrorError):
                raise
            except Exception as error:  # storage or network: retried, then one line
                if attempt == self.tries:
                    raise MirrorError(f"mirror {self.target}: could not {what} after {self.tries} tries "
                                      f"({reason_of(error)})") from None
                delay = self.first_delay * 2 ** (attempt - 1)
                self.say(f"warning: mirror {self.target}: could not {what} ({reason_of(error)}); "
                         f"try {attempt + 1} of {self.tries} in {delay:g} s")
                time.sleep(delay)


def _read_links(target, checkpoints_dir: Path, retrying: _Retrying) -> dict:
    """links.json, or {} where it is missing or unreadable (then `best` is not restored)."""
    scratch = checkpoints_dir / f"{PARTIAL_PREFIX}links"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        path = retrying.run(f"download {LINKS_FILE}", target.download_file, LINKS_FILE, scratch)
        links = json.loads(path.read_text(encoding="utf-8"))
        return links if isinstance(links, dict) else {}
    except (ManifestMismatch, OSError, ValueError):
        return {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fetch_one(target, name: str, checkpoints_dir: Path, retrying: _Retrying, say, format_bytes) -> str | None:
    """Download checkpoint `name` into a hidden directory, check every file against its
    manifest, and rename it into checkpoints_dir. Returns what is wrong with it, or None."""
    staging = checkpoints_dir / f"{PARTIAL_PREFIX}{name}"   # removed at the next start if left
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        path = retrying.run(f"download {name}/{MANIFEST_FILE}", target.download_file,
                            f"{name}/{MANIFEST_FILE}", staging)
        files = _manifest_files(path)
        say(f"mirror {target}: fetching {name} ({format_bytes(sum(entry['size'] for entry in files.values()))})")
        for file_name in files:
            retrying.run(f"download {name}/{file_name}", target.download_file, f"{name}/{file_name}", staging)
        downloaded = staging / name
        problem = _check_files(downloaded, files)
        if problem is not None:
            return problem
        (downloaded / MANIFEST_FILE).unlink()   # the local layout is checkpointing's
        for file_name in files:
            safe_files.fsync_file(downloaded / file_name)
        safe_files.fsync_dir(downloaded)
        os.rename(downloaded, checkpoints_dir / name)
        safe_files.fsync_dir(checkpoints_dir)
        return None
    except ManifestMismatch as mismatch:
        return str(mismatch)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _manifest_files(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        for file_name, entry in files.items():
            if "/" in file_name or file_name.startswith(".") or file_name == MANIFEST_FILE:
                raise ValueError(file_name)
            if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
                raise ValueError(file_name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ManifestMismatch(f"{MANIFEST_FILE} is not a manifest") from None
    return files


def _check_files(directory: Path, files: dict) -> str | None:
    for file_name, expected in files.items():
        path = directory / file_name
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{file_name} has {size} bytes, its manifest says {expected['size']}"
        digest = hash_file(path)
        if digest != expected["sha256"]:
            return (f"{file_name} does not match its manifest (sha256 {digest[:12]}..., "
                    f"expected {expected['sha256'][:12]}...)")
    return None
