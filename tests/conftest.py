import signal
import sys
from pathlib import Path

import pytest

# The project is flat (top-level modules, no package): make them importable from tests.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

# A shell starts background jobs (`.ci/run &`, nohup) with SIGINT ignored, and children
# inherit that: the scripts under test would then never see the Ctrl-C that some tests
# send them. Handling SIGINT here makes every child start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def datasets_dir(tmp_path_factory):
    """DATASETS_DIR holding the toy token dataset ("dataset": "toy"); only read by the tests."""
    from helpers import write_toy_dataset  # here, not at the top: helpers imports torch and the project

    root = tmp_path_factory.mktemp("datasets")
    write_toy_dataset(root / "toy")
    return root


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, datasets_dir):
    """A finished 2-rank DDP run of the tiny fp32 model (helpers.MODEL, helpers.TRAIN)."""
    from helpers import make_run, trained

    return trained(make_run(tmp_path_factory.mktemp("ddp") / "run"), datasets_dir)


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory, datasets_dir):
    """The same run under FSDP2."""
    from helpers import TRAIN, make_run, trained

    return trained(make_run(tmp_path_factory.mktemp("fsdp") / "run", train={**TRAIN, "parallelism": "fsdp"}),
                   datasets_dir)
