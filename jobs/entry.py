"""What every job entrypoint shares: find the package in the job's working dir, run one command."""

from __future__ import annotations

import sys
from pathlib import Path

# Inside a job's working_dir copy the package may not be installed; its source root is here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main(command: str, job: str | None = None) -> None:
    """Run `strata <command>` with this process's arguments; a failure exits non-zero with a message."""
    from strata.cli import app

    app([command, *sys.argv[1:]], prog_name=f"python -m jobs.{job or command}")
