"""Turn FineWeb-style parquet into GPT-2 token files, as the seed's prepare_datasets.py did.

    uv run python prepare_datasets.py INPUT_DATASET_DIR OUTPUT_DATASET_DIR

reads INPUT_DATASET_DIR/sample/10BT/*.parquet and writes OUTPUT_DATASET_DIR/train.safetensors
and OUTPUT_DATASET_DIR/validation.safetensors, each holding one 1-D uint16 tensor, `tokens`.

The numbers are the seed's, token for token: documents in file-name order, then row order;
the first 99% of documents (rounded as Hugging Face datasets rounds "train[:99%]") are the
train split, the rest validation; every document is GPT-2 encoded with the special
<|endoftext|> allowed (so that literal text in a document becomes token 50256, as in the
seed) and followed by one <|endoftext|> token.

What is different is the cost. The seed held every token of a split in Python lists and
tensors at once (tens of GB for 10B tokens). Here the parquet files are streamed in record
batches, worker processes tokenize them, and the tokens go straight to disk in order, so
memory stays flat however big the corpus is. Output appears under its final names only
when it is complete; until then it lives in hidden temporary files next to them.
"""

import glob
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import click

from support import tokenizer
from support.command_line import answer_usage_first

START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
SPLITS = ("train", "validation")
DEFAULT_FILES = "sample/10BT/*.parquet"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@click.command()
@click.argument("input_dataset_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output_dataset_dir", type=click.Path(path_type=Path))
@click.option("--files", "files_pattern", default=DEFAULT_FILES, show_default=True,
              help="Which parquet files to read: a glob relative to INPUT_DATASET_DIR "
                   "(** matches any depth).")
@click.option("--text-column", default="text", show_default=True,
              help="The parquet column holding each document's text.")
@click.option("--workers", type=click.IntRange(min=1), default=usable_cpus(), show_default="all cores",
              help="Tokenizer processes.")
@click.option("--batch-documents", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Documents per unit of work handed to a tokenizer process.")
@click.option("--force", is_flag=True,
              help="Replace train.safetensors / validation.safetensors if they already exist "
                   "(only once the new ones are complete; nothing else is touched).")
def main(**arguments):
    """Tokenize INPUT_DATASET_DIR's parquet files into OUTPUT_DATASET_DIR/{train,validation}.safetensors."""
    prepare(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: numpy and pyarrow take a while to
# import, and --help or a mistyped option should answer at once.
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from tqdm import tqdm  # noqa: E402

from support.token_files import TokenFileWriter, token_dtype, train_document_count  # noqa: E402


# pyarrow's string types (string_view only exists in newer pyarrow).
TEXT_TYPE_CHECKS = [pa.types.is_string, pa.types.is_large_string,
                    *([pa.types.is_string_view] if hasattr(pa.types, "is_string_view") else [])]


class PrepareError(click.ClickException):
    """A user mistake or bad input; click prints it as one line and exits 1."""


def find_parquet_files(input_dir: Path, pattern: str) -> list[Path]:
    """The files matching `pattern` (relative to input_dir), sorted as datasets sorts data_files."""
    matches = glob.glob(os.path.join(str(input_dir), pattern), recursive=True)
    # datasets (through fsspec) sorts full paths as strings and skips hidden files.
    files = [Path(match) for match in sorted(matches)
             if os.path.isfile(match) and not os.path.basename(match).startswith(".")]
    if not files:
        raise PrepareError(f"no files match {os.path.join(str(input_dir), pattern)}")
    return files


def count_documents(files: list[Path], text_column: str) -> list[int]:
    """Rows per file from the parquet footers (no data read), checking the text column first."""
    counts = []
    for path in files:
        try:
            parquet_file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise PrepareError(f"{path}: not a readable parquet file ({error})") from None
        schema = parquet_file.schema_arrow
        if schema.get_field_index(text_column) == -1:
            raise PrepareError(
                f"{path}: no column '{text_column}' (columns: {', '.join(schema.names)}); "
                f"choose one with --text-column"
            )
        column_type = schema.field(text_column).type
        if not any(is_text(column_type) for is_text in TEXT_TYPE_CHECKS):
            raise PrepareError(f"{path}: column '{text_column}' holds {column_type}, not text")
        counts.append(parquet_file.metadata.num_rows)
    return counts


def document_batches(files, text_column, batch_documents, train_documents):
    """Yield (split, texts) in corpus order; no batch straddles the train/validation boundary."""
    first_document = 0  # index in the whole corpus of the next document
    for path in files:
        row = 0
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_documents,
                                                               columns=[text_column]):
            texts = record_batch.column(0)
            if texts.null_count:
                null_row = row + int(np.argmax(texts.is_null().to_numpy(zero_copy_only=False)))
                raise PrepareError(f"{path}: row {null_row} has no text (null in '{text_column}')")
            end = first_document + len(texts)
            if first_document < train_documents < end:
                cut = train_documents - first_document
                # concat_arrays copies the slice, so pickling sends only its own bytes.
                yield "train", pa.concat_arrays([texts.slice(0, cut)])
                yield "validation", pa.concat_arrays([texts.slice(cut)])
            else:
                yield ("train" if end <= train_documents else "validation"), texts
            first_document = end
            row += len(texts)


def encode_documents(texts: pa.Array) -> np.ndarray:
    """GPT-2 tokens of the documents, each followed by <|endoftext|>, as one uint16 array.

    One encode call over the documents joined with <|endoftext|> gives exactly the tokens of
    encoding them one by one: tiktoken cuts the text at every special token first and
    encodes the pieces between independently, and the separator cannot merge with a
    document's text into a different special token (its only "<" is its first character).
    """
    joined = tokenizer.END_OF_TEXT.join(texts.to_pylist()) + tokenizer.END_OF_TEXT
    ids = tokenizer.get_tokenizer().encode_to_numpy(joined, allowed_special={tokenizer.END_OF_TEXT})
    return ids.astype("<u2")


def remove_stale_partials(output_dir: Path):
    """Delete temporary files left by runs that were killed (their process is gone)."""
    for split in SPLITS:
        for path in output_dir.glob(f".{split}.safetensors.*.partial"):
            pid = path.name.split(".")[-2]
            if pid.isdigit() and not _process_exists(int(pid)):
                path.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would interrupt the process there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_worker():
    # Ctrl-C reaches the whole process group; the main process decides what to do about it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # If the main process is killed outright, nobody tells the workers, and they would wait
    # for work forever. Its sentinel becomes ready when it is gone: then go too.
    main_process = multiprocessing.parent_process()

    def exit_when_orphaned():
        multiprocessing.connection.wait([main_process.sentinel])
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def tokenize_corpus(files, text_column, writers, train_documents, total_documents, workers,
                    batch_documents):
    """Tokenize every document into the split writers, in order. Returns the token count."""
    pool = None
    if workers > 1:
        # Not fork: pyarrow and tqdm run threads in this process, and forking a process
        # with threads can deadlock the child. A fork server imports this module once and
        # forks the workers from that clean, single-threaded copy; spawn where there's none.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(START_METHOD),
                                   initializer=_start_worker)
    # A bounded queue of batches in flight keeps memory flat: the reader never runs ahead of
    # the writer by more than a couple of batches per worker.
    in_flight = deque()
    max_in_flight = 2 * workers if pool else 0
    progress = tqdm(total=total_documents, unit=" docs", unit_scale=True, dynamic_ncols=True,
                    desc="tokenizing")
    started = time.perf_counter()
    tokens_written = 0

    def write_oldest():
        nonlocal tokens_written
        split, document_count, result = in_flight.popleft()
        try:
            tokens = result.result() if pool else result
        except BrokenProcessPool:
            raise PrepareError("a tokenizer process died (killed, or out of memory?); "
                               "nothing was written") from None
        writers[split].write(tokens)
        tokens_written += len(tokens)
        rate = tokens_written / max(time.perf_counter() - started, 1e-9)
        progress.set_postfix_str(f"{tokens_written:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        progress.update(document_count)

    try:
        for split, texts in document_batches(files, text_column, batch_documents, train_documents):
            result = pool.submit(encode_documents, texts) if pool else encode_documents(texts)
            in_flight.append((split, len(texts), result))
            while len(in_flight) > max_in_flight:
                write_oldest()
        while in_flight:
            write_oldest()
    finally:
        progress.close()
        if pool:
            # On an error or Ctrl-C, batches still queued are not wanted; the ones being
            # tokenized finish (a second or so) and the workers exit.
            pool.shutdown(wait=True, cancel_futures=True)
    return tokens_written


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def prepare(input_dataset_dir, output_dataset_dir, files_pattern, text_column, workers,
            batch_documents, force):
    dtype = token_dtype(tokenizer.get_tokenizer().n_vocab)
    assert dtype == np.dtype("<u2")

    if output_dataset_dir.exists() and not output_dataset_dir.is_dir():
        raise PrepareError(f"{output_dataset_dir} exists and is not a directory")
    final_paths = {split: output_dataset_dir / f"{split}.safetensors" for split in SPLITS}
    existing = [path for path in final_paths.values() if path.exists()]
    if existing and not force:
        raise PrepareError(
            f"{existing[0]} already exists; pass --force to replace it (the existing files stay "
            f"until the new ones are complete)"
        )

    files = find_parquet_files(input_dataset_dir, files_pattern)
    counts = count_documents(files, text_column)
    total_documents = sum(counts)
    if total_documents == 0:
        raise PrepareError(f"the {len(files)} file(s) matching {files_pattern} hold no documents")
    train_documents = train_document_count(total_documents)
    print(f"{len(files)} parquet file(s), {total_documents:,} documents: {train_documents:,} for "
          f"train, {total_documents - train_documents:,} for validation; {workers} worker(s)")
    if train_documents == total_documents:
        click.echo(f"Warning: the validation split is empty: 99% of {total_documents} documents "
                   f"rounds to all of them", err=True)

    created_output_dir = not output_dataset_dir.exists()
    try:
        output_dataset_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PrepareError(f"cannot create directory {error.filename or output_dataset_dir}: "
                           f"{error.strerror}") from None
    remove_stale_partials(output_dataset_dir)
    # `kill` (SIGTERM) cleans up as Ctrl-C does.
    previous_sigterm_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    writers = {}
    started = time.perf_counter()
    try:
        for split in SPLITS:
            writers[split] = TokenFileWriter(final_paths[split])
        total_tokens = tokenize_corpus(files, text_column, writers, train_documents,
                                       total_documents, workers, batch_documents)
        if total_tokens == total_documents:
            # Each document is its tokens and one <|endoftext|>: these had no text at all.
            raise PrepareError(f"every one of the {total_documents:,} documents of {files_pattern} is empty "
                               f"(column '{text_column}'): nothing written; is --text-column the column "
                               f"of the texts?")
        for writer in writers.values():
            writer.finish()
        for writer in writers.values():
            writer.commit()
    except BaseException as error:
        for writer in writers.values():
            writer.discard()
        if created_output_dir and not any(output_dataset_dir.iterdir()):
            output_dataset_dir.rmdir()
        if isinstance(error, KeyboardInterrupt):
            click.echo(f"Interrupted: nothing was written to {output_dataset_dir}", err=True)
            sys.exit(130)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm_handler)

    elapsed = time.perf_counter() - started
    for split in SPLITS:
        print(f"{final_paths[split]}: {writers[split].count:,} tokens")
    print(f"{total_tokens:,} tokens in {elapsed:,.1f} s ({total_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")


if __name__ == "__main__":
    main()
