import sys
from pathlib import Path

# The project is flat (top-level modules, no package): make them importable from tests.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
