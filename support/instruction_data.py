"""Instruction data for test_ift.py: the records, their Alpaca-style prompts, and training batches.

The records are the {instruction, input, output} list from chapter 7 of "Build a Large
Language Model (From Scratch)", downloaded once into instruction-data.json as the seed
does. Any JSON file of that shape works.
"""

import json
import urllib.error
import urllib.request
from pathlib import Path

import click

from . import safe_files
from .tokenizer import END_OF_TEXT_ID

DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
            "ch07/01_main-chapter-code/instruction-data.json")
RECORD_KEYS = ("instruction", "input", "output")
IGNORE_INDEX = -100  # cross_entropy's default ignore_index: these targets add nothing to the loss
RESPONSE_HEADER = "### Response:"


class InstructionDataError(click.ClickException):
    """A missing, unreadable or malformed instruction data file; printed as one line, exit 1."""


# --- the command-line options every script that fine-tunes and answers takes alike ---

def _options(*options):
    def decorate(command):
        for option in reversed(options):  # listed in --help in this order
            command = option(command)
        return command
    return decorate


def data_options(command):
    """--data and --data-url (the function then takes data, data_url)."""
    return _options(
        click.option("--data", default="instruction-data.json", show_default=True,
                     type=click.Path(dir_okay=False),
                     help="JSON list of {instruction, input, output} records; downloaded from --data-url "
                          "when the file doesn't exist."),
        click.option("--data-url", default=DATA_URL, show_default=True,
                     help="Where to download --data from when it is missing."),
    )(command)


def generation_options(command):
    """--device, --dtype, --max-new-tokens, --generation-batch-size (the function then takes
    device, dtype, max_new_tokens, generation_batch_size)."""
    return _options(
        click.option("--device", default=None, help="cuda, mps or cpu (default: the best available)."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                     show_default=True, help="Precision for fine-tuning and generation (autocast)."),
        click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
                     help="Longest answer generated."),
        click.option("--generation-batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                     help="Test prompts answered at once (the answers don't depend on it)."),
    )(command)


# --- the records ---

def download(url, path, timeout=60):
    """Fetch url into path. Written to a temporary file first, so a failed download leaves nothing."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as error:
        raise InstructionDataError(
            f"could not download instruction data from {url} (HTTP {error.code} {error.reason}); "
            f"download it yourself and pass --data PATH"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise InstructionDataError(
            f"could not download instruction data from {url} ({reason}); "
            f"download it yourself and pass --data PATH"
        ) from None
    parse_records(payload, f"{url}")  # refuse to save something we couldn't use
    try:
        safe_files.write_atomically(path, payload)
    except OSError as error:
        raise InstructionDataError(f"{path}: cannot write the downloaded data ({error.strerror})") from None


def load_records(path, url=DATA_URL) -> list[dict]:
    """The records in path; when the file isn't there and url is given, download it first."""
    path = Path(path)
    if not path.exists():
        if url is None:
            raise InstructionDataError(f"{path}: file not found")
        download(url, path)
    if not path.is_file():
        raise InstructionDataError(f"{path}: not a file")
    return parse_records(path.read_bytes(), path)


def parse_records(payload: bytes, source) -> list[dict]:
    """Check the JSON shape: a non-empty list of objects with string instruction, input and output."""
    try:
        records = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InstructionDataError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise InstructionDataError(
            f"{source}: expected a JSON list of {{instruction, input, output}} records, "
            f"got {type(records).__name__}"
        )
    if not records:
        raise InstructionDataError(f"{source}: the list of records is empty")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InstructionDataError(
                f"{source}: record {index} must be an object, got {type(record).__name__}"
            )
        for key in RECORD_KEYS:
            if key not in record:
                raise InstructionDataError(f"{source}: record {index} is missing key '{key}'")
            if not isinstance(record[key], str):
                raise InstructionDataError(
                    f"{source}: record {index}: key '{key}' must be a string, "
                    f"got {json.dumps(record[key])}"
                )
    return records


def load_splits(path, url, batch_size, fine_tuning=True):
    """(train, test, validation) records of the data file (downloaded from url when
    missing), refused in one line where the split leaves no test record or, for
    fine-tuning, not one training batch of batch_size or no validation record."""
    records = load_records(path, url)
    train, test, validation = split_records(records)
    if not test:
        raise InstructionDataError(f"{path}: {len(records)} records leave none for the test split (10%)")
    if fine_tuning and (len(train) < batch_size or not validation):
        raise InstructionDataError(
            f"{path}: {len(records)} records split into {len(train)} for training and "
            f"{len(validation)} for validation; fine-tuning needs at least one batch "
            f"of {batch_size} and one validation record (or pass --max-epochs 0)")
    return train, test, validation


def split_records(records):
    """The seed's split, in file order: first 85% train, next 10% test, the rest validation."""
    train_count = int(len(records) * 0.85)
    test_count = int(len(records) * 0.1)
    train = records[:train_count]
    test = records[train_count:train_count + test_count]
    validation = records[train_count + test_count:]
    return train, test, validation


# --- the prompt format ---

def format_prompt(record) -> str:
    """The Alpaca-style prompt, exactly the seed's (its input header has no colon)."""
    text = ("Below is an instruction that describes a task. Write a response that "
            f"appropriately completes the request.\n\n### Instruction:\n{record['instruction']}")
    if record["input"]:
        text += f"\n\n### Input\n{record['input']}"
    return text


def format_training_text(record) -> str:
    return format_prompt(record) + f"\n\n{RESPONSE_HEADER}\n{record['output']}"


def extract_response(generated_text: str, prompt: str) -> str:
    """The seed's clean-up of a generation: drop the prompt and the response header."""
    return generated_text[len(prompt):].replace(RESPONSE_HEADER, "").strip()


# --- training batches ---

def collate(sequences, context_length, end_of_text_id=END_OF_TEXT_ID):
    """Inputs and targets for a batch of token lists, as the seed builds them.

    Each sequence gets one end-of-text token appended and is padded with end-of-text
    to the longest in the batch. Targets are the inputs shifted by one; the appended
    end-of-text stays a target (the model must learn to stop), every padding
    position after it is IGNORE_INDEX. Both are then cropped to context_length.
    """
    # Imported here, the one place this module needs it: test_ift.py reads DATA_URL for
    # its --help, which must not wait seconds for torch.
    import torch

    width = max(len(sequence) for sequence in sequences)
    inputs = torch.full((len(sequences), width), end_of_text_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        length = len(sequence)
        inputs[row, :length] = torch.tensor(sequence, dtype=torch.long)
        targets[row, :length - 1] = inputs[row, 1:length]
        targets[row, length - 1] = end_of_text_id
    return inputs[:, :context_length], targets[:, :context_length]
