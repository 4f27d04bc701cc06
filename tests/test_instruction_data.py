"""Instruction records: file checks, download, the seed's split, prompt format and collate rules."""

import json

import pytest
import torch

from support import tokenizer
from support.instruction_data import (IGNORE_INDEX, InstructionDataError, collate, extract_response,
                              format_prompt, format_training_text, load_records, split_records)
from servers.instruction_data import FileServer

EOT = tokenizer.END_OF_TEXT_ID
RECORDS = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


def test_prompt_format_is_the_seeds():
    assert format_prompt(RECORDS[0]) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.")
    assert format_prompt(RECORDS[1]).endswith("### Instruction:\nAdd the numbers.\n\n### Input\n2 and 3")
    assert format_training_text(RECORDS[1]) == format_prompt(RECORDS[1]) + "\n\n### Response:\n5"


def test_response_is_cut_out_of_the_generation_as_the_seed_does():
    prompt = format_prompt(RECORDS[0])
    assert extract_response(prompt + "\n\n### Response:\n Hello there. \n", prompt) == "Hello there."
    assert extract_response(prompt, prompt) == ""


@pytest.mark.parametrize("count, sizes", [(1100, (935, 110, 55)), (40, (34, 4, 2)), (9, (7, 0, 2))])
def test_split_in_file_order(count, sizes):
    records = [{"instruction": str(i), "input": "", "output": ""} for i in range(count)]
    train, test, validation = split_records(records)
    assert (len(train), len(test), len(validation)) == sizes
    assert train + test + validation == records


def test_collate_pads_appends_end_of_text_and_ignores_padding():
    inputs, targets = collate([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], context_length=100)
    assert inputs.tolist() == [
        [1, 2, 3, EOT, EOT],
        [4, 5, EOT, EOT, EOT],
        [6, 7, 8, 9, 10],
    ]
    X = IGNORE_INDEX
    assert targets.tolist() == [
        [2, 3, EOT, X, X],      # the appended end-of-text is a target: the model learns to stop
        [5, EOT, X, X, X],      # padding after it is ignored
        [7, 8, 9, 10, EOT],
    ]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_crops_to_the_context_length():
    inputs, targets = collate([[1, 2, 3, 4, 5, 6], [7, 8]], context_length=4)
    assert inputs.tolist() == [[1, 2, 3, 4], [7, 8, EOT, EOT]]
    assert targets.tolist() == [[2, 3, 4, 5], [8, EOT, IGNORE_INDEX, IGNORE_INDEX]]


def test_ignored_targets_add_nothing_to_the_loss():
    inputs, targets = collate([[1, 2, 3], [4, 5]], context_length=100)
    logits = torch.randn(*targets.shape, 50257)
    kept = targets != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()) == \
        pytest.approx(by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"instruction": "a", "input": "", "output": "b"}',
     "expected a JSON list of {instruction, input, output} records, got dict"),
    ("[]", "the list of records is empty"),
    ('[{"instruction": "a", "input": "", "output": "b"}, "text"]', "record 1 must be an object, got str"),
    ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]',
     "record 1 is missing key 'output'"),
    ('[{"instruction": "a", "input": null, "output": "b"}]',
     "record 0: key 'input' must be a string, got null"),
])
def test_bad_files_name_the_file_record_and_key(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(InstructionDataError) as error:
        load_records(path)
    assert str(path) in error.value.message and message in error.value.message


def test_downloads_when_missing_and_only_then(tmp_path):
    path = tmp_path / "instruction-data.json"
    with FileServer(json.dumps(RECORDS).encode()) as server:
        assert load_records(path, server.url) == RECORDS
        assert json.loads(path.read_text()) == RECORDS
        assert load_records(path, server.url) == RECORDS
        assert server.requests == 1


@pytest.mark.parametrize("payload, route, message", [
    (json.dumps(RECORDS).encode(), "/missing.json", "(HTTP 404 Not Found)"),
    (b"<html>rate limited</html>", "/instruction-data.json", "not valid JSON"),
])
def test_failed_download_leaves_no_file(tmp_path, payload, route, message):
    path = tmp_path / "instruction-data.json"
    with FileServer(payload) as server:
        with pytest.raises(InstructionDataError) as error:
            load_records(path, server.url.replace("/instruction-data.json", route))
    assert message in error.value.message
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_cannot_be_saved_is_one_line(tmp_path):
    path = tmp_path / "no-such-folder" / "instruction-data.json"
    with FileServer(json.dumps(RECORDS).encode()) as server:
        with pytest.raises(InstructionDataError) as error:
            load_records(path, server.url)
    assert error.value.message.startswith(f"{path}: cannot write the downloaded data (")
    assert not path.parent.exists()
