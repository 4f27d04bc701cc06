"""setup_lambda.sh on a stand-in machine: a PATH of logging stand-ins for uv, curl, apt-get,
sudo and the fontconfig tools, and a throwaway HOME. A first run installs, a second skips.
`id` is a stand-in too, so that both the root and the non-root path (apt-get via sudo) run
whoever runs the tests."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "setup_lambda.sh"
REAL_TOOLS = ("bash", "sh", "dirname", "mkdir", "mv", "rm", "grep", "cat")

STAND_INS = {
    # curl: the uv installer script when asked for it; a "font" for -o.
    "curl": """
echo "curl $*" >> "$LOG"
case "$*" in
  *install.sh*) printf 'mkdir -p "$HOME/.local/bin"\\nprintf "#!/bin/sh\\\\necho \\\\"uv \\\\$*\\\\" >> \\\\"$LOG\\\\"\\\\n" > "$HOME/.local/bin/uv"\\nchmod +x "$HOME/.local/bin/uv"\\n' ;;
  *) while [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo font > "$2"; fi; shift; done ;;
esac
""",
    "apt-get": 'echo "apt-get $*" >> "$LOG"',
    "fc-cache": 'echo "fc-cache $*" >> "$LOG"',
    # fc-list reports the font once it is in the user's font directory.
    "fc-list": 'if [ -f "$HOME/.local/share/fonts/xkcd-script.ttf" ]; then echo "xkcd Script"; fi',
    "chmod": 'exec /usr/bin/chmod "$@"',
    # sudo: logs, then runs its arguments as they are.
    "sudo": 'echo "sudo $*" >> "$LOG"\nexec "$@"',
    # id: the user id the test asks for (FAKE_UID).
    "id": 'if [ "$1" = -u ]; then echo "$FAKE_UID"; else echo "id: stand-in knows only -u" >&2; exit 1; fi',
}


def machine(tmp_path, uid):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in REAL_TOOLS:
        os.symlink(shutil.which(tool), bin_dir / tool)
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "log"
    env = {"PATH": str(bin_dir), "HOME": str(home), "LOG": str(log), "FAKE_UID": str(uid)}
    return env, log


def run(env, log):
    log.write_text("")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("uid", [0, 1000], ids=["root", "non-root"])
def test_installs_then_skips_what_is_done(tmp_path, uid):
    env, log = machine(tmp_path, uid)
    (tmp_path / "home" / ".cache" / "matplotlib").mkdir(parents=True)
    stale = tmp_path / "home" / ".cache" / "matplotlib" / "fontlist-v390.json"
    stale.write_text("{}")

    first = run(env, log)
    assert any(line.startswith("curl") and "install.sh" in line for line in first)
    assert any(line.startswith("apt-get install") and "fonts-humor-sans" in line for line in first)
    # apt-get runs through sudo exactly when not root.
    sudo_lines = [line for line in first if line.startswith("sudo")]
    if uid == 0:
        assert sudo_lines == []
    else:
        assert sudo_lines == ["sudo apt-get update -qq",
                              "sudo apt-get install -y -qq fonts-humor-sans fontconfig"]
    assert any(line.startswith("curl") and "xkcd-script.ttf" in line for line in first)
    assert "fc-cache -f" in first
    assert first[-1] == "uv sync --compile-bytecode"
    assert (tmp_path / "home" / ".local" / "share" / "fonts" / "xkcd-script.ttf").is_file()
    assert not stale.exists()  # matplotlib will rebuild its font list and find the font

    second = run(env, log)
    assert second == ["uv sync --compile-bytecode"]
