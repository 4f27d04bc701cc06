"""Writing token split files: the original's format (one 1-D uint16 `tokens` tensor in a
safetensors file), streamed to disk, and the original's split of a corpus into train and
validation documents. prepare_datasets.py writes with it; token_data.py reads the files.

Light on purpose (numpy, no torch): prepare_datasets.py's worker processes import it.
"""

import json
import os
import struct
from pathlib import Path

import click
import numpy as np

from . import safe_files


class TokenFileError(click.ClickException):
    """A token file that can't be written as asked; printed as one line, exit 1."""


# The original's split of a corpus: its first 99% of documents (datasets' "train[:99%]")
# are the train split, the rest the validation split.
TRAIN_PERCENT = 99

# A safetensors file is: u64 little-endian header length, a JSON header, then the raw tensor
# data. We don't know the token count until the end, so we reserve room for the header up
# front and fill it in last; JSON allows the trailing spaces that pad it out. 128 bytes fit
# the header with 20-digit numbers and keep the data 8-byte aligned, as safetensors does.
HEADER_SPACE = 128


def train_document_count(total_documents: int) -> int:
    """How many leading documents are the train split: the boundary of "train[:99%]".

    Hugging Face datasets turns a percent slice into a row index with
    int(round(percent * rows / 100.0)) ("closest" rounding, Python's round-half-to-even),
    and "train[99%:]" starts at the same index, so the two splits partition the rows.
    """
    return int(round(TRAIN_PERCENT * total_documents / 100.0))


def token_dtype(vocab_size: int):
    """Token files are uint16, as the original's: refuse a vocabulary whose ids would not fit."""
    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise TokenFileError(
            f"the tokenizer has {vocab_size:,} token ids, but token files store uint16, "
            f"which holds ids up to {np.iinfo(np.uint16).max:,}"
        )
    return np.dtype("<u2")


class TokenFileWriter:
    """Streams tokens into a safetensors file under a hidden temporary name.

    `finish` writes the header; `commit` renames the file to its final name. Until then
    nothing exists under the final name, so an interrupted run cannot leave a file there
    that looks complete.
    """

    def __init__(self, final_path: Path):
        self.final_path = final_path
        self.temporary_path = safe_files.hidden_temporary(final_path, "partial")
        self.file = open(self.temporary_path, "wb")
        self.file.write(bytes(8 + HEADER_SPACE))
        self.count = 0

    def write(self, tokens: np.ndarray):
        self.file.write(tokens.tobytes())
        self.count += len(tokens)

    def finish(self):
        header = json.dumps(
            {"tokens": {"dtype": "U16", "shape": [self.count], "data_offsets": [0, 2 * self.count]}},
            separators=(",", ":"),
        ).encode()
        self.file.seek(0)
        self.file.write(struct.pack("<Q", HEADER_SPACE) + header.ljust(HEADER_SPACE, b" "))
        safe_files.flush_to_disk(self.file)
        self.file.close()

    def commit(self):
        os.replace(self.temporary_path, self.final_path)

    def discard(self):
        self.file.close()
        self.temporary_path.unlink(missing_ok=True)
