"""What every job entrypoint shares: run one `strata` command with this process's arguments.

`strata` comes from the installed distribution, or, in a job whose working_dir is the repository on
nodes without the install, from `PYTHONPATH=platform` in the job's runtime_env (cluster/runtime_env.yaml).
"""

from __future__ import annotations

import sys


def main(command: str, job: str | None = None) -> None:
    """Run `strata <command>` with this process's arguments; a failure exits non-zero with a message."""
    from strata.cli import app

    app([command, *sys.argv[1:]], prog_name=f"python -m jobs.{job or command}")
