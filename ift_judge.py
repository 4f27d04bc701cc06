"""Judge two or more models' instruction-test answers side by side with an LLM.

    uv run python ift_judge.py FILE FILE [FILE ...]

The later original's second half of the instruction test: each FILE is a results file of
ift_generate_test_responses.py (the same test records, each with its `model_response`).
For every record one judge request shows all the models' answers, in a fresh random
order, as "Model 1", "Model 2", ..., and asks for a JSON score from 0 to 100 for each.
Writes `STEM-annotated.json` into the current directory for every FILE (its records with
`llm_score` and `llm_comments`) and prints each file's mean score. A reply that can't be
read is asked for again once; a record still unscored is left out of the means, and the
run then ends with exit status 1 and a line saying how many.
"""

import json
import os
import random
from pathlib import Path

import click

from support import instruction_data
from support import judge
from support import safe_files
from support.command_line import answer_usage_first

RESPONSE_KEY = "model_response"
ANNOTATED_SUFFIX = "-annotated.json"
UNSCORED_SHOWN = 10


def at_least_two(context, parameter, files):
    if len(files) < 2:
        raise click.UsageError(f"give at least two results files to compare side by side (got {len(files)})")
    return files


@click.command()
@click.argument("result_files", nargs=-1, metavar="FILE FILE [FILE ...]", callback=at_least_two,
                type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=None,
              help="Seed the order in which each record's answers are shown, for a run that can be "
                   "repeated (default: a fresh order every run, as the original).")
@judge.judge_options(judge.COMPARATIVE_DEFAULT_MODEL)
def main(**arguments):
    """Judge two or more ift_generate_test_responses.py results files side by side with an
    LLM, writing STEM-annotated.json for each and printing each file's mean score."""
    judge_side_by_side(**arguments)


answer_usage_first(main)
# Only now, with the command line known to be good: tqdm and (in judge) openai take a
# while to import.
from tqdm import tqdm  # noqa: E402


# --- the files ---

def annotated_paths(files):
    """Where each file's annotations go: STEM-annotated.json in the current directory, as
    the original writes them; refused before any work if two files would share one, or
    if the current directory can't be written."""
    if not os.access(Path.cwd(), os.W_OK):
        raise click.ClickException(f"{Path.cwd()}: the current directory is not writable, and the annotations "
                                   f"go there (STEM{ANNOTATED_SUFFIX}): run ift_judge.py from another")
    paths, seen = [], {}
    for file in files:
        if Path(file).resolve() in seen.values():
            raise click.BadParameter(f"{file} is given twice", param_hint="FILE")
        path = Path(Path(file).stem + ANNOTATED_SUFFIX)
        if path in seen:
            raise click.BadParameter(f"{seen[path]} and {file} would both be annotated into {path} "
                                     f"(files of the same name in different directories); rename one",
                                     param_hint="FILE")
        seen[path] = Path(file).resolve()
        paths.append(path)
    return paths


def read_results(path):
    """A results file: instruction_data's records (a non-empty JSON list with text under
    instruction, input and output), each with text under model_response too; one line
    naming the file and record if not."""
    records = instruction_data.load_records(path, url=None)
    for index, record in enumerate(records):
        if not isinstance(record.get(RESPONSE_KEY), str):
            raise click.ClickException(f"{path}: record {index} has no text under '{RESPONSE_KEY}'")
    return records


def check_same_records(files, results):
    """Every file answers the same test records, in the same order."""
    first_file, first = files[0], results[0]
    for file, records in zip(files[1:], results[1:]):
        if len(records) != len(first):
            raise click.ClickException(f"{file} holds {len(records)} records, {first_file} holds {len(first)}: "
                                       "results of different test sets")
        for index, (record, reference) in enumerate(zip(records, first)):
            for key in instruction_data.RECORD_KEYS:
                if record[key] != reference[key]:
                    raise click.ClickException(f"{file}: record {index}'s '{key}' differs from {first_file}'s: "
                                               "results of different test sets")


# --- judging ---

def ask_the_judge(settings, files, results, seed):
    """One side-by-side verdict per record, in a fresh order each. Returns, per file, per
    record, (score or None, comments, error or None)."""
    shuffler = random.Random(seed)
    count = len(results[0])
    orders = [shuffler.sample(range(len(files)), k=len(files)) for _ in range(count)]
    prompts = [judge.comparative_prompt(instruction_data.format_prompt(results[0][index]),
                                        results[0][index]["output"],
                                        [results[shown][index][RESPONSE_KEY] for shown in order])
               for index, order in enumerate(orders)]
    verdicts = [[None] * count for _ in files]
    progress = tqdm(total=count, desc="judging", unit="record")

    def on_verdict(index, verdict):
        for position, file_index in enumerate(orders[index]):
            if verdict.score is None:
                verdicts[file_index][index] = (None, "", verdict.error)
            else:
                score, comments = verdict.score[position]
                verdicts[file_index][index] = (score, comments, None)
        progress.update()

    try:
        judge.score_all(settings, prompts, on_verdict,
                        parse=lambda reply: judge.parse_comparison(reply, len(files)),
                        expected=judge.comparison_expected(len(files)))
    finally:
        progress.close()
    return verdicts


def annotated(records, verdicts):
    """The records with llm_score and llm_comments (the original's keys); an unscored one
    has llm_score null and says why under llm_error."""
    out = []
    for record, (score, comments, error) in zip(records, verdicts):
        extra = {"llm_score": score, "llm_comments": comments}
        if error is not None:
            extra["llm_error"] = error
        out.append({**record, **extra})
    return out


def write_annotations(paths, results, verdicts):
    for path, records, file_verdicts in zip(paths, results, verdicts):
        try:
            safe_files.write_atomically(path, json.dumps(annotated(records, file_verdicts)))
        except OSError as error:
            raise click.ClickException(safe_files.write_failure(path.resolve().parent, "the annotations", error,
                                                                path)) from None


def report(files, verdicts):
    """Each file's mean over its scored records, as the original prints it; the unscored
    records, and how many there are."""
    for file, file_verdicts in zip(files, verdicts):
        scores = [score for score, _, _ in file_verdicts if score is not None]
        print(f"{file}: {sum(scores) / len(scores):.2f}" if scores else f"{file}: none scored")
    unscored = [(index, error) for index, (score, _, error) in enumerate(verdicts[0]) if score is None]
    for index, error in unscored[:UNSCORED_SHOWN]:
        print(f"  unscored: record {index}: {error}")
    if len(unscored) > UNSCORED_SHOWN:
        print(f"  ... and {len(unscored) - UNSCORED_SHOWN} more")
    return len(unscored)


def judge_side_by_side(result_files, seed, judge_model, judge_api, judge_base_url, judge_concurrency,
                       judge_max_retries):
    paths = annotated_paths(result_files)
    settings = judge.settings_from_environment(judge_model, judge_api, judge_base_url, judge_concurrency,
                                               judge_max_retries)
    results = [read_results(file) for file in result_files]
    check_same_records(result_files, results)
    warning = judge.model_warning(settings)  # a wrong key or address fails here, before any judging
    if warning is not None:
        click.echo(warning, err=True)

    # Written once every record has its verdict: a judge that stops answering, or Ctrl-C,
    # leaves earlier annotations as they were.
    verdicts = ask_the_judge(settings, result_files, results, seed)
    write_annotations(paths, results, verdicts)
    unscored = report(result_files, verdicts)
    if unscored:
        raise click.ClickException(
            f"{unscored} of {len(results[0])} records are unscored (listed above; each says why under "
            f"llm_error in {', '.join(map(str, paths))}) and left out of the means")


if __name__ == "__main__":
    main()
