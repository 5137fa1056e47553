"""The stream job through `ray job submit` on a real `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_head(env: dict, tmp: str) -> str:
    """`ray start --head` on fresh ports; returns the dashboard address or fails with Ray's own output."""
    # With token auth, `ray start` refuses to run until a token exists; a fresh machine has none.
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    dashboard = free_port()
    proc = subprocess.run(
        [RAY, "start", "--head", "--num-cpus=2", f"--port={free_port()}", f"--temp-dir={tmp}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"ray start --head failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def head_node():
    """A one-node cluster with the dashboard (job submission needs it) on loopback."""
    # The job's `python` must be this venv's, as it is for a user with the venv activated.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    address = start_head(env, tmp)
    yield env, address
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)


def submit(env: dict, address: str, args: list[str], job: str = "stream") -> subprocess.CompletedProcess:
    """`ray job submit` of jobs.<job> with the repo as working_dir; waits for the job to end."""
    runtime_env = {"working_dir": str(REPO), "env_vars": {"STRATA_CACHE": os.environ.get("STRATA_CACHE", "")}}
    cmd = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}",
           "--", "python", "-m", f"jobs.{job}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_stream_job_runs_and_writes_metrics(head_node, backbone_dir, tmp_path):
    env, address = head_node
    out = tmp_path / "job"
    proc = submit(env, address, ["--strategy", "seqlora", "--tasks", "2", "--steps", "20",
                                 "--test-rows", "40", "--backbone", str(backbone_dir), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    metrics = json.loads((out / "seqlora" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2
    # The job went through the registry and the gate: task 1 is served, task 2 was judged.
    assert (out / "registry" / "default" / "seqlora" / "v1" / "MANIFEST.json").exists()
    assert json.loads((out / "registry" / "default" / "seqlora" / "ALIASES.json").read_text())["production"] >= 1
    assert metrics["gate"]["mode"] == "enforce" and len(metrics["training"]) == 2


def test_failing_job_exits_non_zero_with_a_clear_message(head_node, tmp_path):
    env, address = head_node
    proc = submit(env, address, ["--strategy", "nope", "--out", str(tmp_path / "bad")])
    assert proc.returncode != 0
    assert "unknown strategy 'nope'" in proc.stdout + proc.stderr


def test_tasks_arrive_as_separate_jobs_and_any_version_re_evaluates(head_node, backbone_dir, tmp_path):
    from strata.data.benchmark import write_benchmark

    env, address = head_node
    files = write_benchmark(tmp_path / "data", 0, ("colour", "shape"), 64, 8, 40)
    common = ["--strategy", "dgg", "--stream", "jobs", "--out", str(tmp_path / "stream"),
              "--backbone", str(backbone_dir)]
    for task, path in files.items():
        proc = submit(env, address, ["--task", task, "--dataset", str(path), "--steps", "15", "--executor", "local",
                                     "--gate", "report", *common], "arrive")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"task '{task}' arrives" in proc.stdout  # progress in the job's log
    metrics = json.loads((tmp_path / "stream" / "dgg" / "metrics.json").read_text())
    assert metrics["tasks"] == ["colour", "shape"] and metrics["versions"] == [1, 2]
    assert metrics["accuracy_matrix"][1][0] is not None  # task 1 re-evaluated after task 2

    again = submit(env, address, ["--task", "colour", "--dataset", str(files["colour"]), *common], "arrive")
    assert again.returncode != 0 and "already learned" in again.stdout + again.stderr

    proc = submit(env, address, ["--version", "1", *common], "evaluate")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads((tmp_path / "stream" / "dgg" / "evaluate-v1.json").read_text())
    assert first["accuracy"]["colour"] == metrics["accuracy_matrix"][0][0]  # version 1 is what task 1 left


def test_an_invalid_dataset_is_refused_before_anything_is_recorded(head_node, backbone_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    env, address = head_node
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["q", ""], "answer": ["x", "y"], "split": ["train", "test"],
                             "image": pa.array([None, None], pa.binary())}), bad)
    proc = submit(env, address, ["--task", "broken", "--dataset", str(bad), "--strategy", "seqlora",
                                 "--out", str(tmp_path / "stream"), "--backbone", str(backbone_dir)], "arrive")
    assert proc.returncode != 0
    assert "is invalid; nothing was trained or recorded" in proc.stdout + proc.stderr
    assert "duplicate" in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "stream" / "coordinator").exists()
