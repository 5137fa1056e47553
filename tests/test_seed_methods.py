"""The papers' methods (EWC, LwF, DGG, MoDE, CMA) through the one pipeline and training loop (in this process; Ray Train is
exercised by the README walkthrough (make run), test_fault_tolerance.py and the cluster workflows)."""

from __future__ import annotations

import json

import strata
from strata.config import BackboneSpec, GateConfig, RunConfig, TrainConfig


def test_seed_methods_run_through_the_same_pipeline(backbone_dir, tmp_path):
    """EWC, LwF, DGG, MoDE and CMA through the one pipeline and training loop, no special cases."""
    from strata.strategies.cma import CMAConfig
    from strata.strategies.mode import MoDEConfig

    cfg = RunConfig(
        strategies=("ewc", "lwf", "dgg", "mode", "cma"),
        tasks=2,
        out=str(tmp_path),
        backbone=BackboneSpec(str(backbone_dir)),
        train=TrainConfig(steps=4, batch_size=8, lr=3e-3, executor="local"),  # Ray Train: see the docstring
        gate=GateConfig(mode="report"),
        options={"mode": MoDEConfig(experts=2, rank=4, reference_rows=16, kd_batch=4),
                 "cma": CMAConfig(memory=16, memory_batch=4)},
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
