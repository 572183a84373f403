"""main.py with the tests' block trace installed: for tests that train in a subprocess (DDP re-runs this script)."""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import block_trace  # noqa: E402
import main  # noqa: E402

if __name__ == "__main__":
    block_trace.install()
    sys.exit(main.main())
