"""End to end through a real local Ray: a short stream where SeqLoRA forgets and Decoupled does not."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import strata
from strata.config import BackboneSpec, GateConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(ray_cluster, backbone_dir, tmp_path_factory):
    """One run of two strategies over three tasks, shared by the assertions below."""
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        strategies=("seqlora", "decoupled"),
        tasks=3,
        out=str(out),
        backbone=BackboneSpec(str(backbone_dir)),
        train=TrainConfig(steps=80, batch_size=32, lr=3e-3, report_every=20, checkpoint_every=0),
        gate=GateConfig(mode="report"),  # measures raw forgetting: SeqLoRA's candidates must be kept
        n_train=400,
        n_val=20,
        n_test=120,
    )
    return out, strata.run(cfg)  # the Python API


def test_seqlora_forgets_and_decoupled_does_not(results):
    _, res = results
    f_seq = res["seqlora"]["forgetting"]
    f_dec = res["decoupled"]["forgetting"]
    assert f_seq - f_dec >= 10, (f_seq, f_dec, res["seqlora"]["accuracy_matrix"])
    assert res["decoupled"]["router_accuracy"] >= 90


def _no_nan(token: str):
    raise AssertionError(f"metrics.json is not strict JSON: {token}")


def test_run_writes_metrics_plot_predictions_manifest(results):
    out, res = results
    for name in ("seqlora", "decoupled"):
        metrics = json.loads((out / name / "metrics.json").read_text(), parse_constant=_no_nan)
        for key in ("tasks", "accuracy_matrix", "faa", "mfn", "mft", "maa", "bwt", "fwt", "forgetting"):
            assert key in metrics
        assert len(metrics["accuracy_matrix"]) == 3
        assert (out / name / "accuracy_matrix.png").stat().st_size > 1000
        preds = pq.read_table(out / name / "predictions.parquet")
        assert {"after_task", "task", "id", "prediction", "answer", "score"} <= set(preds.column_names)
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["config_hash"] and manifest["seed"] == 0 and len(manifest["data"]) == 3
        assert manifest["versions"]["torch"].startswith("2.")
