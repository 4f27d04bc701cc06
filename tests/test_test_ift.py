"""test_ift.py run as users run it: a subprocess on a tiny checkpoint, judged by a stand-in
OpenAI-compatible server on 127.0.0.1 that the real openai client talks to over HTTP."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support import instruction_data
from support import tokenizer
from gpt import GPTModel, generate
from helpers import one_line_error, run_script, write_tiny_checkpoint
from servers.judge import JudgeServer

CONFIG = dict(vocab_size=50257, emb_dim=16, context_length=96, n_heads=2, n_layers=1,
              drop_rate=0.1, qkv_bias=False)
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey"]
PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n")


def run_ift(*args, **env):
    """test_ift.py with none of this machine's OPENAI_* settings, only those given."""
    unset = {name: None for name in os.environ if name.startswith("OPENAI_")}
    return run_script("test_ift.py", *args, env={**unset, **env})


def unscored_line(count, total, results):
    """The last line of a judged run that left records unscored."""
    return (f"Error: {count} of {total} test records are unscored (listed above); judge them "
            f"again with: uv run python test_ift.py --responses {results}")


def instruction_records(count):
    return [{"instruction": f"Name colour number {index}.",
             "input": f"a hint: {COLOURS[index % 8]}" if index % 3 == 0 else "",
             "output": f"The colour is {COLOURS[index % 8]}."} for index in range(count)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    write_tiny_checkpoint(directory, CONFIG)
    return directory / "model.json", directory / "model.safetensors"


@pytest.fixture(scope="module")
def judged_run(checkpoint, tmp_path_factory):
    """One full run: fine-tune 2 epochs, generate, judge through the Responses API."""
    directory = tmp_path_factory.mktemp("judged")
    records = instruction_records(40)  # 34 train (4 batches of 8), 4 test, 2 validation
    # The stand-in judge reads these tags in the reference output of each test record.
    records[34]["output"] += " [judge reply:90]"
    records[35]["output"] += " [judge http429 http500 reply:70]"   # retried until it answers
    records[36]["output"] += " [judge reply:great reply:55]"       # malformed once, then fine
    records[37]["output"] += " [judge reply:excellent]"            # malformed twice: unscored
    data = directory / "instructions.json"
    data.write_text(json.dumps(records))
    results = directory / "results.json"
    with JudgeServer(api_key="test-key", delay=0.2) as server:
        result = run_ift(*checkpoint, "--data", data, "--max-epochs", 2, "--max-new-tokens", 8,
                         "--judge-concurrency", 2, "--results", results, "--device", "cpu",
                         OPENAI_API_KEY="test-key", OPENAI_BASE_URL=server.url)
    return result, records, results, server


def test_fine_tunes_generates_judges_and_reports(judged_run):
    result, records, results_path, server = judged_run
    # The one unscored record makes the run fail, in one line at the end.
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == unscored_line(1, 4, results_path)
    assert "Traceback" not in result.stderr
    assert "Epoch 1: train loss " in result.stdout and "Epoch 2: train loss " in result.stdout
    assert result.stdout.count("Dataset response:") == 3
    assert "Number of scores: 3 of 4\nAverage score: 71.67\n" in result.stdout
    assert "'excellent'" in result.stdout  # the unscored record is reported

    results = json.loads(results_path.read_text())
    saved = results["records"]
    assert [record["reference"] for record in saved] == [r["output"] for r in records[34:38]]
    assert [record["score"] for record in saved] == [90, 70, 55, None]
    assert "not an integer from 0 to 100" in saved[3]["error"]
    assert saved[0]["prompt"] == PREAMBLE + "Name colour number 34."
    assert saved[2]["prompt"] == PREAMBLE + "Name colour number 36.\n\n### Input\na hint: black"
    assert results["number_of_scores"] == 3 and results["average_score"] == pytest.approx(71.667, abs=1e-3)
    assert results["fine_tuning"]["epochs_run"] == 2

    # Every request went to the Responses API with the seed's question and judge model.
    expected_prompts = [
        f"Given the input `{record['prompt']}` and correct output `{record['reference']}`, score "
        f"the model response `{record['response']}` on a scale of 0 to 100, where 100 is the "
        f"best score. Respond with the integer number only." for record in saved]
    assert {path for path, _, _ in server.requests} == {"/v1/responses"}
    assert {model for _, model, _ in server.requests} == {"gpt-5.1"}
    # 429 and 500 retried, a malformed reply asked once more and no more.
    assert [server.attempts[prompt] for prompt in expected_prompts] == [1, 3, 2, 2]
    assert server.max_in_flight == 2  # concurrent, and bounded by --judge-concurrency


def test_rejudge_saved_responses_through_chat_completions(judged_run, tmp_path):
    """--responses FILE judges again with no model; a local server needs no API key."""
    _, _, first_results, _ = judged_run
    rejudged = tmp_path / "rejudged.json"
    with JudgeServer(api_key=None, models=["local-judge"]) as server:
        result = run_ift("--responses", first_results, "--judge-api", "chat",
                         "--judge-model", "local-judge", "--judge-base-url", server.url,
                         "--results", rejudged)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == unscored_line(1, 4, rejudged)
    assert "Epoch" not in result.stdout and "generating" not in result.stderr
    assert {(path, model) for path, model, _ in server.requests} == \
        {("/v1/chat/completions", "local-judge")}
    before = json.loads(first_results.read_text())["records"]
    after = json.loads(rejudged.read_text())["records"]
    assert [r["response"] for r in after] == [r["response"] for r in before]
    assert [r["score"] for r in after] == [90, 70, 55, None]
    assert "Number of scores: 3 of 4" in result.stdout


def test_a_run_whose_judge_scores_nothing_fails(tmp_path):
    """A judge that answers HTTP 500 until the client gives up, or never a score: the run
    ends with exit status 1 and one line saying how many records are unscored, and the
    results file is written all the same, for --responses."""
    records = [{"prompt": f"Name colour number {n}.", "reference": f"Red. [judge {script}]",
                "response": "Red."} for n, script in enumerate(["http500", "reply:garbage"])]
    saved, results = tmp_path / "saved.json", tmp_path / "results.json"
    saved.write_text(json.dumps({"records": records}))
    with JudgeServer() as server:
        result = run_ift("--responses", saved, "--judge-base-url", server.url,
                         "--judge-max-retries", 1, "--results", results)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == unscored_line(2, 2, results)
    assert "Number of scores: 0 of 2\nAverage score: none\n" in result.stdout
    judged = json.loads(results.read_text())["records"]
    assert [record["score"] for record in judged] == [None, None]
    assert judged[0]["error"] == "HTTP 500: The server had an error (gave up after 2 attempts)"
    assert judged[1]["error"] == "reply is not an integer from 0 to 100: 'garbage'"
    assert sorted(server.attempts.values()) == [2, 2]


def test_missing_api_key_is_reported_before_fine_tuning(checkpoint, tmp_path):
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(instruction_records(20)))
    results = tmp_path / "results.json"
    result = run_ift(*checkpoint, "--data", data, "--results", results, "--device", "cpu")
    one_line_error(result, "OPENAI_API_KEY is not set")
    assert "Epoch" not in result.stdout and not results.exists()


@pytest.fixture(scope="module")
def stopping_checkpoint(tmp_path_factory):
    """A checkpoint that sometimes says <|endoftext|>: it takes over one ordinary token's row."""
    directory = tmp_path_factory.mktemp("eos")
    records = instruction_records(60)
    test_prompts = [instruction_data.format_prompt(r) for r in records[51:57]]
    torch.manual_seed(3)
    model = GPTModel(CONFIG).eval()
    first_answer = generate(model, [tokenizer.encode(test_prompts[0])], 10)[0]
    with torch.no_grad():  # wherever the model would say this token, it now says end-of-text
        model.out_head.weight[tokenizer.END_OF_TEXT_ID] = 1.05 * model.out_head.weight[first_answer[3]]
    (directory / "model.json").write_text(json.dumps(CONFIG))
    save_file(model.state_dict(), directory / "model.safetensors")
    (directory / "instructions.json").write_text(json.dumps(records))
    return directory, model, test_prompts


def test_batched_generation_equals_one_at_a_time(stopping_checkpoint, tmp_path):
    directory, model, prompts = stopping_checkpoint
    results = tmp_path / "results.json"
    result = run_ift(directory / "model.json", directory / "model.safetensors",
                     "--data", directory / "instructions.json", "--max-epochs", 0, "--no-judge",
                     "--generation-batch-size", 4, "--max-new-tokens", 10, "--results", results,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Responses written to" in result.stdout

    alone = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt)
        new_ids = generate(model, [prompt_ids], 10, eos_id=tokenizer.END_OF_TEXT_ID)[0]
        alone.append(new_ids)
        text = tokenizer.decode(prompt_ids + new_ids)
        alone[-1] = (len(new_ids), text[len(prompt):].replace("### Response:", "").strip())
    # The case worth testing: some answers stop early, some run to the token limit.
    assert {length < 10 for length, _ in alone} == {True, False}
    saved = json.loads(results.read_text())["records"]
    assert [record["response"] for record in saved] == [text for _, text in alone]
    assert all(record["score"] is None for record in saved)


@pytest.mark.skipif(not Path("/proc/self").exists() or os.geteuid() != 0,
                    reason="needs Linux's /proc, writable to root only")
def test_results_that_cannot_be_written_are_one_line(stopping_checkpoint):
    # /proc passes the up-front checks (it exists; root may write to it) but takes no new
    # files: the write itself fails, after the generation.
    directory, _, _ = stopping_checkpoint
    results = Path("/proc/test-ift-results.json")
    result = run_ift(directory / "model.json", directory / "model.safetensors",
                     "--data", directory / "instructions.json", "--max-epochs", 0, "--no-judge",
                     "--max-new-tokens", 2, "--results", results, "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: Invalid value for --results: cannot write {results} (")
