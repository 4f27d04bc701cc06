"""Writing files so that a crash never leaves half of one under its final name.

Every writer here follows the same few rules:
  - write under a hidden temporary name beside the target, then rename it into place:
    a rename within one directory is atomic, so a reader sees the old file or the new
    one, whole, and a killed process leaves at most a hidden leftover;
  - sync the data before the rename, and the directory after it where the new name
    must survive a power cut;
  - files and directories get the permissions open() and mkdir() would give them
    (0o666 and 0o777 less the umask), even where tempfile or safetensors make them
    owner-only: a server run by another user must be able to read our output.

Also here: the run lock (one trainer per run directory) and the one-line reason a write
failed (a full disk above all).

Light on purpose (no torch, nothing of ours): every script can use it.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import click

# The umask can only be read by setting it, which would race with threads creating
# files: read it once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_usual_permissions(path) -> None:
    """For what tempfile or safetensors made owner-only: our output is as readable as
    what open() and mkdir() make."""
    full_access = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, full_access & ~_UMASK)


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    # A rename or a new directory entry is only durable once its directory is synced.
    fsync_file(path)


def flush_to_disk(file) -> None:
    """Push an open file's writes through Python's buffer and the OS's cache to the disk."""
    file.flush()
    os.fsync(file.fileno())


def hidden_temporary(path, suffix: str) -> Path:
    """Where path is written until it is complete: beside it, so that a rename moves it in
    (same file system), hidden, and named after this process, so that a leftover can be
    told from the work of a process still running."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{suffix}")


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path to write path's new content to; when the block succeeds,
    that file is synced and renamed over path. Made for writers that want a path of
    their own (savefig, say). A failure removes the temporary and leaves path as it was."""
    path = Path(path)
    temporary = hidden_temporary(path, "tmp")
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path, content: bytes | str) -> None:
    """Replace path's content in one step (text as UTF-8): an interrupted write never
    leaves half a file."""
    with replacing(path) as temporary:
        if isinstance(content, str):
            temporary.write_text(content, encoding="utf-8")
        else:
            temporary.write_bytes(content)


def replace_directory(new, old) -> None:
    """Put the complete directory `new` in the place of `old` (which may not exist yet).

    A directory can't be renamed over a non-empty one, so the old one is renamed out of
    the way first and removed last: a crash in between leaves it hidden beside the new
    one, never a mix of the two.
    """
    new, old = Path(new), Path(old)
    if not old.exists():
        os.replace(new, old)
        return
    aside = hidden_temporary(old, "replaced")
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)


# --- output directories of the command-line scripts ---

def refuse_to_overwrite(output_dir, names, overwrite):
    """Raise unless none of `names` exists in output_dir (or overwrite is set)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise click.ClickException(f"{output_dir}: exists and is not a directory")
    # A file further up (OUTPUT_DIR under a file) would only show when the output is
    # created, after the download and conversion: check now.
    for parent in output_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise click.ClickException(f"{output_dir}: {parent} is not a directory")
            break
    if overwrite:
        return
    existing = [name for name in names if (output_dir / name).exists()]
    if existing:
        raise click.ClickException(
            f"{output_dir / existing[0]} already exists; pass --overwrite to replace it"
        )


@contextlib.contextmanager
def staged_output(output_dir):
    """Yield an empty staging directory; when the block succeeds, move its files into output_dir.

    Until then nothing exists under the final names, so a failure or Ctrl-C leaves
    output_dir as it was. A new output_dir appears in one rename; into an existing one
    each file is moved with an atomic replace (same file system: the staging directory
    is a sibling).
    """
    output_dir = Path(output_dir).resolve()
    # Staged beside output_dir, not in it: a leftover from a killed process must never
    # end up inside an export (and so on the Hub with the next push).
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial",
                                        dir=output_dir.parent))
    except OSError as error:
        raise click.ClickException(
            f"cannot create directory {error.filename or output_dir}: {error.strerror}") from None
    give_usual_permissions(staging)  # mkdtemp makes it 0700, safetensors its files 0600
    try:
        yield staging
        for path in staging.iterdir():
            give_usual_permissions(path)
        if not output_dir.exists():
            os.rename(staging, output_dir)
        else:
            for path in sorted(staging.iterdir()):
                os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def first_line(error: BaseException) -> str:
    """An exception as one line, for errors from libraries whose messages run long: a
    script's error is one line on stderr."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# --- one trainer per run ---

LOCK_FILE = ".training.lock"


def lock_run(run_dir):
    """Hold run_dir's lock for as long as the returned file stays open: the trainer's
    global rank 0 does, for the whole run. Two trainers in one run directory (a resume
    started beside a job still running, or its orphaned ranks) would write a checkpoint
    each for every step and flip best and latest between them. The kernel releases the
    lock when the process dies, so a crash never leaves a stale one."""
    path = Path(run_dir) / LOCK_FILE
    try:
        file = open(path, "a+", encoding="utf-8")
    except OSError as error:
        raise click.ClickException(f"{path}: cannot open the run's lock file ({error.strerror})") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise click.ClickException(f"{run_dir} is being trained by {holder}; two trainers would write "
                              f"over each other's checkpoints: stop that one first") from None
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {socket.gethostname()}, "
               f"started {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
    file.flush()
    return file


# --- a write that failed: saying why in one line ---

def format_bytes(count: int) -> str:
    """12874304 -> '12.9 MB' (decimal units, as df -H and file managers show them)."""
    if count < 1000:
        return f"{count} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if round(count / scale, 1) < 1000:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e12:.1f} TB"


# errno values that mean the write did not fit, and how to say so
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError with an errno behind an error: torch's zip writer raises its own
    RuntimeError ("unexpected pos ...") with the OSError of the failed write as context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def _errno_of(error: BaseException) -> int | None:
    os_error = _os_error_in(error)
    if os_error is not None:
        return os_error.errno
    # safetensors writes from Rust: "I/O error: No space left on device (os error 28)".
    found = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(error))
    return int(found[1] or found[2]) if found else None


def free_bytes(path) -> int:
    """Free bytes on the file system that holds path (or would: its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def write_failure(directory: Path, what: str, error: BaseException, file=None, needed: int = 0) -> str:
    """One line saying why writing `what` into directory failed: for a full disk (or a
    full quota) how much it needs and how much is free, whichever layer hit it
    (safetensors, torch's zip writer, json); else what the system said, naming `file`.
    Call it after removing what the failed write left: the free space is a retry's."""
    code = _errno_of(error)
    free = free_bytes(directory)
    # An error with no errno anywhere (a writer that lost it) is a full disk when the
    # write does not fit in what is free.
    if code in _NO_SPACE or (code is None and free < needed):
        reason = _NO_SPACE.get(code, _NO_SPACE[errno.ENOSPC])
        return f"{directory}: {reason} for {what} (needs about {format_bytes(needed)}, {format_bytes(free)} free)"
    # What the system said ("File too large"), not the writer's wrapping of it.
    detail = os.strerror(code) if code is not None else first_line(error)
    if file is not None:
        detail = f"{file}: {detail}"
    return f"{directory}: could not write {what} ({detail})"
