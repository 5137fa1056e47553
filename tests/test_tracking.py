"""Experiment tracking: TensorBoard event files for every task, and an MLflow run read back from a real
local MLflow store when a tracking URI is set."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.tracking import read_scalars, write_curve


def test_a_curve_written_as_event_files_reads_back_step_by_step(tmp_path: Path) -> None:
    write_curve(tmp_path, "colour", [[1, 2.0, None], [2, 1.5, 1.25], [3, 1.0, None]])
    write_curve(tmp_path, "shape", [[1, 0.5, None]])
    scalars = read_scalars(tmp_path)
    assert scalars["colour"] == {"loss": [(1, 2.0), (2, 1.5), (3, 1.0)], "val_loss": [(2, 1.25)]}
    assert scalars["shape"] == {"loss": [(1, 0.5)]}
    with pytest.raises(ValueError, match="invalid task name"):
        write_curve(tmp_path, "../escape", [[1, 1.0, None]])


def test_two_arrivals_log_one_mlflow_run_with_params_curves_accuracies_gate_and_artifacts(
        tmp_path: Path, backbone_dir: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from strata.config import BackboneSpec, GateConfig, RunConfig, TrainConfig
    from strata.data.benchmark import write_benchmark
    from strata.open_stream import arrive

    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a test store is a directory
    files = write_benchmark(tmp_path / "data", 0, ("colour", "shape"), 64, 8, 40)
    cfg = RunConfig(strategies=("seqlora",), out=str(tmp_path / "stream"), backbone=BackboneSpec(str(backbone_dir)),
                    train=TrainConfig(executor="local", steps=6), gate=GateConfig(mode="report"))
    for task in ("colour", "shape"):  # two jobs' worth: the second finds the first's run
        arrive(cfg, "seqlora", task, files[task])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("strata").experiment_id])
    rid = run.info.run_id
    assert run.data.params["train.steps"] == "6" and run.data.params["strategies"] == "('seqlora',)"
    for task in ("colour", "shape"):
        steps = [m.step for m in client.get_metric_history(rid, f"{task}/loss")]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 6
    colour = client.get_metric_history(rid, "accuracy/colour")
    assert [m.step for m in colour] == [0, 1]  # a row of the accuracy matrix after each task
    assert [m.step for m in client.get_metric_history(rid, "gate/passed")] == [0, 1]
    names = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "gate")}
    assert {"metrics.json", "accuracy_matrix.png", "gate/00.json", "gate/01.json"} <= names
    assert set(read_scalars(tmp_path / "stream" / "seqlora" / "tensorboard")) == {"colour", "shape"}
    assert rid in (tmp_path / "stream" / "seqlora" / "mlflow.json").read_text()  # what the console links
