"""Every user script answers `--help` and usage mistakes before importing anything heavy.

The scripts run as users run them, under `python -X importtime`, whose log on stderr names
every module the process imported: a check that holds on any machine, where a stopwatch
would measure the machine's load. Also command_line.answer_usage_first against click's own
standalone handling, on a small command of the test's own.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What takes seconds to import; none of it may load before the command line is answered.
HEAVY_MODULES = ("torch", "numpy", "pyarrow", "pandas", "datasets", "matplotlib", "openai",
                 "transformers", "lm_eval")

DDP_TRAIN = "ddp_train.py"
SCRIPTS = [DDP_TRAIN, "test_smoke.py", "test_loss.py", "test_ift.py", "export_hf.py", "import_hf.py",
           "prepare_datasets.py", "download-fineweb-10b.py", "make_sample_corpus.py", "chart.py",
           "test_benchmarks.py", "ift_generate_test_responses.py", "ift_judge.py", "upload_model.py"]
# The scripts with an argument that must be given.
SCRIPTS_WITH_ARGUMENTS = [DDP_TRAIN, "test_smoke.py", "test_loss.py", "export_hf.py",
                          "import_hf.py", "prepare_datasets.py", "chart.py", "test_benchmarks.py",
                          "ift_generate_test_responses.py", "upload_model.py"]


def run_with_import_log(*command, cwd=PROJECT_ROOT):
    return subprocess.run([sys.executable, "-X", "importtime", *map(str, command)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def imported_modules(import_log):
    """The top-level packages named in an `-X importtime` log."""
    names = set()
    for line in import_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the log's header line
                names.add(name.split(".")[0])
    return names


def messages(stderr):
    """stderr without the import log."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


def assert_nothing_heavy(result):
    heavy = sorted(imported_modules(result.stderr) & set(HEAVY_MODULES))
    assert not heavy, f"imported before the command line was answered: {', '.join(heavy)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_the_script_does_before_any_heavy_import(script):
    result = run_with_import_log(script, "--help")
    assert result.returncode == 0, messages(result.stderr)
    assert result.stdout.startswith(f"Usage: {script} [OPTIONS]")
    # click prints the command's docstring as the paragraph after the usage line(s).
    description = result.stdout.split("\n\n")[1]
    assert description.strip() and not description.startswith("Options:"), result.stdout
    assert "\nOptions:\n" in result.stdout
    assert_nothing_heavy(result)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_option_is_a_usage_error_before_any_heavy_import(script):
    result = run_with_import_log(script, "--no-such-option")
    assert result.returncode == 2, result.stdout + messages(result.stderr)
    assert result.stdout == ""
    assert f"Usage: {script} [OPTIONS]" in result.stderr
    assert "Error: No such option '--no-such-option'" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_heavy(result)


@pytest.mark.parametrize("script", SCRIPTS_WITH_ARGUMENTS)
def test_a_missing_argument_is_a_usage_error_before_any_heavy_import(script):
    result = run_with_import_log(script)
    assert result.returncode == 2, result.stdout + messages(result.stderr)
    assert "Error: Missing argument" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_heavy(result)


# --- answer_usage_first against click's standalone mode ---

TOOL = '''
import sys

import click

sys.path.insert(0, {project_root!r})
from support.command_line import answer_usage_first


@click.command()
@click.argument("name")
@click.option("--count", type=click.IntRange(min=1), default=1, help="How many greetings.")
def main(name, count):
    """Greet NAME."""
    print(f"hello {{name}} x{{count}}")

'''


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """The same command twice, both files named tool.py: one answers its command line
    first and then reports that it went on, the other is click alone."""
    root = tmp_path_factory.mktemp("tools")
    source = TOOL.format(project_root=str(PROJECT_ROOT))
    (root / "helped").mkdir()
    (root / "helped" / "tool.py").write_text(source + textwrap.dedent('''
        answer_usage_first(main)
        print("went on to the slow imports")
        if __name__ == "__main__":
            main()
        '''))
    (root / "plain").mkdir()
    (root / "plain" / "tool.py").write_text(source + textwrap.dedent('''
        if __name__ == "__main__":
            main()
        '''))
    return root


def run_tool(directory, *arguments):
    return subprocess.run([sys.executable, "tool.py", *arguments], cwd=directory,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("arguments", [["--help"], [], ["--bogus"], ["world", "--count", "0"],
                                       ["world", "--count"], ["world", "extra"]])
def test_help_and_mistakes_are_answered_exactly_as_click_answers_them(tools, arguments):
    helped, plain = run_tool(tools / "helped", *arguments), run_tool(tools / "plain", *arguments)
    assert plain.returncode in (0, 2)  # the cases are what they claim to be
    assert (helped.returncode, helped.stdout, helped.stderr) == \
        (plain.returncode, plain.stdout, plain.stderr)


def test_a_good_command_line_goes_on_and_runs(tools):
    result = run_tool(tools / "helped", "world", "--count", "2")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "went on to the slow imports\nhello world x2\n"


def test_importing_the_script_answers_nothing(tools):
    """Tests and multiprocessing workers import scripts; sys.argv is not theirs to answer."""
    result = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['x', '--bogus']; "
                             "import tool; print('imported')"], cwd=tools / "helped",
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "went on to the slow imports\nimported\n"
