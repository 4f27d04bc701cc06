"""Answering `--help` and usage mistakes before a script's slow imports.

torch takes seconds to import (tens of seconds on a busy machine that has to compile it
from source), and numpy, pyarrow and openai add more. Someone who asks a script for
`--help`, or mistypes an option, should hear back at once. A script whose module-level
code needs those libraries defines its click command first, with light imports only,
then calls answer_usage_first(main) and only then imports the heavy ones.

This module imports nothing but the standard library and click, and must stay so.
"""

import os
import shlex
import sys

import click


def answer_usage_first(command: click.Command) -> None:
    """Parse the command line now if `command` belongs to the program being run.

    `--help` prints the help and exits 0; a usage mistake (unknown option, missing
    argument, bad value) prints what click prints for it and exits with click's code
    (2). A good command line returns here, and the script goes on to its imports; its
    `main()` at the bottom parses the same arguments again, which costs next to nothing.

    Importing the script (tests, multiprocessing workers) does nothing: only the module
    run as the program, `__main__`, answers for the command line.
    """
    if getattr(command.callback, "__module__", None) != "__main__":
        return
    # The program name as click's own main() shows it for `python script.py`.
    program_name = os.path.basename(sys.argv[0])
    try:
        context = command.make_context(program_name, sys.argv[1:])
    except click.exceptions.Exit as finished:  # --help has printed its answer
        sys.exit(finished.exit_code)
    except click.ClickException as mistake:
        mistake.show()
        sys.exit(mistake.exit_code)
    # Parsing only checked the arguments; main() will open whatever they name.
    context.close()


def relaunch_command(script_and_arguments: list[str]) -> str:
    """The command line that runs a script again as it runs now, launcher included: under
    torchrun, rebuilt from what torchrun tells its ranks (multi-node rendezvous options
    are not told, so they must be added by hand on every node)."""
    command = ["python"]
    if "LOCAL_WORLD_SIZE" in os.environ:
        command = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
        if nodes > 1:
            command.insert(1, f"--nnodes={nodes}")
    return "uv run " + shlex.join(command + script_and_arguments)
