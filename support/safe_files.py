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

Light on purpose (no torch, nothing of ours): every script can use it.
"""

import contextlib
import os
import shutil
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
