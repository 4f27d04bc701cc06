"""Download FineWeb / FineWeb-Edu sample parquet files from the Hugging Face Hub.

    uv run python download-fineweb-10b.py

does what the seed's script did: fetches sample/10BT/* of the dataset repos
HuggingFaceFW/fineweb-edu into ./fineweb-edu/ and HuggingFaceFW/fineweb into ./fineweb/,
printing how long each took. Options pick the dataset(s), the sample (10BT, 100BT, 350BT)
and where the folders go.

Downloads go through huggingface_hub's snapshot_download, which authenticates with
HF_TOKEN or your `hf auth login` token (never printed) and writes each file under a
temporary name before moving it into place. Files already complete are not fetched
again, so after an interruption (Ctrl-C, a dropped connection) the same command picks up
where it stopped; only the files that were mid-transfer start over.
"""

import os
import signal
import sys
import threading
import time
from fnmatch import fnmatch
from pathlib import Path

import click

from support import safe_files

DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
SAMPLES = ("10BT", "100BT", "350BT")


class DownloadError(click.ClickException):
    """A download that could not start or finish; one line on stderr, exit 1."""


def _size(count: int) -> str:
    return f"{count / 1e9:,.2f} GB" if count >= 1e9 else f"{count / 1e6:,.1f} MB"


def _remove_partial_downloads(local_dir: Path):
    # snapshot_download keeps in-progress files under local_dir/.cache/huggingface/download,
    # named uniquely per attempt, so a later run can't reuse them: don't leave them behind.
    for partial in (local_dir / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        partial.unlink(missing_ok=True)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def download_sample(repo_id: str, local_dir: Path, pattern: str, max_workers: int):
    """Fetch the files of `repo_id` matching `pattern` into local_dir; returns (files, bytes)."""
    # Imported here so that HF_ENDPOINT and friends are read at run time, not --help time.
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

    api = HfApi()
    folder = pattern.rsplit("/", 1)[0]
    try:
        commit = api.dataset_info(repo_id).sha
        wanted = [entry for entry in api.list_repo_tree(repo_id, path_in_repo=folder, repo_type="dataset",
                                                        revision=commit)
                  if fnmatch(entry.path, pattern) and hasattr(entry, "size")]
    except RepositoryNotFoundError:
        raise DownloadError(
            f"dataset {repo_id} not found on {constants.ENDPOINT}, or it is private or gated "
            f"and your token may not read it (set HF_TOKEN or run `hf auth login`)"
        ) from None
    except EntryNotFoundError:
        wanted = []
    except Exception as error:  # DNS, refused connection, timeout, TLS, server error...
        raise DownloadError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
                            f"({safe_files.first_line(error)})") from None
    if not wanted:
        raise DownloadError(f"dataset {repo_id} has no files matching {pattern}")

    # snapshot_download runs its transfers in threads that Ctrl-C cannot stop, so it runs
    # in a thread of its own and this one waits, ready to act on Ctrl-C straight away.
    outcome = {}

    def work():
        try:
            snapshot_download(repo_id=repo_id, repo_type="dataset", revision=commit,
                              local_dir=local_dir, allow_patterns=pattern, max_workers=max_workers)
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=work, name="snapshot_download", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        _remove_partial_downloads(local_dir)
        # A fresh line: huggingface_hub's progress bar is left mid-line.
        click.echo(f"\nInterrupted: files already complete in {local_dir} are kept; run the same "
                   f"command again to fetch the rest", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # the transfer threads can't be joined quickly; leave without them
    if "error" in outcome:
        raise DownloadError(f"downloading {repo_id} into {local_dir} failed "
                            f"({safe_files.first_line(outcome['error'])}); "
                            f"run the same command again to continue") from None
    return len(wanted), sum(entry.size or 0 for entry in wanted)


@click.command()
@click.option("--dataset", "datasets", type=click.Choice(list(DATASETS)), multiple=True,
              default=tuple(DATASETS), show_default=True,
              help="Which dataset to fetch; repeat the option for several.")
@click.option("--sample", type=click.Choice(SAMPLES), default="10BT", show_default=True,
              help="Which sample folder: sample/<SAMPLE>/ of the repo.")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory under which each dataset gets its own folder.")
@click.option("--max-workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Files downloaded at once.")
def main(datasets, sample, dest, max_workers):
    """Download sample/<SAMPLE>/*.parquet of FineWeb-Edu and FineWeb into DEST/<dataset>/."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    pattern = f"sample/{sample}/*"
    for name in dict.fromkeys(datasets):  # in the order given, each once
        repo_id, local_dir = DATASETS[name], dest / name
        started = time.time()
        files, size = download_sample(repo_id, local_dir, pattern, max_workers)
        elapsed = time.time() - started
        print(f"Downloaded {repo_id} {pattern} ({files} file(s), {_size(size)}) to "
              f"{local_dir} in {elapsed:,.1f} seconds")


if __name__ == "__main__":
    main()
