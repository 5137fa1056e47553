"""The three daily workflows on a real local multi-node cluster (cluster/start_local.sh 2 1), through
Ray's own CLIs, as a user runs them:

1. `ray job submit -- python -m jobs.stream|arrive|evaluate ...`: a stream (or one task) is learned,
   with the Train workers on both worker nodes;
2. `ray job submit -- python -m jobs.tune tune_spaces/smoke.yaml`: a Tune sweep, where ASHA stops the
   known-bad trial early and the best config is written;
3. `serve deploy serve_apps/config.yaml`, then `serve deploy` again with more replicas, while
   requests through the `openai` client keep succeeding.

One cluster serves the whole module: starting one costs 20-30 s.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from ray_processes import free_port, start_cluster, stop_cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


@pytest.fixture(scope="module")
def head_node():
    """A head and 2 worker nodes with the dashboard (job submission needs it) on loopback."""
    # The job's `python` and `ray` must be this venv's, as they are for a user with the venv activated.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    address, session = start_cluster(env, tmp)
    with pytest.MonkeyPatch.context() as patch:
        # This process's state API calls need it too, when no earlier ray.init in the session set it.
        patch.setenv("RAY_AUTH_MODE", "token")
        yield env, address
    stop_cluster(session)
    shutil.rmtree(tmp, ignore_errors=True)


def submit(env: dict, address: str, args: list[str], job: str = "stream",
           submission_id: str | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs.<job> with the repo as working_dir; waits for the job to end."""
    runtime_env = {"working_dir": str(REPO), "env_vars": {"STRATA_CACHE": os.environ.get("STRATA_CACHE", "")}}
    named = [f"--submission-id={submission_id}"] if submission_id else []
    cmd = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}", *named,
           "--", "python", "-m", f"jobs.{job}", *args]
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        # A node's job agent registers with the dashboard some seconds after the node starts (more on
        # a busy box); Ray's answer until then is "try again later", and a user would.
        if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(3)


@contextlib.contextmanager
def actors_seen(address: str, class_name: str):
    """While the block runs, poll the cluster's state API; yields {actor id: (job id, node id)} as it fills.

    Matched on the end of the class name: Tune's trial class is `ImplicitFunc` in one process and
    `wrap_function.<locals>.ImplicitFunc` when a job's driver defines it. Polled during the job, as
    one watches the dashboard, so a finished job's actors need not stay listed.
    """
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    seen: dict[str, tuple[str, str]] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                for a in list_actors(address=address, detail=True, limit=1000):
                    if a.class_name.split(".")[-1] == class_name:
                        seen[a.actor_id] = (a.job_id, a.node_id)
            except RayStateApiException:
                pass  # a busy dashboard; the next poll catches up
            done.wait(2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def log_tail(proc: subprocess.CompletedProcess) -> str:
    """The end of a CLI's output (a job's log included), for failure messages."""
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_stream_job_trains_on_both_worker_nodes_and_writes_metrics(head_node, backbone_dir, tmp_path):
    env, address = head_node
    out = tmp_path / "job"
    config = tmp_path / "two-nodes.yaml"  # one Train worker per worker node
    config.write_text("train: {num_workers: 2, cpus_per_worker: 1, resources_per_worker: {worker_node: 1}}\n")
    with actors_seen(address, "RayTrainWorker") as workers:
        proc = submit(env, address, ["--strategy", "seqlora", "--tasks", "2", "--steps", "20", "--config", str(config),
                                     "--test-rows", "40", "--backbone", str(backbone_dir), "--out", str(out)])
    assert proc.returncode == 0, log_tail(proc)
    assert "succeeded" in proc.stdout
    assert len({node for _, node in workers.values()}) == 2, workers
    metrics = json.loads((out / "seqlora" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2
    # The job went through the registry and the gate: task 1 is served, task 2 was judged.
    assert (out / "registry" / "default" / "seqlora" / "v1" / "MANIFEST.json").exists()
    assert json.loads((out / "registry" / "default" / "seqlora" / "ALIASES.json").read_text())["production"] >= 1
    assert metrics["gate"]["mode"] == "enforce" and len(metrics["training"]) == 2


def test_tasks_arrive_as_separate_jobs_and_any_version_re_evaluates(head_node, backbone_dir, tmp_path):
    from strata.data.benchmark import write_benchmark

    env, address = head_node
    files = write_benchmark(tmp_path / "data", 0, ("colour", "shape"), 64, 8, 40)
    common = ["--strategy", "dgg", "--stream", "jobs", "--out", str(tmp_path / "stream"),
              "--backbone", str(backbone_dir)]
    for task, path in files.items():
        proc = submit(env, address, ["--task", task, "--dataset", str(path), "--steps", "15", "--executor", "local",
                                     "--gate", "report", *common], "arrive")
        assert proc.returncode == 0, log_tail(proc)
        assert f"task '{task}' arrives" in proc.stdout  # progress in the job's log
    metrics = json.loads((tmp_path / "stream" / "dgg" / "metrics.json").read_text())
    assert metrics["tasks"] == ["colour", "shape"] and metrics["versions"] == [1, 2]
    assert metrics["accuracy_matrix"][1][0] is not None  # task 1 re-evaluated after task 2

    proc = submit(env, address, ["--version", "1", *common], "evaluate")
    assert proc.returncode == 0, log_tail(proc)
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


def test_a_tune_sweep_job_stops_the_known_bad_trial_early_and_writes_the_best_config(head_node, backbone_dir,
                                                                                      tmp_path):
    from ray.util.state import list_jobs

    from strata.cli import build_run_config
    from strata.trial_states import read_states
    from strata.tune import load_sweep, run_config

    env, address = head_node
    name = f"tune-{uuid.uuid4().hex[:8]}"  # our name for the job, to find its actors by
    with actors_seen(address, "ImplicitFunc") as trial_actors:
        proc = submit(env, address, ["tune_spaces/smoke.yaml", "--out", str(tmp_path)], "tune", submission_id=name)
    assert proc.returncode == 0 and f"Job '{name}' succeeded" in proc.stdout, log_tail(proc)

    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    trials = {t["params"]["train.lr"]: t for t in summary["trials"]}
    assert sorted(trials) == [0.0, 0.003, 0.005, 0.01] and not any(t["error"] for t in trials.values()), summary
    sweep = load_sweep(REPO / "tune_spaces" / "smoke.yaml")
    assert trials[0.0]["tasks_done"] == 1 and trials[0.0]["stopped_early"], summary  # ASHA, after its first task
    assert all(len(t["history"]) == t["tasks_done"] for t in trials.values())  # FAA reported after every task
    assert max(t["tasks_done"] for t in trials.values()) == sweep.tasks  # the good ones learned the whole stream
    assert (tmp_path / "smoke" / "sweep.png").stat().st_size > 0
    # The states the console shows, from the sweep's callback, agree with Tune's results.
    states = {t["config"]["train.lr"]: t["state"] for t in read_states(tmp_path / "smoke")["trials"]}
    assert states == {lr: "stopped early" if t["stopped_early"] else "finished" for lr, t in trials.items()}, states

    # best.yaml is a config `strata run --config` accepts: the winning trial's, trained on Ray Train.
    best = summary["best"]["params"]
    best_cfg = build_run_config(tmp_path / "smoke" / "best.yaml", [], None, None, None, None, None, None, None, None)
    assert best_cfg.train.lr == best["train.lr"] > 0 and best_cfg.strategies == ("dgg",)
    assert best_cfg == dataclasses.replace(run_config(sweep, best, best_cfg.out),
                                           train=dataclasses.replace(best_cfg.train, executor="ray"))

    # The trials were the job's own Ray actors, seen by the cluster's state API. Name the cluster:
    # with no address, the state API may pick another live or stale cluster on the machine.
    (job,) = list_jobs(address=address, filters=[("submission_id", "=", name)])
    nodes = [node for job_id, node in trial_actors.values() if job_id == job.job_id]
    assert len(nodes) == 4, (job.job_id, trial_actors)
    # 1 CPU per node and 1 per trial: the two trials that ran at once were on two nodes.
    assert len(set(nodes)) >= 2, nodes


def serve_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Ray Serve's own CLI (`serve deploy|status|shutdown ...`) against the cluster; fails the test on an error."""
    proc = subprocess.run([SERVE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, log_tail(proc)
    return proc


def write_serve_config(path: Path, args: dict, port: int, replicas: int) -> None:
    """serve_apps/config.yaml with the app args overridden, loopback on `port` and `replicas` AdapterServers."""
    config = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}  # tests send traffic to loopback only
    app = config["applications"][0]
    config["applications"] = [app]  # the serving app alone: the console has its own tests (tests/console)
    app["args"].update(args)
    for deployment in app["deployments"]:
        if deployment["name"] == "AdapterServer":
            deployment.pop("autoscaling_config", None)  # a fixed count, to change by hand
            # Half a CPU each: 2 replicas and the ingress fit the cluster's 3 CPUs.
            deployment.update(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0})
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def wait_for_replicas(address: str, replicas: int, timeout: float = 120) -> None:
    """Wait until the app is RUNNING with `replicas` RUNNING AdapterServer replicas (what `serve status` reads)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    # The dashboard's Serve API in this process, not a `serve status` process per poll: on 2 busy
    # cores each CLI start takes CPU from the replicas starting up.
    deadline = time.monotonic() + timeout
    while True:
        app = (ServeSubmissionClient(address).get_serve_details().get("applications") or {}).get("strata") or {}
        states = [r["state"] for r in ((app.get("deployments") or {}).get("AdapterServer") or {}).get("replicas", [])]
        if app.get("status") == "RUNNING" and states == ["RUNNING"] * replicas:
            return
        assert time.monotonic() < deadline, f"not {replicas} RUNNING AdapterServer replicas after {timeout} s: {app}"
        time.sleep(0.5)


def keep_requesting(port: int, row: dict, stop: threading.Event, log: list[tuple[float, str | None]]) -> None:
    """Chat completions one after another until `stop`; logs (time it ended, error or None) for each."""
    from openai import OpenAI

    # No retries: the client's default would hide a failed request by retrying it.
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    image = "data:image/png;base64," + base64.b64encode(row["image"]).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": row["prompt"]},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    while not stop.is_set():
        try:
            reply = client.chat.completions.create(model="default/seqlora", messages=messages, max_tokens=4,
                                                   temperature=0)
            error = None if reply.model == "default/seqlora@v1" else f"served {reply.model}"
        except Exception as e:  # noqa: BLE001 - every failure is logged and fails the test
            error = repr(e)
        log.append((time.monotonic(), error))


def test_serve_deploy_then_more_replicas_while_requests_keep_succeeding(head_node, test_spec, backbone_dir, tmp_path):
    from lora_helper import served_registry
    from ray.util.state import list_actors

    from strata.data.benchmark import generate_task

    env, address = head_node
    registry = served_registry(tmp_path, test_spec, backbone_dir)
    config, port = tmp_path / "serve.yaml", free_port()
    args = {"registry": registry.uri, "backbone": str(backbone_dir)}
    row = generate_task("colour", 0, n_train=0, n_val=0, n_test=1).to_pylist()[0]
    stop, log = threading.Event(), []
    client = threading.Thread(target=keep_requesting, args=(port, row, stop, log), daemon=True)
    try:
        write_serve_config(config, args, port, replicas=1)
        serve_cli(env, "deploy", str(config), f"--address={address}")
        wait_for_replicas(address, 1)
        client.start()
        deadline = time.monotonic() + 60
        while len(log) < 5:  # requests are being served by the one replica
            assert client.is_alive() and time.monotonic() < deadline, log
            time.sleep(0.2)
        changed = time.monotonic()
        write_serve_config(config, args, port, replicas=2)
        serve_cli(env, "deploy", str(config), f"--address={address}")
        wait_for_replicas(address, 2)
        scaled = time.monotonic()
        status = yaml.safe_load(serve_cli(env, "status", f"--address={address}").stdout)  # what the user sees
        assert status["applications"]["strata"]["deployments"]["AdapterServer"]["replica_states"] == {"RUNNING": 2}
        # Two replica actors, as the cluster's state API sees them (named: another cluster may run here).
        replicas = list_actors(address=address, filters=[("class_name", "=", "ServeReplica:strata:AdapterServer"),
                                                         ("state", "=", "ALIVE")], limit=100)
        assert len(replicas) == 2, replicas
        deadline = time.monotonic() + 60
        while sum(t > scaled for t, _ in log) < 5:  # and requests go on with two
            assert client.is_alive() and time.monotonic() < deadline, log[-5:]
            time.sleep(0.2)
    finally:
        stop.set()
        if client.ident is not None:  # it was started
            client.join(timeout=90)
        down = subprocess.run([SERVE, "shutdown", "-y", f"--address={address}"], env=env, capture_output=True,
                              text=True, timeout=120)
    failed = [(round(t - changed, 1), error) for t, error in log if error]
    assert not failed, f"{len(failed)} of {len(log)} requests failed (seconds after the change, error): {failed[:5]}"
    before, after = sum(t < changed for t, _ in log), sum(t > scaled for t, _ in log)
    assert before >= 5 and after >= 5, (before, after, len(log))
    assert down.returncode == 0, log_tail(down)
