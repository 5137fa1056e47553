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


def test_seed_methods_run_through_the_same_pipeline_on_ray(ray_cluster, backbone_dir, tmp_path):
    """EWC, LwF, DGG, MoDE and CMA through the one pipeline and Ray Train loop, no special cases."""
    from strata.config import CMAConfig, MoDEConfig

    cfg = RunConfig(
        strategies=("ewc", "lwf", "dgg", "mode", "cma"),
        tasks=2,
        out=str(tmp_path),
        backbone=BackboneSpec(str(backbone_dir)),
        train=TrainConfig(steps=4, batch_size=8, lr=3e-3),
        gate=GateConfig(mode="report"),
        mode=MoDEConfig(experts=2, rank=4, reference_rows=16, kd_batch=4),
        cma=CMAConfig(memory=16, memory_batch=4),
        n_train=32,
        n_val=4,
        n_test=16,
    )
    res = strata.run(cfg)
    for name in cfg.strategies:
        assert len(res[name]["accuracy_matrix"]) == 2, name
        assert [t["step"] for t in res[name]["training"]] == [4, 4], name
    dgg = res["dgg"]["training"]
    assert "dgg/injection_rate" in dgg[1] and dgg[1]["dgg/d_norm"] >= 0
    assert "mode/kd" in res["mode"]["training"][0] and "mode/router_entropy" in res["mode"]["training"][0]
    cma = res["cma"]["training"]
    assert "cma/loss/preserve" in cma[1] and "cma/loss/preserve" not in cma[0]  # no previous model on task 0
    assert cma[1]["cma/frozen_experts"] > 0  # experts frozen after task 0 stay out of the optimizer
    state = tmp_path / "cma" / "state"
    assert json.loads((state / "cma_freeze.json").read_text())["after"] == res["cma"]["tasks"][-1]
    assert (tmp_path / "ewc" / "state" / "ewc.safetensors").exists()
