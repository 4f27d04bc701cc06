"""ift_generate_test_responses.py run as users run it, on a tiny checkpoint, against the later
original's recipe written out here step by step with plain torch (our model and collate,
its loop): the same validation losses, the same answers, the same results file.

The recipe's early stopping, and the validation loss over every batch, are checked in
process in test_instruction_tuning.py; here the script runs twice (its one path, and
its mistakes, which are one line each).
"""

import copy
import json
import random
import uuid
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from support import instruction_data
from support import tokenizer
from gpt import GPTModel
from helpers import PROJECT_ROOT, free_port, one_line_error, run_script, write_tiny_checkpoint
from servers.instruction_data import FileServer

CONFIG = dict(vocab_size=50257, emb_dim=16, context_length=96, n_heads=2, n_layers=1,
              drop_rate=0.0, qkv_bias=False)
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey"]
MAX_NEW_TOKENS = 10


def instruction_records(count):
    return [{"instruction": f"Name colour number {index}.",
             "input": f"a hint: {COLOURS[index % 8]}" if index % 3 == 0 else "",
             "output": f"The colour is {COLOURS[index % 8]}.", "id": index} for index in range(count)]


def the_originals_recipe(weights_path, records, drop_rate, epochs):
    """ift_generate_test_responses.py at c894ed0, step by step: seed 42, build the model and
    load its weights, AdamW (5e-5, 0.1) over batches of 8 (shuffled, the last partial one
    dropped), the mean of every validation batch's loss after each epoch, a deep copy of
    the best state put back, then each test prompt continued greedily one token at a time,
    the whole window recomputed (no cache). Returns (validation losses, answers)."""
    train_count, test_count = int(len(records) * 0.85), int(len(records) * 0.1)
    train, test, validation = (records[:train_count], records[train_count:train_count + test_count],
                               records[train_count + test_count:])
    random.seed(42)
    torch.manual_seed(42)
    model = GPTModel(dict(CONFIG, drop_rate=drop_rate))
    model.load_state_dict(load_file(weights_path))

    def loader(part, shuffle):
        texts = [tokenizer.encode(instruction_data.format_training_text(record)) for record in part]
        return DataLoader(texts, batch_size=8, shuffle=shuffle, drop_last=shuffle,
                          collate_fn=partial(instruction_data.collate, context_length=CONFIG["context_length"]))

    train_loader, validation_loader = loader(train, True), loader(validation, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    losses, best_state = [], None
    for _ in range(epochs):
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            batch_losses = [F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
                            for inputs, targets in validation_loader]
        losses.append(sum(batch_losses) / len(batch_losses))
        if len(losses) > 1 and not losses[-1] < min(losses[:-1]):
            break
        best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)

    answers = []
    for record in test:
        prompt = instruction_data.format_prompt(record)
        ids = tokenizer.encode(prompt)
        for _ in range(MAX_NEW_TOKENS):
            with torch.no_grad():
                next_id = model(torch.tensor([ids[-CONFIG["context_length"]:]]))[0, -1].argmax().item()
            if next_id == tokenizer.END_OF_TEXT_ID:
                break
            ids.append(next_id)
        answers.append(tokenizer.decode(ids)[len(prompt):].replace("### Response:", "").strip())
    return losses, answers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    write_tiny_checkpoint(directory, CONFIG)
    return directory / "model.json", directory / "model.safetensors"


def test_fine_tunes_and_answers_as_the_original_does(checkpoint, tmp_path):
    """The default data file (instruction-data.json in the current directory, downloaded
    from --data-url as it is missing) and the default results file (NAME-ift-test-results.json
    beside the script); --dropout on fine-tunes with 0.1 where model.json says 0."""
    records = instruction_records(40)  # 34 train (4 batches of 8), 4 test, 2 validation
    name = f"pytest-{uuid.uuid4().hex[:12]}"
    results = PROJECT_ROOT / f"{name}-ift-test-results.json"
    try:
        with FileServer(json.dumps(records).encode()) as server:
            result = run_script("ift_generate_test_responses.py", name, *checkpoint, "--dropout", "on",
                                "--data-url", server.url, "--max-epochs", 2, "--max-new-tokens", MAX_NEW_TOKENS,
                                "--generation-batch-size", 3, "--device", "cpu", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        text = results.read_text()
    finally:
        results.unlink(missing_ok=True)
    assert json.loads((tmp_path / "instruction-data.json").read_text()) == records and server.requests == 1

    losses, answers = the_originals_recipe(checkpoint[1], records, drop_rate=0.1, epochs=2)
    printed = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert printed == pytest.approx(losses, abs=1.5e-3) and len(printed) == 2
    # The test records as they were, each with its answer, json.dump's layout.
    expected = [dict(record, model_response=answer) for record, answer in zip(records[34:38], answers)]
    assert text == json.dumps(expected)
    assert f"Wrote 4 responses to {results}" in result.stdout


def test_mistakes_are_one_line_before_any_fine_tuning(checkpoint, tmp_path):
    data = tmp_path / "few.json"
    data.write_text(json.dumps(instruction_records(9)))  # 7 train, 0 test, 2 validation
    mistakes = {  # the first two are answered before torch is imported
        "no --dropout": (("run", *checkpoint), "Missing option '--dropout'", 2),
        "a path for NAME": (("../elsewhere", *checkpoint, "--dropout", "off"),
                            "Invalid value for 'NAME': '../elsewhere' is no file name", 2),
        "no such directory": (("run", *checkpoint, "--dropout", "off", "--results", tmp_path / "no" / "r.json"),
                              f"directory {tmp_path / 'no'} does not exist", 2),
        "too few records": (("run", *checkpoint, "--dropout", "model", "--data", data,
                             "--results", tmp_path / "r.json"), "9 records leave none for the test split", 1),
        "no download": (("run", *checkpoint, "--dropout", "model", "--data", tmp_path / "missing.json",
                         "--data-url", f"http://127.0.0.1:{free_port()}/x.json", "--results", tmp_path / "r.json"),
                        "could not download instruction data", 1),
        # The model's config is read before the data is downloaded.
        "no model.json": (("run", tmp_path / "missing-model.json", checkpoint[1], "--dropout", "model",
                           "--data", tmp_path / "missing.json", "--data-url", f"http://127.0.0.1:{free_port()}/x.json",
                           "--results", tmp_path / "r.json"), f"{tmp_path / 'missing-model.json'}", 1),
    }
    for case, (arguments, message, exit_code) in mistakes.items():
        result = run_script("ift_generate_test_responses.py", *arguments, "--device", "cpu", cwd=tmp_path)
        assert result.returncode == exit_code, (case, result.stderr)
        assert "Traceback" not in result.stderr and "Epoch" not in result.stdout, case
        [error_line] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert message in error_line, (case, result.stderr)
        if exit_code == 1:
            one_line_error(result, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["few.json"]
