"""Build a small FineWeb-shaped parquet corpus offline, from the Python standard library's own text.

    uv run python make_sample_corpus.py sample-corpus
    uv run python prepare_datasets.py sample-corpus datasets/sample-gpt2-tokens

FineWeb lives on the Hugging Face Hub and its 10B-token sample is tens of GB. To see the
pipeline work end to end without a network, this script collects real English prose that
ships with every Python installation -- the language reference (pydoc's topic pages), the
docstrings and longer comments of the standard-library modules, and its plain-text files
(licence, IDLE's notes) -- and writes it in FineWeb's layout:
OUTPUT_DIR/sample/10BT/000_00000.parquet, ... with a `text` column (plus `id` and `url`).

The output is deterministic for a given Python version: files are read in sorted order and
documents shuffled with a fixed seed. One pass over the standard library gives roughly
3 MB of text (about a million GPT-2 tokens); --megabytes repeats the collection, in a new
order each pass, to make a bigger corpus for benchmarks.

The corpus replaces the whole sample/10BT folder, so the folder may hold only parquet
files: if anything else is in it (notes, a subfolder, a hidden file) the script refuses,
with or without --force, rather than delete what it did not write.
"""

import ast
import os
import random
import shutil
import sysconfig
from pathlib import Path

import click

from support import safe_files

SAMPLE_FOLDER = Path("sample") / "10BT"
SHUFFLE_SEED = 1234
CLASS_PAGE_CHARACTERS = 1000
# Directories of the standard library that hold tests, fixtures or bundled third-party code
# rather than documented modules.
SKIPPED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                       "__pycache__", "lib2to3", "ensurepip", "turtledemo"}


def stdlib_directory() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path, suffixes) -> list[Path]:
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        found.extend(Path(directory) / name for name in names if Path(name).suffix in suffixes)
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _mostly_words(text: str) -> bool:
    """True for prose; false for tables of numbers, commented-out code or ASCII art."""
    letters = sum(character.isalpha() or character == " " for character in text)
    return len(text) >= 80 and letters / len(text) > 0.8


def _comment_blocks(source: str) -> list[str]:
    """Runs of three or more whole-line comments, each joined into a paragraph."""
    blocks, current = [], []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#"):
            current.append(stripped.lstrip("#").strip())
            continue
        if len(current) >= 3:
            blocks.append(" ".join(part for part in current if part))
        current = []
    return [block for block in blocks if _mostly_words(block)]


def _docstring_sections(body, prefix: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the functions and classes defined in `body`, in order."""
    sections = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                sections.append((f"{prefix}{node.name}", docstring))
            if isinstance(node, ast.ClassDef):
                sections.extend(_docstring_sections(node.body, f"{prefix}{node.name}."))
    return sections


def module_documents(path: Path, module_name: str) -> list[tuple[str, str]]:
    """The module's page (its docstring, functions and comments), then one page per class."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    pages = []
    module_parts = [f"{module_name}\n"]
    if docstring := ast.get_docstring(tree):
        module_parts.append(docstring)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            text = "\n\n".join(f"{name}\n\n{docstring}" for name, docstring in
                                 _docstring_sections([node], f"{module_name}."))
            # A well-documented class gets a page of its own; a few lines join the module's.
            if len(text) >= CLASS_PAGE_CHARACTERS:
                pages.append((f"{module_name}.{node.name}", text))
            elif text:
                module_parts.append(text)
        else:
            module_parts.extend(f"{name}\n\n{text}" for name, text in
                                _docstring_sections([node], f"{module_name}."))
    module_parts.extend(_comment_blocks(source))
    if len(module_parts) > 1:
        pages.insert(0, (module_name, "\n\n".join(module_parts)))
    return pages


def collect_documents(root: Path) -> list[tuple[str, str]]:
    """(source, text) for every document under `root` (and pydoc's topics), in a fixed order."""
    documents = []

    # The language reference and library topics that pydoc's help() shows.
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        topics = {}
    for name in sorted(topics):
        documents.append((f"pydoc-topic:{name}", topics[name].strip()))

    for path in _source_files(root, {".py"}):
        relative = path.relative_to(root).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        module_name = ".".join(parts) or root.name
        for name, text in module_documents(path, module_name):
            documents.append((f"python-stdlib:{name}", text))

    for path in _source_files(root, {".txt", ".rst"}):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if _mostly_words(text):
            documents.append((f"python-stdlib-file:{path.relative_to(root).as_posix()}", text))
    # Some text appears twice (a docstring copied between modules): keep the first.
    seen = set()
    unique = []
    for source, text in documents:
        if text and text not in seen:
            seen.add(text)
            unique.append((source, text))
    return unique


def corpus_rows(documents, megabytes):
    """Yield (id, url, text): one shuffled pass, repeated (reshuffled) until `megabytes` of text."""
    wanted_bytes = (megabytes or 0) * 1_000_000
    written_bytes = 0
    repetition = 0
    while True:
        order = list(range(len(documents)))
        random.Random(SHUFFLE_SEED + repetition).shuffle(order)
        for index in order:
            source, text = documents[index]
            yield f"<python-{sysconfig.get_python_version()}:{repetition}:{index}>", source, text
            written_bytes += len(text.encode("utf-8"))
        repetition += 1
        if written_bytes >= wanted_bytes:
            return


def check_replaceable(folder: Path, force: bool):
    """Raise unless writing the corpus to `folder` (a swap of the whole folder) loses nothing
    the user did not ask to lose: parquet files only with --force, and nothing else at all."""
    if folder.is_symlink():
        raise click.ClickException(f"{folder} is a symbolic link; the corpus would replace it, "
                                   f"so give the real directory's OUTPUT_DIR")
    if folder.exists() and not folder.is_dir():
        raise click.ClickException(f"{folder} exists and is not a directory")
    if not folder.is_dir():
        return
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise click.ClickException(f"cannot read {folder}: {error.strerror}") from None
    others = [path for path in entries if path.suffix != ".parquet" or path.is_symlink()
              or not path.is_file()]
    if others:
        raise click.ClickException(
            f"{folder} holds {others[0].name}, which is not a parquet file; the corpus replaces "
            f"the whole folder, so move it elsewhere (--force replaces only parquet files)")
    if entries and not force:
        raise click.ClickException(f"{folder} already holds {len(entries)} parquet file(s); "
                                   f"pass --force to replace them")


def write_parquet_files(rows, folder: Path, documents_per_file, rows_per_group):
    """Write rows into 000_00000.parquet, 001_00000.parquet, ... (FineWeb's naming).

    Returns (documents, bytes of text) for each file written."""
    # Imported here, not at the top: pyarrow takes a second or more to import, and --help
    # or a mistyped option should answer at once.
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string())])
    written, file_number, batch = [], 0, []

    def flush():
        nonlocal file_number, batch
        table = pa.table({"text": [r[2] for r in batch], "id": [r[0] for r in batch],
                          "url": [r[1] for r in batch]}, schema=schema)
        path = folder / f"{file_number:03d}_00000.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group)
        written.append((len(batch), sum(len(r[2].encode("utf-8")) for r in batch)))
        file_number += 1
        batch = []

    for row in rows:
        batch.append(row)
        if len(batch) == documents_per_file:
            flush()
    if batch:
        flush()
    return written


@click.command()
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path), default="sample-corpus")
@click.option("--megabytes", type=click.FloatRange(min=0), default=None,
              help="Make at least this many MB of text by repeating the collected documents "
                   "(reshuffled each pass). Default: one pass, about 3 MB.")
@click.option("--documents-per-file", type=click.IntRange(min=1), default=250, show_default=True,
              help="Documents per parquet file.")
@click.option("--rows-per-group", type=click.IntRange(min=1), default=100, show_default=True,
              help="Parquet row-group size (FineWeb's files hold many row groups).")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Where to look for modules and text files  [default: this "
                                 "Python's standard library]")
@click.option("--force", is_flag=True,
              help="Replace a corpus already in OUTPUT_DIR/sample/10BT (once the new one is "
                   "complete). Only parquet files are replaced: a folder holding anything else "
                   "is refused, --force or not.")
def main(output_dir, megabytes, documents_per_file, rows_per_group, source, force):
    """Write a FineWeb-shaped corpus of standard-library text to OUTPUT_DIR/sample/10BT/*.parquet.

    OUTPUT_DIR defaults to ./sample-corpus."""
    folder = output_dir / SAMPLE_FOLDER
    check_replaceable(folder, force)
    source = source or stdlib_directory()
    documents = collect_documents(source)
    if not documents:
        raise click.ClickException(f"found no documentation text under {source}")
    # Written beside the final folder and swapped in when complete: an interrupted run
    # leaves no half-corpus under sample/10BT, and --force keeps the old one until then.
    staging = safe_files.hidden_temporary(folder, "partial")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        raise click.ClickException(
            f"cannot create directory {error.filename or staging}: {error.strerror}") from None
    try:
        written = write_parquet_files(corpus_rows(documents, megabytes), staging,
                                      documents_per_file, rows_per_group)
        check_replaceable(folder, force)  # again: files may have arrived while we wrote
        safe_files.replace_directory(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total_documents = sum(count for count, _ in written)
    total_bytes = sum(size for _, size in written)
    print(f"{folder}: {len(written)} parquet file(s), {total_documents:,} documents, "
          f"{total_bytes / 1e6:,.1f} MB of text from {len(documents):,} distinct documents "
          f"of {source}")


if __name__ == "__main__":
    main()
