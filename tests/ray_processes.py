"""Local Ray clusters for tests, as separate processes: started by cluster/start_local.sh or `ray start`,
each in its own session, and stopped by killing exactly that session's processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster(env: dict, tmp: str) -> tuple[str, int]:
    """cluster/start_local.sh: a head and 2 worker nodes on fresh ports; returns (dashboard address, session id)."""
    dashboard = free_port()
    env = {**env, "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(dashboard), "RAY_TMPDIR": tmp}
    return f"http://127.0.0.1:{dashboard}", _started(["bash", str(REPO / "cluster" / "start_local.sh"), "2", "1"],
                                                     env, 180)


def start_head(env: dict, tmp: str, cpus: int = 2) -> tuple[str, int]:
    """One `ray start --head` node with its dashboard on loopback; returns (dashboard address, session id).

    The dashboard agent takes a free port, not 52365: another Ray on the machine would otherwise leave
    this one without job submission ("No available agent to submit job").
    """
    dashboard = free_port()
    command = [RAY, "start", "--head", f"--port={free_port()}", f"--num-cpus={cpus}", f"--temp-dir={tmp}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
               "--dashboard-agent-listen-port=0", "--disable-usage-stats"]
    return f"http://127.0.0.1:{dashboard}", _started(command, env, 120)


def _started(command: list[str], env: dict, timeout: float) -> int:
    """Run a cluster start command in its own session (every Ray process it starts stays in it, so
    teardown stops exactly those); returns the session id, or fails the test with its output."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_cluster(proc.pid)
        raise
    if proc.returncode != 0:
        stop_cluster(proc.pid)
        pytest.fail(f"{' '.join(command[:3])} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return proc.pid


def stop_cluster(session: int) -> None:
    """Stop every process of the cluster started in `session`, and nothing else."""
    import psutil

    # Not `ray stop`: it stops every Ray on the machine, other test runs' clusters included. SIGKILL,
    # as `ray stop --force` sends: the cluster and its temp dir are thrown away.
    for _ in range(3):  # again, for a worker a raylet started while the others stopped
        procs = [p for p in psutil.process_iter() if session_of(p.pid) == session]
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)


def session_of(pid: int) -> int | None:
    """The session id of a process, or None when it is gone."""
    try:
        return os.getsid(pid)
    except OSError:
        return None
