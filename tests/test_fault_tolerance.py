"""A stream on a real local Ray survives a killed coordinator actor and a killed Train worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from strata.config import AdapterSpec, BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.coordinator import NAMESPACE, actor_name
from strata.pipeline import coordinator, run

pytestmark = pytest.mark.integration


def wait_for(condition, what: str, timeout: float = 300.0):
    """Poll until `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_stream_survives_a_killed_coordinator_and_a_killed_train_worker(ray_with_dashboard, backbone_dir, tmp_path):
    import ray
    from ray.util.state import list_actors

    cfg = RunConfig(strategies=("dgg",), tasks=3, out=str(tmp_path), stream="ft", n_train=64, n_val=8, n_test=40,
                    backbone=BackboneSpec(str(backbone_dir)), adapter=AdapterSpec(visual_rank=4, text_rank=4),
                    train=TrainConfig(steps=60, batch_size=8, checkpoint_every=5, max_failures=2),
                    gate=GateConfig(mode="report"))  # every task must be promoted for the version check
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["results"] = run(cfg, Console(quiet=True))
        except BaseException as e:  # noqa: BLE001 (surfaced by the assertion below)
            outcome["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    coord = coordinator(cfg)

    # 1. Kill the coordinator once the first task is promoted, while the second one trains.
    wait_for(lambda: [e for e in coord.timeline("dgg") if e["status"] == "promoted"], "task 1 to be promoted")
    first_pid = coord.info()["pid"]
    ray.kill(ray.get_actor(actor_name("ft", str(tmp_path / "coordinator")), namespace=NAMESPACE), no_restart=False)

    # 2. Kill one Train worker of the second task once the controller has registered a checkpoint
    #    (it writes its snapshot after registering; the directory alone appears during the upload).
    wait_for(lambda: any("shape" in p.read_text() for p in tmp_path.glob("ray/*/checkpoint_manager_snapshot.json")),
             "a registered checkpoint of task 2")
    address = ray.get_runtime_context().gcs_address  # not auto-detected: other clusters may be live here
    workers = wait_for(lambda: list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]),
                       "a live Train worker")
    os.kill(workers[0].pid, signal.SIGKILL)

    driver.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")

    info = coord.info()
    assert info["reloaded"] and info["pid"] != first_pid  # the actor restarted and reloaded its state
    timeline = coord.timeline("dgg")
    assert [e["task"] for e in timeline] == ["colour", "shape", "count"]  # nothing lost, nothing duplicated
    assert [e["version"] for e in timeline] == [1, 2, 3]
    for entry in timeline:
        assert [h["status"] for h in entry["history"]] == ["arrived", "training", "evaluated", "promoted"]
        assert entry["attempt"] == 1
    metrics = json.loads((Path(tmp_path) / "dgg" / "metrics.json").read_text())
    resumed = [t["resumed_from"] for t in metrics["training"]]
    assert resumed[0] == 0 and resumed[1] >= 5 and resumed[2] == 0  # task 2 went on from its checkpoint
    assert all(row[i] is not None for i, row in enumerate(metrics["accuracy_matrix"]))
