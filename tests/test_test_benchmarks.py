"""test_benchmarks.py: lm-evaluation-harness really run, offline, on a tiny checkpoint and
the local tasks in tests/data/lm_eval_tasks, its scores checked against the same
loglikelihoods computed with our own GPTModel and tokenizer.

The script runs as users run it, in a subprocess, every time. lm-eval takes seconds to
start (its import; and, for a name that isn't a task of the include path, an index of the
~15,000 task files it ships, ~10 s), and torch a few more; the mistakes about paths are
found before either is imported.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from support import weights as weight_files
from support import tokenizer
from gpt import GPTModel
from helpers import PROJECT_ROOT, one_line_error, run_script

TASKS_DIR = "tests/data/lm_eval_tasks"  # its YAML files name their data relative to PROJECT_ROOT
DOCS = [json.loads(line) for line in
        (PROJECT_ROOT / TASKS_DIR / "tiny_choice.jsonl").read_text(encoding="utf-8").splitlines()]
# GPT-2's whole vocabulary (the tasks are text), everything else tiny; the context holds
# every question and choice, so nothing is truncated.
CONFIG = dict(vocab_size=50257, emb_dim=32, context_length=64, n_heads=4, n_layers=2,
              drop_rate=0.1, qkv_bias=True)
LIMIT = 9  # of the 12 examples


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """model.json + model.safetensors, written as checkpoints write them (the model config
    in the weights' metadata), of a GPTModel with large random weights: every choice gets
    a clearly different loglikelihood, so lm-eval and we can't pick differently by rounding."""
    directory = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    model = GPTModel(CONFIG)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
    (directory / "model.json").write_text(json.dumps(CONFIG))
    save_file(model.state_dict(), str(directory / "model.safetensors"),
              metadata={"format": "pt", weight_files.CONFIG_METADATA_KEY: json.dumps(CONFIG)})
    return directory, model.eval()


# --- the same numbers, our way ---

@torch.no_grad()
def loglikelihood(model, context, continuation):
    """log P(continuation | context): the sum of the log-softmax of each continuation
    token, with lm-eval's split of the text into tokens (the context's trailing spaces
    move to the continuation; the pair is encoded whole and cut after the context's tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    first = len(tokenizer.encode(context))
    assert 0 < first < len(whole) <= CONFIG["context_length"] + 1
    log_probs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), dim=-1)
    return sum(log_probs[position - 1, whole[position]].item() for position in range(first, len(whole)))


def mean_and_stderr(values):
    """lm-eval's mean and its standard error (sample standard deviation / sqrt n)."""
    values = np.array(values, dtype=float)
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


@pytest.fixture(scope="module")
def choice_loglikelihoods(checkpoint):
    """Every example's choices' loglikelihoods under the checkpoint's model, ours computed."""
    _, model = checkpoint
    # One thread: on a busy 2-core machine, waking a second one for these tiny matrices
    # costs ~10 ms an operation (8 s for the 48 choices instead of 0.3 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [np.array([loglikelihood(model, doc["question"], " " + choice) for choice in doc["choices"]])
                for doc in DOCS]
    finally:
        torch.set_num_threads(threads)


def expected_scores(choice_loglikelihoods, count):
    """acc, acc_norm and acc_bytes of tiny_choice over the first `count` examples as
    lm-eval defines them: the choice with the highest loglikelihood, divided by nothing,
    by its length in characters, by its length in UTF-8 bytes (the choice without the
    space before it); and tiny_answer's perplexity, exp(-mean loglikelihood of the right
    answer)."""
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    answers = []
    for doc, lls in zip(DOCS[:count], choice_loglikelihoods[:count]):
        choices = doc["choices"]
        for metric, lengths in (("acc", [1.0] * len(choices)),
                                ("acc_norm", [len(choice) for choice in choices]),
                                ("acc_bytes", [len(choice.encode("utf-8")) for choice in choices])):
            scores = lls / np.array(lengths, dtype=float)
            top_two = np.sort(scores)[-2:]
            assert top_two[1] - top_two[0] > 1e-2, "too close to call: pick another seed"
            hits[metric].append(float(np.argmax(scores) == doc["label"]))
        answers.append(lls[doc["label"]])
    scores = {metric: mean_and_stderr(values) for metric, values in hits.items()}
    scores["perplexity"] = (math.exp(-np.mean(answers)), None)
    return scores


def test_the_test_data_tells_the_metrics_apart(choice_loglikelihoods):
    """The labels were chosen so that the three accuracies differ, and differ again
    without --limit: a score computed the wrong way, or over the wrong examples, shows."""
    limited = expected_scores(choice_loglikelihoods, LIMIT)
    whole = expected_scores(choice_loglikelihoods, len(DOCS))
    accuracies = [limited[metric][0] for metric in ("acc", "acc_norm", "acc_bytes")]
    assert len(set(accuracies)) == 3 and 0 < min(accuracies) and max(accuracies) < 1
    for metric in limited:
        assert limited[metric][0] != pytest.approx(whole[metric][0])


# --- the script, as users run it ---

def run_benchmarks(*args, hf_home):
    return run_script("test_benchmarks.py", *args, env={
        "HF_HOME": str(hf_home),
        # Only the tests are offline; users need the Hub for hellaswag and friends.
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def table_rows(stdout):
    """{(task, metric): (value, stderr)} from the printed table."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"], stdout
    rows = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 3 or fields[0] not in ("tiny_choice", "tiny_answer"):
            break
        rows[fields[0], fields[1]] = (float(fields[2]), float(fields[3]) if len(fields) > 3 else None)
    return rows


def test_scores_equal_our_own_loglikelihoods(checkpoint, choice_loglikelihoods, tmp_path):
    directory, _ = checkpoint
    output = tmp_path / "results.json"
    result = run_benchmarks(directory / "model.json", directory / "model.safetensors",
                            "--tasks", "tiny_choice,tiny_answer", "--include-path", TASKS_DIR,
                            "--limit", LIMIT, "--device", "cpu", "--dtype", "fp32", "--batch-size", 5,
                            "--output", output, hf_home=tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = expected_scores(choice_loglikelihoods, LIMIT)

    # The file: lm-eval's results JSON, with the checkpoint named instead of the temporary export.
    results = json.loads(output.read_text(encoding="utf-8"))
    assert {"results", "configs", "versions", "n-shot", "n-samples", "config"} <= results.keys()
    assert results["n-samples"] == {"tiny_choice": {"original": 12, "effective": LIMIT},
                                    "tiny_answer": {"original": 12, "effective": LIMIT}}
    assert results["config"]["model"] == str(directory / "model.safetensors")
    assert results["config"]["limit"] == LIMIT and results["config"]["device"] == "cpu"
    scored = results["results"]
    for metric in ("acc", "acc_norm", "acc_bytes"):
        value, stderr = expected[metric]
        assert scored["tiny_choice"][f"{metric},none"] == pytest.approx(value, abs=1e-12), metric
        assert scored["tiny_choice"][f"{metric}_stderr,none"] == pytest.approx(stderr, rel=1e-9), metric
    # fp32 (theirs: transformers' GPT-2) against fp64 log-softmax over fp32 logits (ours).
    assert scored["tiny_answer"]["perplexity,none"] == pytest.approx(expected["perplexity"][0], rel=1e-4)

    # The table: the same numbers, rounded.
    rows = table_rows(result.stdout)
    assert set(rows) == {("tiny_choice", "acc"), ("tiny_choice", "acc_norm"),
                         ("tiny_choice", "acc_bytes"), ("tiny_answer", "perplexity")}
    for (task, metric), (value, stderr) in rows.items():
        assert value == pytest.approx(expected[metric][0], abs=1e-4 if task == "tiny_choice" else None,
                                      rel=None if task == "tiny_choice" else 1e-4)
        if metric != "perplexity":
            assert stderr == pytest.approx(expected[metric][1], abs=1e-4)
    assert f"--limit {LIMIT}: only the first {LIMIT} examples of each task" in result.stdout
    assert f"Results written to {output}" in result.stdout


# --- mistakes: one line each, nothing written ---

@pytest.fixture
def invoke(tmp_path_factory):
    """test_benchmarks.py run as users run it, offline, with a Hub cache outside tmp_path."""
    hf_home = tmp_path_factory.mktemp("hf")
    return lambda *args: run_benchmarks(*args, hf_home=hf_home)


def assert_one_line(result, *fragments):
    one_line_error(result, *fragments)
    assert result.stderr.startswith("Error: ")


def test_bad_paths_and_checkpoints_are_refused_before_any_work(checkpoint, tmp_path, invoke):
    directory, _ = checkpoint
    model_json, weights = directory / "model.json", directory / "model.safetensors"
    tasks = ["--tasks", "tiny_choice", "--device", "cpu"]

    assert_one_line(invoke(model_json, weights, *tasks, "--include-path", tmp_path / "nowhere"),
                    f"--include-path {tmp_path / 'nowhere'}: no such directory")
    assert_one_line(invoke(model_json, weights, *tasks, "--include-path", tmp_path),
                    f"--include-path {tmp_path}: holds no task files (*.yaml)")

    assert_one_line(invoke(model_json, weights, *tasks, "--output", tmp_path / "no" / "r.json"),
                    f"directory {tmp_path / 'no'} does not exist")
    # /proc exists, and root may write there, but it takes no new files.
    assert_one_line(invoke(model_json, weights, *tasks, "--output", "/proc/benchmarks.json"),
                    "--output /proc/benchmarks.json: cannot write there")
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    assert_one_line(invoke(model_json, weights, *tasks, "--output", earlier),
                    f"--output {earlier} already exists; pass --overwrite to replace it")
    assert earlier.read_text() == "{}"

    # Same shapes, other heads: only the config recorded in the weights tells.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**CONFIG, "n_heads": 2}))
    assert_one_line(invoke(other, weights, *tasks),
                    f"{weights} was written for n_heads 4, {other} has 2")
    small_vocab = {**CONFIG, "vocab_size": 100}
    (tmp_path / "small").mkdir()
    torch.manual_seed(0)
    save_file(GPTModel(small_vocab).state_dict(), str(tmp_path / "small" / "model.safetensors"))
    (tmp_path / "small" / "model.json").write_text(json.dumps(small_vocab))
    assert_one_line(invoke(tmp_path / "small" / "model.json", tmp_path / "small" / "model.safetensors", *tasks),
                    "vocab_size 100 is smaller than GPT-2's 50257")
    # transformers has no GPT-2 with experts: refused from model.json, the weights unread.
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps({**CONFIG, "moe": {"num_experts": 4, "num_active_experts": 2}}))
    assert_one_line(invoke(moe, tmp_path / "no-such.safetensors", *tasks),
                    f"{moe}: key 'moe': a mixture-of-experts model has no transformers equivalent",
                    "score it with our own test_loss.py, test_smoke.py or test_ift.py instead")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["earlier.json", "moe.json", "other.json", "small"]


def test_unknown_task_names_are_one_line_that_says_how_to_list_them(checkpoint, tmp_path, invoke):
    directory, _ = checkpoint
    output = tmp_path / "results.json"
    result = invoke(directory / "model.json", directory / "model.safetensors", "--device", "cpu",
                    "--tasks", "tiny_choice,hellaswg,tiny_*,no_such_task", "--include-path", PROJECT_ROOT / TASKS_DIR,
                    "--output", output)
    include = str(PROJECT_ROOT / TASKS_DIR)
    assert_one_line(result, "--tasks: unknown tasks 'hellaswg', 'no_such_task'",
                    f"nor in a task YAML under {include} that parses",
                    f"`uv run lm-eval ls tasks --include_path {include}`")
    assert not output.exists()


def test_a_task_that_runs_model_written_code_is_refused_before_the_model_loads(checkpoint, tmp_path):
    directory, _ = checkpoint
    result = run_benchmarks(directory / "model.json", directory / "model.safetensors", "--device", "cpu",
                            "--tasks", "tiny_unsafe", "--include-path", TASKS_DIR, hf_home=tmp_path / "hf")
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Error: lm-eval task 'tiny_unsafe' runs the code the model writes (lm-eval marks it unsafe); "
        "run it with lm-eval's own command line and --confirm_run_unsafe_code, in a sandbox")
    assert "Traceback" not in result.stderr
