"""The console's actions on a real local Ray with its dashboard: arrivals and a sweep launched as Ray jobs
(with their logs, trials and stop), and serving scaled in place while requests keep succeeding."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from console_client import Browser, LiveConsole
from ray_processes import RAY, free_port, start_head, stop_cluster

from strata.console.app import create_app
from strata.console.config import ConsoleConfig

SWEEP = {"name": "mini", "base": {"gate": {"mode": "report"}, "strategies": ["seqlora"], "tasks": 2, "n_train": 32,
                                 "n_val": 8, "n_test": 16, "adapter": {"visual_rank": 2, "text_rank": 2},
                                 "train": {"steps": 4, "batch_size": 8}},
         "space": {"train.lr": {"grid": [0.01, 0.0]}}, "metric": "faa", "mode": "max", "scheduler": "fifo",
         "cpus_per_trial": 1, "max_concurrent_trials": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, backbone_dir):
    """A `ray start` head with its dashboard, and a console with a token over a fresh runs root."""
    from strata.data.benchmark import write_benchmark

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    tmp = tmp_path_factory.mktemp("jobs")
    dashboard, session = start_head(env, tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    files = write_benchmark(tmp / "data", 0, ("colour", "shape"), 64, 8, 40)
    (tmp / "spaces").mkdir()
    SWEEP["base"]["backbone"] = {"source": str(backbone_dir)}
    (tmp / "spaces" / "mini.yaml").write_text(yaml.safe_dump(SWEEP))
    cfg = ConsoleConfig(runs=tmp / "runs", registry=str(tmp / "runs" / "stream" / "registry"),
                        serve_url=f"http://127.0.0.1:{free_port()}", data_roots=(tmp / "data",),
                        tune_spaces=tmp / "spaces", ray_dashboard=dashboard, backbone=str(backbone_dir),
                        executor="local", token="tok", repo=Path(__file__).parents[2])
    live = LiveConsole(create_app(cfg))
    user = live.browser()
    user.sign_in("tok")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")  # this process's job and Serve clients
        yield user, files, cfg
    live.stop()
    stop_cluster(session)


def why(page: str) -> str:
    """A failed job's page, cut to what explains it: its error lines and its end."""
    errors = [line for line in page.splitlines() if "Error" in line or "error" in line]
    return "\n".join(errors[-20:]) + "\n...\n" + page[-2000:]


def wait_for_job(user: Browser, job: str, timeout: float = 240) -> str:
    """Poll the job's page until the job ends; its page."""
    deadline = time.monotonic() + timeout
    while True:
        page = user.get(f"/jobs/{job}").text
        status = re.search(r'data-status="(\w+)"', page).group(1)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return page
        assert time.monotonic() < deadline, f"job {job} still {status}:\n{why(page)}"
        time.sleep(1)


def launch(user: Browser, path: str, form: dict) -> str:
    """Submit a launch form, again while Ray's job agent is not up yet (a 503 that says so); the job id."""
    deadline = time.monotonic() + 90
    while (reply := user.post(path, form)).status == 503 and time.monotonic() < deadline:
        time.sleep(3)
    assert reply.status == 303, reply.text[-2000:]
    return reply.headers["location"].rsplit("/", 1)[1]


def test_arrivals_launched_from_the_page_run_as_ray_jobs_and_fill_the_stream(cluster):
    user, files, _ = cluster
    csrf = user.csrf("/launch")
    for task in ("colour", "shape"):
        job = launch(user, "/launch/arrival", {"csrf": csrf, "out": "stream", "stream": "default", "task": task,
                                               "dataset": str(files[task]), "strategy": "seqlora", "steps": "8",
                                               "gate": "report"})
        page = wait_for_job(user, job)
        assert 'data-status="SUCCEEDED"' in page and f"task &#39;{task}&#39; arrives" in page, why(page)
        assert f"/#/jobs/{job}" in page  # linked to the Ray dashboard
    assert user.get("/launch").text.count('class="badge succeeded"') == 2
    stream = user.get("/streams/stream/default").text
    assert stream.count('class="badge promoted"') == 2 and 'data-task="shape"' in stream  # timeline, curves
    assert 'data-running="false"' in stream
    adapter = user.get("/registry/default/seqlora").text
    assert 'id="production">v2<' in adapter and 'id="promote-v1"' in adapter


def test_a_sweep_launched_from_the_page_shows_its_trials_and_best_config(cluster):
    user, _, _ = cluster
    job = launch(user, "/launch/sweep", {"csrf": user.csrf("/launch"), "space": "mini.yaml", "out": "tune"})
    page = wait_for_job(user, job, timeout=300)
    assert 'data-status="SUCCEEDED"' in page, why(page)
    assert page.count("<tr><td>") >= 2 and 'id="best"' in page and "0.01" in page


def test_a_running_job_stops_from_its_page_and_a_refused_launch_adds_no_job(cluster):
    user, files, _ = cluster
    csrf = user.csrf("/launch")
    before = user.get("/launch").text.count('href="/jobs/')
    refused = user.post("/launch/sweep", {"csrf": csrf, "space": "nosuch.yaml", "out": "tune"})
    assert refused.status == 400 and user.get("/launch").text.count('href="/jobs/') == before
    job = launch(user, "/launch/arrival", {"csrf": csrf, "out": "long", "stream": "default", "task": "colour",
                                           "dataset": str(files["colour"]), "strategy": "seqlora", "steps": "100000"})
    assert user.post(f"/jobs/{job}/stop", {"csrf": csrf}).status == 303
    assert 'data-status="STOPPED"' in wait_for_job(user, job, timeout=60)


def replicas_reporting(user: Browser, n: int, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (page := user.get("/serving").text).count('id="replicas">') and f'id="replicas">{n}<' not in page:
        assert time.monotonic() < deadline, page[-2000:]
        time.sleep(0.5)
    return page


def test_serving_scales_in_place_from_the_page_while_requests_keep_succeeding(cluster, test_spec, backbone_dir,
                                                                             tmp_path):
    import json
    import urllib.request

    from lora_helper import served_registry
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from strata.data.benchmark import generate_task

    user, _, cfg = cluster
    port = int(cfg.serve_url.rsplit(":", 1)[1])
    reg = served_registry(tmp_path, test_spec, backbone_dir)
    config = yaml.safe_load((Path(__file__).parents[2] / "serve_apps" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"].update(registry=reg.uri, backbone=str(backbone_dir))
    config["applications"][0]["deployments"] = [{"name": "AdapterServer", "num_replicas": 1,
                                                 "ray_actor_options": {"num_cpus": 0.5}}]
    ServeSubmissionClient(cfg.ray_dashboard).deploy_applications(config)  # what `serve deploy` sends
    row = generate_task("colour", 0, n_train=0, n_val=0, n_test=1).to_pylist()[0]
    body = json.dumps({"model": "default/seqlora", "max_tokens": 2, "messages": [{"role": "user", "content": row["prompt"]}]})
    stop, log = threading.Event(), []

    def keep_requesting() -> None:
        while not stop.is_set():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as reply:
                    log.append(reply.status)
            except Exception as e:  # noqa: BLE001 - every failure fails the test
                log.append(repr(e))

    replicas_reporting(user, 1)
    first = set(json.loads(user.get("/serving/stats", html=False).text)["replicas"])
    client = threading.Thread(target=keep_requesting, daemon=True)
    client.start()
    try:
        reply = user.post("/serving/scale", {"csrf": user.csrf("/serving"), "replicas": "2"})
        assert reply.status == 303, reply.text[-2000:]
        page = replicas_reporting(user, 2)
        assert "default/seqlora@v1" in page  # per-adapter rows, summed over the replicas
        time.sleep(2)
    finally:
        stop.set()
        client.join(timeout=60)
    now = set(json.loads(user.get("/serving/stats", html=False).text)["replicas"])
    assert first < now and len(now) == 2  # the first replica kept serving: scaled in place, not restarted
    assert log and all(s == 200 for s in log), [s for s in log if s != 200][:5]
    assert user.post("/serving/scale", {"csrf": user.csrf("/serving"), "replicas": "0"}).status == 400
