"""prepare_datasets.py and make_sample_corpus.py, run as users run them (subprocesses, real files).

The reference is the seed's own method, re-run here with Hugging Face datasets: load the
parquet files with load_dataset("parquet", split="train[:99%]" / "train[99%:]"), encode
1000-row slices with encode_batch allowing <|endoftext|>, and append 50256 after each
document. Our files must hold exactly those numbers.
"""

import os
import re
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydoc_data.topics import topics
from safetensors import safe_open
from safetensors.torch import load_file

from support import token_data
from support import tokenizer
from helpers import run_script, start_script
from support.token_files import HEADER_SPACE, TokenFileError, token_dtype, train_document_count

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "prepare_datasets.py"

# Documents that have tripped tokenizer pipelines: empty, the special token as text (whole,
# twice, split across documents), non-ASCII of several scripts, odd whitespace.
AWKWARD_DOCUMENTS = [
    "",
    "A document that mentions <|endoftext|> in the middle, and ends with it<|endoftext|>",
    "<|endoftext|>",
    "Non-ASCII: café, naïve, Straße, 東京の天気, Ελληνικά, עברית, emoji 🚀🧪, e\u0301 combined",
    "   leading and trailing whitespace   \n\n",
    "a document ending in half a special token <|endoftext",
    "|> and one starting with the other half",
    "line\r\nbreaks\tand\ttabs\n",
]


def real_documents(count, seed=0):
    """`count` documents of real English (the language reference), with the awkward ones mixed in."""
    texts = [topics[name] for name in sorted(topics)]
    rng = np.random.default_rng(seed)
    documents = [texts[i % len(texts)][: int(rng.integers(50, 3000))] for i in range(count)]
    for offset, awkward in enumerate(AWKWARD_DOCUMENTS):
        documents[(offset * 17 + 3) % count] = awkward
    return documents


def write_parquet(path, documents, row_group_size):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [f"doc-{i}" for i in range(len(documents))], "text": documents})
    pq.write_table(table, path, row_group_size=row_group_size)


def seed_method_tokens(input_dir, cache_dir):
    """The seed's prepare_datasets.py, re-run: {"train": [...], "validation": [...]}."""
    from datasets import load_dataset

    splits = load_dataset(
        "parquet", data_files=f"{input_dir}/sample/10BT/*.parquet",
        split={"train": "train[:99%]", "validation": "train[99%:]"}, cache_dir=str(cache_dir),
    )
    encoding = tokenizer.get_tokenizer()  # tiktoken's "gpt2", built from our rank file
    result = {}
    for name, dataset in splits.items():
        tokens = []
        for start in range(0, len(dataset), 1000):
            texts = dataset[start:start + 1000]["text"]
            for document in encoding.encode_batch(texts, allowed_special={"<|endoftext|>"}):
                tokens.extend(document)
                tokens.append(encoding.eot_token)
        result[name] = tokens
    return result


def run_prepare(*arguments, cwd, **kwargs):
    return run_script(SCRIPT.name, *arguments, cwd=cwd, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """150 documents in three files (written out of name order), several row groups each."""
    root = tmp_path_factory.mktemp("corpus")
    documents = real_documents(150)
    folder = root / "corpus" / "sample" / "10BT"
    # Written b, a, c: only sorting by name gives the seed's order.
    write_parquet(folder / "001_b.parquet", documents[50:110], row_group_size=16)
    write_parquet(folder / "000_a.parquet", documents[:50], row_group_size=9)
    write_parquet(folder / "002_c.parquet", documents[110:], row_group_size=40)
    (folder / "notes.txt").write_text("not parquet, not matched")
    return root


def test_matches_the_seeds_method_token_for_token(corpus):
    # Relative paths, resolved against the working directory; 2 workers and a batch size
    # that doesn't divide the files, so batches cross row groups and the 99% boundary.
    result = run_prepare("corpus", "out/tokens", "--workers", 2, "--batch-documents", 7, cwd=corpus)
    assert result.returncode == 0, result.stderr
    assert "150 documents: 148 for train, 2 for validation" in result.stdout

    expected = seed_method_tokens(corpus / "corpus", corpus / "hf-cache")
    assert len(expected["validation"]) > 0
    for split in ("train", "validation"):
        path = corpus / "out" / "tokens" / f"{split}.safetensors"
        with safe_open(path, "pt") as reader:
            assert list(reader.keys()) == ["tokens"]
        tokens = load_file(path)["tokens"]
        assert str(tokens.dtype) == "torch.uint16" and tokens.dim() == 1
        assert tokens.tolist() == expected[split], split
        assert token_data.open_tokens(path).tolist() == expected[split]
        assert not list(path.parent.glob(".*partial"))
    # The literal special token in a document became 50256, not its characters' tokens.
    assert expected["train"].count(tokenizer.END_OF_TEXT_ID) > 148


def test_one_worker_and_another_column_give_the_same_numbers(tmp_path):
    documents = real_documents(60, seed=1)
    folder = tmp_path / "in" / "data"
    folder.mkdir(parents=True)
    for index in range(3):
        part = documents[index * 20:(index + 1) * 20]
        table = pa.table({"content": part, "text": ["decoy"] * len(part)})
        pq.write_table(table, folder / f"part-{index}.parquet", row_group_size=6)
    result = run_prepare(tmp_path / "in", tmp_path / "out", "--files", "data/*.parquet",
                         "--text-column", "content", "--workers", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # 60 documents: "train[:99%]" is round(59.4) = 59 documents.
    encoding = tokenizer.get_tokenizer()
    expected = []
    for document in documents:
        expected += encoding.encode(document, allowed_special={"<|endoftext|>"}) + [50256]
    train = load_file(tmp_path / "out" / "train.safetensors")["tokens"].tolist()
    validation = load_file(tmp_path / "out" / "validation.safetensors")["tokens"].tolist()
    assert train + validation == expected
    last = encoding.encode(documents[-1], allowed_special={"<|endoftext|>"}) + [50256]
    assert validation == last


def test_train_boundary_is_datasets_percent_slicing():
    from datasets import ReadInstruction

    counts = list(range(0, 1001)) + [9_672_101, 10_000_050, 12_345_678_950]
    for count in counts:
        (train,) = ReadInstruction.from_spec("train[:99%]").to_absolute({"train": count})
        (validation,) = ReadInstruction.from_spec("train[99%:]").to_absolute({"train": count})
        assert (train.from_, train.to) == (0, train_document_count(count)), count
        assert (validation.from_, validation.to) == (train_document_count(count), count), count
    # Round half to even: 148.5 -> 148 but 49.5 -> 50, which leaves validation empty.
    assert train_document_count(150) == 148 and train_document_count(50) == 50


def test_empty_validation_split_is_written_with_a_warning(tmp_path):
    # 50 documents: "train[:99%]" is round(49.5) = 50 (half to even), so validation is empty.
    # The seed's method stops there; we write the empty file, and say so.
    documents = real_documents(50)
    write_parquet(tmp_path / "in" / "sample" / "10BT" / "x.parquet", documents, 10)
    with pytest.raises(ValueError, match="corresponds to no data"):
        seed_method_tokens(tmp_path / "in", tmp_path / "hf-cache")
    result = run_prepare("in", "out", "--workers", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Warning: the validation split is empty" in result.stderr
    assert load_file(tmp_path / "out" / "validation.safetensors")["tokens"].shape == (0,)
    assert len(token_data.open_tokens(tmp_path / "out" / "validation.safetensors")) == 0
    encoding = tokenizer.get_tokenizer()
    expected = [token for document in documents for token in
                encoding.encode(document, allowed_special={"<|endoftext|>"}) + [50256]]
    assert load_file(tmp_path / "out" / "train.safetensors")["tokens"].tolist() == expected


def test_existing_output_is_kept_unless_forced(tmp_path):
    write_parquet(tmp_path / "in" / "sample" / "10BT" / "x.parquet", real_documents(30), 10)
    output = tmp_path / "out"
    output.mkdir()
    (output / "train.safetensors").write_bytes(b"precious")
    (output / "README.md").write_text("keep me")

    refused = invoke(tmp_path / "in", output, "--workers", 1)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"Error: {output}/train.safetensors already exists; pass --force to replace it (the "
        f"existing files stay until the new ones are complete)"]
    assert (output / "train.safetensors").read_bytes() == b"precious"
    assert not (output / "validation.safetensors").exists()

    forced = run_prepare("in", "out", "--workers", 1, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert len(load_file(output / "train.safetensors")["tokens"]) > 1000
    assert (output / "README.md").read_text() == "keep me"
    assert sorted(path.name for path in output.iterdir()) == [
        "README.md", "train.safetensors", "validation.safetensors"]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """About 60 MB of text: enough that a run is still going when the test interrupts it."""
    root = tmp_path_factory.mktemp("big")
    texts = [topics[name] for name in sorted(topics)] * 130
    write_parquet(root / "in" / "sample" / "10BT" / "big.parquet", texts, row_group_size=100)
    write_parquet(root / "small" / "sample" / "10BT" / "small.parquet", real_documents(20), 5)
    return root


def wait_for_tokens_on_disk(process, output):
    """Wait until the run has written tokens to its temporary train file; returns its path."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        for partial in output.glob(".train.safetensors.*.partial"):
            if partial.stat().st_size > 8 + HEADER_SPACE:
                return partial
        time.sleep(0.05)
    raise AssertionError("no tokens were written within 60 s")


def descendants_of(pid):
    found, pending = set(), [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").iterdir():
            children = [int(child) for child in (task / "children").read_text().split()]
            found.update(children)
            pending.extend(children)
    return found


def is_running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # an exited child nobody has reaped yet is not running


def start_prepare(arguments, cwd):
    return start_script(SCRIPT.name, *arguments, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_ctrl_c_leaves_nothing_behind(big_corpus):
    output = big_corpus / "interrupted"
    process = start_prepare(["in", output.name, "--workers", 2, "--batch-documents", 20], big_corpus)
    wait_for_tokens_on_disk(process, output)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, f"exit {process.returncode}\n{stdout}\n{stderr}"
    assert stderr.strip().splitlines()[-1] == f"Interrupted: nothing was written to {output.name}"
    assert "Traceback" not in stderr
    # The output directory was ours and is gone again; nothing under a final name, ever.
    assert not output.exists()


def test_killed_run_leaves_no_final_file_and_the_next_run_cleans_up(big_corpus):
    output = big_corpus / "killed"
    process = start_prepare(["in", output.name, "--workers", 2, "--batch-documents", 20], big_corpus)
    partial = wait_for_tokens_on_disk(process, output)
    helpers = descendants_of(process.pid)  # the tokenizer processes (and a fork server)
    assert len(helpers) >= 2
    process.kill()
    process.communicate(timeout=60)

    assert partial.exists()
    assert not (output / "train.safetensors").exists()
    assert not (output / "validation.safetensors").exists()
    # The tokenizer processes notice they were orphaned and exit.
    deadline = time.monotonic() + 20
    while any(is_running(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in helpers)

    rerun = run_prepare("small", output.name, "--workers", 1, cwd=big_corpus)
    assert rerun.returncode == 0, rerun.stderr
    assert not partial.exists()
    assert sorted(path.name for path in output.iterdir()) == ["train.safetensors",
                                                              "validation.safetensors"]


def invoke(*arguments):
    """prepare_datasets.py on a command line of mistakes: each answered before any work."""
    return run_script("prepare_datasets.py", *arguments)


def test_bad_input_ends_in_one_line_naming_the_culprit(tmp_path):
    folder = tmp_path / "in" / "sample" / "10BT"
    folder.mkdir(parents=True)

    result = invoke(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: no files match {folder}/*.parquet"

    pq.write_table(pa.table({"body": ["x"]}), folder / "a.parquet")
    result = invoke(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Error: {folder}/a.parquet: no column 'text' (columns: "
                                      f"body); choose one with --text-column")

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), folder / "a.parquet")
    result = invoke(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: the 1 file(s) matching sample/10BT/*.parquet hold no documents"

    # Texts that are all empty (a column of blanks, say): no dataset of end-of-text tokens alone.
    pq.write_table(pa.table({"text": [""] * 300}), folder / "a.parquet")
    result = invoke(tmp_path / "in", tmp_path / "out", "--workers", 1)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: every one of the 300 documents of sample/10BT/*.parquet is empty (column 'text'): nothing "
        "written; is --text-column the column of the texts?")
    assert not (tmp_path / "out").exists()

    pq.write_table(pa.table({"text": ["fine", "also fine", None]}), folder / "a.parquet")
    result = invoke(tmp_path / "in", tmp_path / "out", "--workers", 1)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {folder}/a.parquet: row 2 has no text (null in 'text')")
    assert not (tmp_path / "out").exists()  # made for the run, removed with its partial files

    (folder / "a.parquet").write_bytes(b"this is not parquet")
    result = invoke(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"Error: {folder}/a.parquet: not a readable parquet file")

    (tmp_path / "a-file").write_text("")
    result = invoke(tmp_path / "in", tmp_path / "a-file")
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {tmp_path}/a-file exists and is not a directory"

    result = invoke(tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_vocabularies_that_do_not_fit_uint16_are_refused():
    assert token_dtype(tokenizer.get_tokenizer().n_vocab) == np.dtype("<u2")
    assert token_dtype(65_536) == np.dtype("<u2")
    for too_big in (65_537, 100_277):
        with pytest.raises(TokenFileError, match=f"the tokenizer has {too_big:,} token ids, but token "
                                               f"files store uint16, which holds ids up to 65,535"):
            token_dtype(too_big)


def make_corpus(*arguments, cwd):
    return run_script("make_sample_corpus.py", *arguments, cwd=cwd, timeout=120)


def stdlib_directory():
    """Where the standard library's sources are: make_sample_corpus.py's default source."""
    return Path(sysconfig.get_paths()["stdlib"])


def test_sample_corpus_is_fineweb_shaped_real_text_that_prepares(tmp_path):
    result = make_corpus("corpus", "--megabytes", 4, "--documents-per-file", 400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    distinct = int(re.search(r"from ([\d,]+) distinct documents", result.stdout)[1].replace(",", ""))
    files = sorted((tmp_path / "corpus" / "sample" / "10BT").glob("*.parquet"))
    assert [path.name for path in files[:2]] == ["000_00000.parquet", "001_00000.parquet"]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups > 1
    table = pa.concat_tables(pq.read_table(path) for path in files)
    assert table.column_names[0] == "text"
    texts = table.column("text").to_pylist()

    one_pass = texts[:distinct]
    assert 2_000_000 < len("".join(one_pass).encode()) < 4_000_000
    assert len(set(one_pass)) == distinct
    assert len("".join(texts).encode()) >= 4_000_000  # then repeated, reshuffled, up to 4 MB
    assert set(texts[distinct:]) <= set(one_pass) and texts[distinct:distinct + 50] != one_pass[:50]
    text = "".join(one_pass)
    assert "coroutine" in text and "Return the" in text
    letters = sum(character.isalpha() or character.isspace() for character in text)
    assert letters / len(text) > 0.8  # prose, not code or noise

    refused = make_corpus("corpus", cwd=tmp_path)
    assert refused.returncode == 1 and "pass --force" in refused.stderr

    # The quickstart's next step.
    prepared = run_prepare("corpus", "tokens", "--workers", 1, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert len(token_data.open_tokens(tmp_path / "tokens" / "train.safetensors")) > 1_000_000


def test_sample_corpus_is_deterministic(tmp_path):
    # A small source (one package) keeps this quick; the same code reads the whole library.
    source = stdlib_directory() / "email"
    tables = []
    for name in ("first", "second"):
        result = make_corpus(name, "--source", source, "--megabytes", 1, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        files = sorted((tmp_path / name / "sample" / "10BT").glob("*.parquet"))
        tables.append(pa.concat_tables(pq.read_table(path) for path in files))
    # Two runs, two processes: the same documents in the same order, row for row.
    assert tables[0].num_rows > 100 and tables[0].equals(tables[1])
    assert "python-stdlib:email" in tables[0].column("url").to_pylist()
    texts = tables[0].column("text").to_pylist()
    assert sum(len(text.encode()) for text in texts) >= 1_000_000 and len(set(texts)) > 50


def test_prepare_into_a_directory_under_a_file_is_one_line(tmp_path):
    write_parquet(tmp_path / "in" / "sample" / "10BT" / "a.parquet", real_documents(200), 50)
    (tmp_path / "a-file").write_text("keep me")
    result = run_prepare("in", "a-file/out", "--workers", 1, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: cannot create directory a-file/out: Not a directory"
    assert (tmp_path / "a-file").read_text() == "keep me"


def small_corpus(*arguments, cwd):
    """make_sample_corpus.py on one small package of the standard library: quick."""
    return make_corpus(*arguments, "--source", stdlib_directory() / "email",
                       cwd=cwd)


@pytest.mark.parametrize("other, is_folder", [
    ("notes.txt", False), (".hidden", False), ("old", True), ("dir.parquet", True),
])
def test_sample_corpus_never_deletes_what_it_did_not_write(tmp_path, other, is_folder):
    folder = tmp_path / "corpus" / "sample" / "10BT"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["old corpus"]}), folder / "000_00000.parquet")
    if is_folder:
        (folder / other).mkdir()
    else:
        (folder / other).write_text("my notes")
    before = sorted(os.listdir(folder))

    for arguments in ((), ("--force",)):
        refused = small_corpus("corpus", *arguments, cwd=tmp_path)
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "which is not a parquet file" in lines[0], refused.stderr
        assert lines[0].startswith(f"Error: corpus/sample/10BT holds {other}, ")
        assert sorted(os.listdir(folder)) == before
        assert sorted(os.listdir(folder.parent)) == ["10BT"]  # no staging left behind


def test_sample_corpus_force_replaces_only_parquet_files(tmp_path):
    folder = tmp_path / "corpus" / "sample" / "10BT"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["old corpus"]}), folder / "000_00000.parquet")
    pq.write_table(pa.table({"text": ["older corpus"]}), folder / "zzz.parquet")

    refused = small_corpus("corpus", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("Error: corpus/sample/10BT already holds 2 parquet file(s); "
                                      "pass --force to replace them")
    replaced = small_corpus("corpus", "--force", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert "zzz.parquet" not in os.listdir(folder)
    assert "old corpus" not in pq.read_table(folder / "000_00000.parquet").column("text").to_pylist()
    assert sorted(os.listdir(folder.parent)) == ["10BT"]


def test_sample_corpus_under_a_file_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    result = small_corpus("a-file/corpus", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: cannot create directory a-file/corpus/sample: "
                                     "Not a directory")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "sample").write_text("keep me too")
    result = small_corpus("corpus", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: cannot create directory corpus/sample: File exists"
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert (tmp_path / "corpus" / "sample").read_text() == "keep me too"
