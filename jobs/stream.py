"""Ray job entrypoint: learn a whole stream with one or more strategies.

    ray job submit --working-dir . -- python -m jobs.stream --strategy seqlora --tasks 8 --out runs/job

Takes the same flags as `strata run`; exits non-zero with a clear message on failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Inside a job's working_dir copy the package may not be installed; its source root is here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from strata.cli import app

if __name__ == "__main__":
    app(["run", *sys.argv[1:]], prog_name="python -m jobs.stream")
