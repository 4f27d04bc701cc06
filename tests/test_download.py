"""download-fineweb-10b.py against the Hub stand-in (tests/servers/hub.py) on 127.0.0.1.

The script runs as a user runs it, in a subprocess: huggingface_hub reads HF_ENDPOINT when
it is imported, and Ctrl-C is a real SIGINT.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port
from servers.hub import HubServer

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "download-fineweb-10b.py"
TOKEN = "hf_test_token_never_printed"


def make_repo(root, name, files):
    for path, size in files.items():
        file = root / "datasets" / "HuggingFaceFW" / name / path
        file.parent.mkdir(parents=True, exist_ok=True)
        # Distinct bytes per file, so a mix-up between files can't go unnoticed.
        file.write_bytes(os.urandom(size))


@pytest.fixture
def hub_root(tmp_path):
    root = tmp_path / "hub"
    for name in ("fineweb-edu", "fineweb"):
        make_repo(root, name, {
            "sample/10BT/000_00000.parquet": 300_000,
            "sample/10BT/001_00000.parquet": 200_000,
            "sample/100BT/000_00000.parquet": 100_000,
            "data/CC-MAIN-2024-10/000_00000.parquet": 100_000,
            "README.md": 1_000,
        })
    return root


def environment(endpoint, home, token=TOKEN):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_TOKEN=token,
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    return env


def start_download(*arguments, endpoint, cwd, token=TOKEN):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(SCRIPT), *arguments], cwd=cwd,
                            env=environment(endpoint, cwd.parent / "hf-home", token),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def download(*arguments, endpoint, cwd, token=TOKEN):
    return finish(start_download(*arguments, endpoint=endpoint, cwd=cwd, token=token))


def files_under(directory):
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*")
                  if path.is_file() and ".cache" not in path.parts)


def content_gets(hub):
    return [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]


def test_default_fetches_both_10bt_samples_and_a_rerun_fetches_nothing(hub_root, tmp_path):
    work = tmp_path / "work"
    with HubServer(hub_root, token=TOKEN) as hub:
        result = download(endpoint=hub.url, cwd=work)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert [line.split(" in ")[0] for line in lines] == [
            "Downloaded HuggingFaceFW/fineweb-edu sample/10BT/* (2 file(s), 0.5 MB) to fineweb-edu",
            "Downloaded HuggingFaceFW/fineweb sample/10BT/* (2 file(s), 0.5 MB) to fineweb"]
        assert all(line.endswith(" seconds") for line in lines)
        for name in ("fineweb-edu", "fineweb"):
            assert files_under(work / name) == ["sample/10BT/000_00000.parquet",
                                                "sample/10BT/001_00000.parquet"]
            for path in files_under(work / name):
                assert (work / name / path).read_bytes() == (
                    hub_root / "datasets" / "HuggingFaceFW" / name / path).read_bytes()
        # The token from HF_TOKEN was sent with every request, and never shown.
        assert set(hub.authorizations) == {f"Bearer {TOKEN}"}
        assert TOKEN not in result.stdout + result.stderr
        fetched = len(content_gets(hub))
        assert fetched == 4

        again = download(endpoint=hub.url, cwd=work)
        assert again.returncode == 0, again.stderr
        assert len(content_gets(hub)) == fetched  # everything was there already


def test_options_choose_dataset_sample_and_destination(hub_root, tmp_path):
    with HubServer(hub_root) as hub:
        result = download("--dataset", "fineweb", "--sample", "100BT", "--dest", "data/raw",
                          endpoint=hub.url, cwd=tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "work" / "data" / "raw") == ["fineweb/sample/100BT/000_00000.parquet"]


def test_ctrl_c_stops_at_once_and_the_next_run_continues(hub_root, tmp_path):
    work = tmp_path / "work"
    slow = "sample/10BT/001_00000.parquet"
    make_repo(hub_root, "fineweb", {slow: 4_000_000})
    with HubServer(hub_root) as hub:
        hub.slow_downloads[slow] = 0.2  # 64 KiB every 200 ms: about 12 s for the whole file
        process = start_download("--dataset", "fineweb", endpoint=hub.url, cwd=work)
        deadline = time.monotonic() + 60
        while not (hub.bytes_sent.get(("HuggingFaceFW/fineweb", slow), 0) > 0
                   and (work / "fineweb" / "sample/10BT/000_00000.parquet").exists()):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        interrupted_at = time.monotonic()
        process.send_signal(signal.SIGINT)
        stderr = finish(process).stderr
        assert time.monotonic() - interrupted_at < 6  # well before the slow file would finish
        assert process.returncode == 130
        assert stderr.strip().splitlines()[-1] == (
            "Interrupted: files already complete in fineweb are kept; run the same command "
            "again to fetch the rest")
        assert "Traceback" not in stderr
        # Nothing half-written under a final name, and no leftovers of the partial file.
        assert files_under(work / "fineweb") == ["sample/10BT/000_00000.parquet"]
        assert not list((work / "fineweb").rglob("*.incomplete"))

        hub.slow_downloads.clear()
        rerun = download("--dataset", "fineweb", endpoint=hub.url, cwd=work)
        assert rerun.returncode == 0, rerun.stderr
        assert hub.downloads_of("sample/10BT/000_00000.parquet") == 1  # not fetched again
        assert hub.downloads_of(slow) == 2
        assert (work / "fineweb" / slow).read_bytes() == (
            hub_root / "datasets" / "HuggingFaceFW" / "fineweb" / slow).read_bytes()


def test_a_failed_file_is_reported_and_the_next_run_fetches_only_it(hub_root, tmp_path):
    work = tmp_path / "work"
    broken = "sample/10BT/000_00000.parquet"
    with HubServer(hub_root) as hub:
        hub.fail_downloads[broken] = 500
        result = download("--dataset", "fineweb-edu", endpoint=hub.url, cwd=work)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(
            "Error: downloading HuggingFaceFW/fineweb-edu into fineweb-edu failed (HfHubHTTPError: "
            "Server error '500 Internal Server Error' for url")
        assert result.stderr.strip().endswith("run the same command again to continue")
        assert files_under(work / "fineweb-edu") == ["sample/10BT/001_00000.parquet"]

        hub.fail_downloads.clear()
        rerun = download("--dataset", "fineweb-edu", endpoint=hub.url, cwd=work)
        assert rerun.returncode == 0, rerun.stderr
        assert hub.downloads_of("sample/10BT/001_00000.parquet") == 1
        assert files_under(work / "fineweb-edu") == ["sample/10BT/000_00000.parquet",
                                                     "sample/10BT/001_00000.parquet"]


def test_problems_end_in_one_line_saying_what_to_do(hub_root, tmp_path):
    work = tmp_path / "work"
    with HubServer(hub_root, token=TOKEN) as hub:
        url = hub.url
        # Independent runs, started together to save time.
        wrong_token, no_sample, unreachable, bad_option = [finish(process) for process in [
            start_download(endpoint=url, cwd=work, token="hf_wrong"),
            start_download("--sample", "350BT", endpoint=url, cwd=work),
            start_download(endpoint=f"http://127.0.0.1:{free_port()}", cwd=work),
            start_download("--sample", "5BT", endpoint=url, cwd=work),
        ]]

    def last_line(result):
        assert result.returncode != 0 and "Traceback" not in result.stderr
        return result.stderr.strip().splitlines()[-1]

    assert last_line(wrong_token) == (
        f"Error: dataset HuggingFaceFW/fineweb-edu not found on {url}, or it is private or gated "
        f"and your token may not read it (set HF_TOKEN or run `hf auth login`)")
    assert "hf_wrong" not in wrong_token.stdout + wrong_token.stderr
    assert last_line(no_sample) == "Error: dataset HuggingFaceFW/fineweb-edu has no files matching sample/350BT/*"
    assert last_line(unreachable).startswith("Error: cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert last_line(unreachable).endswith("(ConnectError: [Errno 111] Connection refused)")
    assert bad_option.returncode == 2 and "'5BT' is not one of '10BT', '100BT', '350BT'" in bad_option.stderr
    assert files_under(work) == []
