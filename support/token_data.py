"""Token datasets: memory-mapped splits, the seed's batch arithmetic, and where the files come from.

A split is a safetensors file holding one 1-D tensor, `tokens`. We never read the
whole file: the tensor is memory-mapped for its length and for scans, and each batch
is read with one positioned read (pread), so a 10B-token split costs no RAM up front,
every rank on a machine shares the same page cache, and a process's resident memory
does not grow as training walks through the file (pages touched through a memory map
count towards it, and a whole epoch would touch them all).
"""

import json
import os
import struct
import warnings
import weakref
from pathlib import Path

import click
import numpy as np
import torch

from . import safe_files

TENSOR_NAME = "tokens"
SPLITS = ("train", "validation")

# safetensors dtype names we accept for token ids, and their numpy equivalents.
TOKEN_DTYPES = {"U16": np.uint16, "I32": np.int32, "U32": np.uint32, "I64": np.int64}


class DatasetError(click.ClickException):
    """A dataset that is missing, malformed or too small; printed as one line, exit 1."""


def split_path(dataset_dir, split) -> Path:
    return Path(dataset_dir) / f"{split}.safetensors"


def open_tokens(path) -> np.ndarray:
    """Memory-map the `tokens` tensor of a safetensors file, without reading it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    # safetensors layout: u64 little-endian header length, JSON header, then raw data.
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (header_length,) = struct.unpack("<Q", file.read(8))
            if header_length > file_size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(file.read(header_length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise DatasetError(f"{path}: not a safetensors file") from None
    names = [name for name in header if name != "__metadata__"]
    if names != [TENSOR_NAME]:
        raise DatasetError(
            f"{path}: expected exactly one tensor named '{TENSOR_NAME}', found {names or 'none'}"
        )
    info = header[TENSOR_NAME]
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise DatasetError(f"{path}: tensor '{TENSOR_NAME}' has a malformed header entry") from None
    if dtype_name not in TOKEN_DTYPES:
        raise DatasetError(
            f"{path}: tensor '{TENSOR_NAME}' has dtype {dtype_name}; "
            f"token ids must be one of {', '.join(TOKEN_DTYPES)}"
        )
    if not isinstance(shape, list) or len(shape) != 1:
        raise DatasetError(f"{path}: tensor '{TENSOR_NAME}' has shape {shape}; expected 1-D")
    if not all(isinstance(number, int) and number >= 0 for number in (shape[0], begin, end)):
        raise DatasetError(f"{path}: tensor '{TENSOR_NAME}' has a malformed header entry")
    dtype = np.dtype(TOKEN_DTYPES[dtype_name]).newbyteorder("<")  # safetensors is little-endian
    count = shape[0]
    data_start = 8 + header_length + begin
    if end - begin != count * dtype.itemsize or data_start + count * dtype.itemsize > file_size:
        raise DatasetError(
            f"{path}: tensor '{TENSOR_NAME}' claims {count:,} tokens, but the file holds "
            f"{max(file_size - data_start, 0) // dtype.itemsize:,}: truncated or corrupt"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=(count,))


class TokenBatches:
    """Batch i is (x, y): x = tokens[i*B*T : (i+1)*B*T] viewed as (B, T), y the same shifted by one.

    This is the seed's BigTrainDataset layout (tokens[:-1] and tokens[1:] reshaped),
    read lazily: only the batch asked for is read from the file.
    """

    def __init__(self, tokens, path, file_offset, num_batches, batch_size, seq_length, vocab_size=None):
        self.tokens = tokens            # num_batches * batch_size * seq_length + 1 tokens, memory-mapped
        self.vocab_size = vocab_size    # when given, every batch's ids are checked against it
        self.path = path
        self.file_offset = file_offset  # where tokens[0] is in the file, in bytes
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.seq_length = seq_length
        # Opened now, with the memory map, so both see the same file; closed with us.
        self._file = open(path, "rb")
        weakref.finalize(self, self._file.close)

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index):
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range (0..{self.num_batches - 1})")
        batch_tokens = self.batch_size * self.seq_length
        item_size = self.tokens.dtype.itemsize
        raw = os.pread(self._file.fileno(), (batch_tokens + 1) * item_size,
                       self.file_offset + index * batch_tokens * item_size)
        if len(raw) != (batch_tokens + 1) * item_size:
            raise DatasetError(f"{self.path}: batch {index} is past the end of the file: "
                               f"it was truncated after it was opened")
        ids = np.frombuffer(raw, dtype=self.tokens.dtype)
        if self.vocab_size is not None:
            check_token_ids(ids, self.vocab_size, f"{self.path}: batch {index:,}")
        chunk = torch.from_numpy(ids.astype(np.int64))
        x = chunk[:-1].view(self.batch_size, self.seq_length)
        y = chunk[1:].view(self.batch_size, self.seq_length)
        return x, y


def check_token_ids(ids, vocab_size: int, where: str) -> None:
    """Refuse token ids the model can't embed (a dataset tokenised for another
    vocabulary, a uint16 file holding 65535, negative int32 ids): past the embedding
    table they would crash training, on CUDA with a device-side assert that kills the
    process, maybe hours in. A min and a max over the host-side ids, no device sync."""
    if len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size):
        return
    position = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
    raise DatasetError(f"{where}: token id {int(ids[position])} at position {position:,} is outside "
                       f"the model's vocabulary of {vocab_size} (vocab_size): was the dataset "
                       f"tokenised for another model?")


def load_dataset(dataset_dir, split, min_tokens, start_token, micro_batches_per_step, minibatch_size,
                 seq_length, vocab_size=None) -> TokenBatches:
    """The seed's token arithmetic over a memory-mapped split.

    A global batch is micro_batches_per_step * minibatch_size * seq_length tokens (in
    training micro_batches_per_step is world_size x gradient_accumulation_steps; the
    seed's world_size). min_tokens == -1 takes as many whole global batches as fit after
    start_token; otherwise min_tokens is rounded up to whole global batches. One extra
    token is taken for the shifted targets.
    """
    path = split_path(dataset_dir, split)
    tokens = open_tokens(path)
    global_batch = micro_batches_per_step * minibatch_size * seq_length
    if start_token < 0:
        raise DatasetError(f"{path}: start token {start_token:,} is negative")
    if start_token >= len(tokens):
        raise DatasetError(
            f"{path}: start token {start_token:,} is past the end of the split ({len(tokens):,} tokens)"
        )
    available = len(tokens) - start_token
    if min_tokens == -1:
        num_global_batches = (available - 1) // global_batch
    else:
        num_global_batches = -(-min_tokens // global_batch)  # ceiling, in exact integers
    wanted = num_global_batches * global_batch + 1
    if num_global_batches == 0 or wanted > available:
        wanted = max(wanted, global_batch + 1)
        # In the words both callers share: ddp_train's micro-batches and test_loss's batches
        # are each minibatch_size sequences of seq_length tokens.
        batches = wanted // (minibatch_size * seq_length)
        raise DatasetError(
            f"{path}: not enough tokens: {wanted:,} wanted from token {start_token:,} "
            f"({batches:,} batch(es) of {minibatch_size} sequences x {seq_length} tokens, plus one), "
            f"{available:,} available"
        )
    return TokenBatches(tokens[start_token:start_token + wanted], path,
                        tokens.offset + start_token * tokens.dtype.itemsize,
                        num_global_batches * micro_batches_per_step, minibatch_size, seq_length,
                        vocab_size)


# Train batches whose token ids are checked at start-up (every batch is also checked as it is read).
STARTUP_CHECKED_BATCHES = 100


def load_splits(dataset_dir, config, model_config: dict, micro_batches_per_step: int):
    """(train batches, validation batches) of a run: train.json's slices of the two splits,
    every batch's token ids checked against model.json's vocab_size as it is read. A run
    that does not validate (checkpoint_interval) reads no validation split: None."""
    context_length, vocab_size = model_config["context_length"], model_config["vocab_size"]
    train = load_dataset(dataset_dir, "train", config.min_train_tokens, config.start_train_token,
                         micro_batches_per_step, config.minibatch_size, context_length, vocab_size)
    if not config.validates:
        return train, None
    validation = load_dataset(dataset_dir, "validation",
                              config.validation_batches * config.minibatch_size * context_length,
                              config.start_val_token, 1, config.minibatch_size, context_length, vocab_size)
    return train, validation


def check_first_batches(train: TokenBatches, validation: TokenBatches | None) -> int:
    """Read, and so check the token ids of, the first train batches and every validation
    batch, so that data for another vocabulary stops the run at start-up; returns how many
    batches were checked."""
    count = min(len(train), STARTUP_CHECKED_BATCHES)
    for index in range(count):
        train[index]
    for index in range(len(validation or ())):
        validation[index]
    return count + len(validation or ())


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _has_splits(directory: Path, splits) -> bool:
    return all(split_path(directory, split).is_file() for split in splits)


def _downloaded_from_hub(directory: Path) -> bool:
    # snapshot_download(local_dir=...) keeps its bookkeeping in local_dir/.cache/huggingface.
    return (directory / ".cache" / "huggingface").is_dir()


def resolve_dataset_dir(dataset: str, datasets_dir, splits=SPLITS) -> Path:
    """Where a train.json `dataset` value lives on disk, downloading it first if it is a Hub repo.

    - an absolute path: a local directory, used as it is; nothing downloaded;
    - a relative path whose DATASETS_DIR/<dataset> holds the split files and was not made
      by a Hub download: a local directory too (so "myname/my-tokens" made by
      prepare_datasets.py works without a Hub repo of that name);
    - otherwise a Hub dataset repo id ("owner/name"), fetched with snapshot_download into
      DATASETS_DIR/owner/name as the seed does (only the split files asked for; files
      already there and current are not fetched again). If the Hub can't be reached but
      the files are there, they are used, with a warning.

    Several processes may call this at once for the same directory (huggingface_hub locks
    each file), but it is cheaper to let one per machine download and the others wait.
    """
    datasets_dir = Path(datasets_dir)
    as_given = Path(dataset).expanduser()
    if as_given.is_absolute():
        if not as_given.is_dir():
            raise DatasetError(f"dataset directory {as_given} does not exist")
        return as_given
    local_dir = datasets_dir / dataset
    if _has_splits(local_dir, splits) and not _downloaded_from_hub(local_dir):
        return local_dir
    if not _looks_like_repo_id(dataset):
        if not local_dir.is_dir():
            raise DatasetError(
                f"dataset directory {local_dir} does not exist (and '{dataset}' is not a "
                f"Hugging Face repo id of the form owner/name)"
            )
        return local_dir

    # Imported here: reading HF_ENDPOINT and friends is only needed when downloading.
    from huggingface_hub import HfApi, snapshot_download

    wanted = [split_path(".", split).name for split in splits]
    try:
        # Ask for the current commit first: a clear error when the Hub is out of reach,
        # and every file then comes from that one commit.
        commit = HfApi().dataset_info(dataset).sha
        snapshot_download(repo_id=dataset, repo_type="dataset", revision=commit,
                          local_dir=local_dir, allow_patterns=wanted)
    except Exception as error:  # network, auth, missing repo or file: all end the same way
        reason = safe_files.first_line(error)
        if _has_splits(local_dir, splits):
            warnings.warn(
                f"could not update dataset {dataset} from the Hugging Face Hub ({reason}); "
                f"using the files already in {local_dir}",
                stacklevel=2,
            )
            return local_dir
        raise DatasetError(f"could not download dataset {dataset} into {local_dir}: {reason}") from None
    missing = [name for name in wanted if not (local_dir / name).is_file()]
    if missing:
        raise DatasetError(f"dataset {dataset} on the Hugging Face Hub has no {', '.join(missing)}")
    return local_dir
