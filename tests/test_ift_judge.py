"""ift_judge.py run as users run it, against the stand-in judge (tests/servers/judge.py) on
127.0.0.1 that the real openai client reaches over HTTP.

The stand-in scores each answer it is shown by the `[score N]` tag in it and says in
its comment which "Model N" that answer was shown as, so the test can tell that the
scores went back to the files they belong to, whatever order each record was shown in.
"""

import json
import os
import re

import pytest

from helpers import one_line_error, run_script
from servers.judge import JudgeServer

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


def records(count=6):
    return [{"instruction": f"Name colour number {index}.", "input": "a hint" if index % 2 else "",
             "output": f"The colour is {COLOURS[index % 6]}."} for index in range(count)]


def write_results(path, score_of, scripts=None):
    """A results file as ift_generate_test_responses.py writes it: each answer tagged with
    the score the stand-in is to give it; scripts {index: judge steps} go in the reference."""
    rows = []
    for index, record in enumerate(records()):
        if scripts and index in scripts:
            record["output"] += f" [judge {scripts[index]}]"
        name = path.stem.split("-")[0]
        rows.append({**record, "model_response": f"{name} says {COLOURS[index]} [score {score_of(index)}]"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def run_judge(*args, cwd, **env):
    """ift_judge.py with none of this machine's OPENAI_* settings, only those given."""
    unset = {name: None for name in os.environ if name.startswith("OPENAI_")}
    return run_script("ift_judge.py", *args, cwd=cwd, env={**unset, **env})


SCORES = {"alpha": lambda index: 80 + index, "beta": lambda index: 30, "gamma": lambda index: 10 * index}
SCRIPTS = {2: "http500 compare", 3: "compare-fenced", 4: "reply:garbage compare", 5: "compare-without:2"}


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    root = tmp_path_factory.mktemp("judged")
    files = [write_results(root / "in" / f"{name}-ift-test-results.json", score, SCRIPTS)
             for name, score in SCORES.items()]
    (root / "out").mkdir()
    with JudgeServer(api_key="test-key", delay=0.05) as server:
        result = run_judge(*files, "--seed", 3, "--judge-concurrency", 2, cwd=root / "out",
                           OPENAI_API_KEY="test-key", OPENAI_BASE_URL=server.url)
    return {"result": result, "files": files, "server": server, "out": root / "out"}


def shown_order(prompt):
    """The files' names in the order the prompt showed their answers."""
    return re.findall(r"^# Model \d+\n\n```\n(\w+) says", prompt, flags=re.MULTILINE)


def test_scores_go_back_to_their_files_whatever_the_order(judged):
    files, server, out = judged["files"], judged["server"], judged["out"]
    names = list(SCORES)
    annotated = {name: json.loads((out / f"{name}-ift-test-results-annotated.json").read_text()) for name in names}
    for name, file in zip(names, files):
        saved = json.loads(file.read_text())
        assert [{k: v for k, v in r.items() if not k.startswith("llm_")} for r in annotated[name]] == saved
    # Each record was asked about once, with every answer: as many orders as the shuffles gave.
    prompts = {}
    for path, model, prompt in server.requests:
        assert (path, model) == ("/v1/responses", "gpt-5.5")  # the later original's judge
        prompts.setdefault(prompt, shown_order(prompt))
    assert len(prompts) == 6 and len({tuple(order) for order in prompts.values()}) > 1
    for prompt, order in prompts.items():
        index = next(i for i in range(6) if f"Name colour number {i}." in prompt)
        if index == 5:  # "Model 2" was never in the reply
            continue
        for position, name in enumerate(order, 1):
            record = annotated[name][index]
            assert record["llm_score"] == SCORES[name](index), (name, index)
            assert record["llm_comments"] == f"shown as Model {position}"
            assert "llm_error" not in record


def test_an_unreadable_reply_is_asked_again_once_then_the_record_is_unscored(judged):
    result, server, out = judged["result"], judged["server"], judged["out"]
    attempts = {next(i for i in range(6) if f"Name colour number {i}." in prompt): count
                for prompt, count in server.attempts.items()}
    assert attempts == {0: 1, 1: 1, 2: 2, 3: 1, 4: 2, 5: 2}  # the 500 retried by the SDK
    for name in SCORES:
        record = json.loads((out / f"{name}-ift-test-results-annotated.json").read_text())[5]
        assert record["llm_score"] is None and record["llm_comments"] == ""
        assert record["llm_error"].startswith('reply is not a JSON object scoring "Model 1" to "Model 3" from 0 to '
                                              '100: \'{"Model 1": ')
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Error: 1 of 6 records are unscored (listed above; each says why under llm_error in "
        "alpha-ift-test-results-annotated.json, beta-ift-test-results-annotated.json, "
        "gamma-ift-test-results-annotated.json) and left out of the means")
    # The means over the five scored records, as the original prints them.
    lines = result.stdout.splitlines()
    for name, file in zip(SCORES, judged["files"]):
        assert f"{file}: {sum(SCORES[name](index) for index in range(5)) / 5:.2f}" in lines
    assert "  unscored: record 5: reply is not a JSON object" in result.stdout


def test_all_scored_through_chat_completions_exits_zero(tmp_path):
    files = [write_results(tmp_path / "a" / "run.json", lambda index: 70),
             write_results(tmp_path / "b.json", lambda index: 40 + index)]
    with JudgeServer(models=["local-judge"]) as server:  # a local server: no key needed
        result = run_judge(*files, "--judge-api", "chat", "--judge-model", "local-judge",
                           "--judge-base-url", server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [f"{files[0]}: 70.00", f"{files[1]}: 42.50"]
    assert {(path, model) for path, model, _ in server.requests} == {("/v1/chat/completions", "local-judge")}
    annotated = json.loads((tmp_path / "run-annotated.json").read_text())
    assert [record["llm_score"] for record in annotated] == [70] * 6


def test_mistakes_are_one_line_and_write_nothing(tmp_path):
    good = write_results(tmp_path / "good.json", lambda index: 50)
    other = write_results(tmp_path / "other.json", lambda index: 50)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(json.loads(good.read_text())[:5]))
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([dict(r, output="Something else.") if i == 2 else r
                                   for i, r in enumerate(json.loads(good.read_text()))]))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    unanswered = tmp_path / "unanswered.json"
    unanswered.write_text(json.dumps([{k: v for k, v in r.items() if k != "model_response"}
                                      for r in json.loads(good.read_text())]))
    namesake = write_results(tmp_path / "elsewhere" / "good.json", lambda index: 50)
    local = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # never reached: each refusal comes first
    mistakes = [
        ((good,), {}, "Error: give at least two results files to compare side by side (got 1)", 2),
        ((good, good), local, f"{good} is given twice", 2),
        ((good, namesake), local, f"{good} and {namesake} would both be annotated into good-annotated.json", 2),
        ((good, other), {}, "OPENAI_API_KEY is not set: the judge needs it. Set it, or point OPENAI_BASE_URL", 1),
        ((good, short), local, f"{short} holds 5 records, {good} holds 6: results of different test sets", 1),
        ((good, changed), local, f"{changed}: record 2's 'output' differs from {good}'s", 1),
        ((empty, good), local, f"{empty}: the list of records is empty", 1),
        ((good, unanswered), local, f"{unanswered}: record 0 has no text under 'model_response'", 1),
        ((good, tmp_path / "missing.json"), local, f"{tmp_path / 'missing.json'}: file not found", 1),
    ]
    for files, env, message, exit_code in mistakes:
        result = run_judge(*files, cwd=tmp_path, **env)
        if exit_code == 1:
            one_line_error(result, message)
        else:
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert message in result.stderr.splitlines()[-1], result.stderr

    # A judge out of quota stops at once, and earlier annotations stay as they were.
    (tmp_path / "good-annotated.json").write_text("an earlier run's")
    quota = [write_results(tmp_path / f"quota-{n}.json", lambda index: 50, {0: "quota"}) for n in (1, 2)]
    with JudgeServer() as server:
        result = run_judge(*quota, cwd=tmp_path, OPENAI_BASE_URL=server.url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "reports no quota left" in result.stderr.splitlines()[-1]
    assert (tmp_path / "good-annotated.json").read_text() == "an earlier run's"
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith("-annotated.json")
                and path.name != "good-annotated.json"]
