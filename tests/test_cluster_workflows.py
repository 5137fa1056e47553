"""The jobs through `ray job submit` on a real local multi-node cluster (cluster/start_local.sh)."""

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


def start_cluster(env: dict, tmp: str) -> str:
    """cluster/start_local.sh: a head and 2 worker nodes on fresh ports; returns the dashboard address."""
    dashboard = free_port()
    proc = subprocess.run(
        ["bash", str(REPO / "cluster" / "start_local.sh"), "2", "1"],
        env={**env, "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(dashboard), "RAY_TMPDIR": tmp},
        capture_output=True, text=True, timeout=180,
    )
    if proc.returncode != 0:
        pytest.fail(f"cluster/start_local.sh failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def head_node():
    """A head and 2 worker nodes with the dashboard (job submission needs it) on loopback."""
    # The job's `python` and `ray` must be this venv's, as they are for a user with the venv activated.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    address = start_cluster(env, tmp)
    yield env, address
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)


def submit(env: dict, address: str, args: list[str], job: str = "stream") -> subprocess.CompletedProcess:
    """`ray job submit` of jobs.<job> with the repo as working_dir; waits for the job to end."""
    runtime_env = {"working_dir": str(REPO), "env_vars": {"STRATA_CACHE": os.environ.get("STRATA_CACHE", "")}}
    cmd = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}",
           "--", "python", "-m", f"jobs.{job}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_stream_job_trains_on_both_worker_nodes_and_writes_metrics(head_node, backbone_dir, tmp_path):
    from ray.util.state import list_actors

    env, address = head_node
    out = tmp_path / "job"
    config = tmp_path / "two-nodes.yaml"  # one Train worker per worker node
    config.write_text("train: {num_workers: 2, cpus_per_worker: 1, resources_per_worker: {worker_node: 1}}\n")
    proc = submit(env, address, ["--strategy", "seqlora", "--tasks", "2", "--steps", "20", "--config", str(config),
                                 "--test-rows", "40", "--backbone", str(backbone_dir), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
    assert len({w.node_id for w in workers}) == 2, [(w.node_id, w.state) for w in workers]
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
