"""Experiment tracking: TensorBoard event files always, and MLflow when a tracking URI is set.

`write_curve` is called by the driver when a task's training returns (the curve rides back in its
final metrics); `read_scalars` reads the files back for the console, without TensorBoard installed:
an event file is a sequence of length-prefixed records, each an `Event` protocol buffer.
With $MLFLOW_TRACKING_URI set, `mlflow_tracker` gives the stream's MLflow run: params, per-step
loss, each task's accuracies and gate verdict, and the results as artifacts (MLflow is the
optional extra `strata[mlflow]`).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from strata.atomic import write_text
from strata.config import check_name

MLFLOW_FILE = "mlflow.json"  # in <out>/<strategy>: which MLflow run the stream logs to (the console links it)


def write_curve(logdir: Path, task: str, curve: list[list]) -> None:
    """One task's curve, rows of [step, training loss, val loss or None], as scalars `loss` and `val_loss`."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(logdir / check_name(task, "task name"))) as writer:
        for step, loss, val in curve:
            writer.add_scalar("loss", loss, step)
            if val is not None:
                writer.add_scalar("val_loss", val, step)


def read_scalars(logdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every run under `logdir` (one per task): tag -> [(step, value)], in the order written."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for path in sorted(logdir.glob("*/events.out.tfevents.*")):
        tags = out.setdefault(path.parent.name, {})
        for record in _records(path.read_bytes()):
            event = Event.FromString(record)
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _records(data: bytes):
    """The payloads of a TFRecord file: u64 length, u32 length CRC, payload, u32 payload CRC."""
    at = 0
    while at + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        if at + 12 + length + 4 > len(data):  # a record still being written
            return
        yield data[at + 12 : at + 12 + length]
        at += 12 + length + 4


def mlflow_tracker(out: Path, params: dict | None = None) -> MlflowTracker | None:
    """The MLflow run of one strategy's stream, when $MLFLOW_TRACKING_URI is set; None otherwise.

    One run per `<out>/<strategy>` directory, found again by its tag, so tasks that arrive as
    separate jobs log into the same run. `params` (the run config, flattened) are logged when the run
    is created. The experiment is $MLFLOW_EXPERIMENT_NAME, or "strata".
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Param
    except ImportError as e:
        raise RuntimeError("MLFLOW_TRACKING_URI is set, but MLflow is not installed: "
                           "pip install 'strata[mlflow]' (or unset it)") from e
    client = MlflowClient(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "strata")
    found = client.get_experiment_by_name(name)
    experiment = found.experiment_id if found else client.create_experiment(name)
    key = str(out.resolve()).replace("'", "")
    runs = client.search_runs([experiment], f"tags.`strata.run` = '{key}'", max_results=1)
    if runs:
        return MlflowTracker(client, runs[0].info.run_id, uri, experiment)
    run = client.create_run(experiment, run_name=f"{out.parent.name}/{out.name}", tags={"strata.run": key})
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat(params).items()])
    tracker = MlflowTracker(client, run.info.run_id, uri, experiment)
    write_text(out / MLFLOW_FILE, json.dumps({"uri": uri, "experiment_id": experiment, "run_id": run.info.run_id}))
    return tracker


class MlflowTracker:
    """What a stream logs to its MLflow run: each task's curve, accuracies and gate verdict, then the results."""

    def __init__(self, client, run_id: str, uri: str, experiment: str) -> None:
        self.client, self.run_id, self.uri, self.experiment = client, run_id, uri, experiment

    def log_curve(self, task: str, curve: list[list]) -> None:
        """One task's per-step training loss (and val loss where it was checked)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{task}/loss", loss, now, step) for step, loss, _ in curve]
        metrics += [Metric(f"{task}/val_loss", val, now, step) for step, _, val in curve if val is not None]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_task(self, index: int, accuracy: dict[str, float], gate: dict | None) -> None:
        """After task `index`: every task's test accuracy (one row of the accuracy matrix) and the gate's verdict."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"accuracy/{t}", float(a), now, index) for t, a in accuracy.items() if a is not None]
        if gate:
            metrics.append(Metric("gate/passed", float(bool(gate.get("passed"))), now, index))
            if gate.get("kl") is not None:
                metrics.append(Metric("gate/kl", float(gate["kl"]), now, index))
        self.client.log_batch(self.run_id, metrics=metrics)
        if gate:
            self.client.log_text(self.run_id, json.dumps(gate, indent=1), f"gate/{index:02d}.json")

    def log_results(self, out: Path) -> None:
        """The stream's metrics.json and accuracy-matrix plot, as artifacts."""
        for name in ("metrics.json", "accuracy_matrix.png"):
            if (out / name).is_file():
                self.client.log_artifact(self.run_id, str(out / name))


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys (MLflow params are flat)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
