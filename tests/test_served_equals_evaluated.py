"""One generation path: what serving answers for a row is what evaluation recorded for it, for the
same registry version (strata/generation.py decodes both)."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq

import strata
from strata.config import BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.serving.host import AdapterHost, Request


def test_served_answers_equal_the_recorded_predictions(backbone_dir, tmp_path) -> None:
    spec = BackboneSpec(str(backbone_dir))
    cfg = RunConfig(strategies=("seqlora", "decoupled"), tasks=2, out=str(tmp_path), backbone=spec,
                    train=TrainConfig(steps=20, batch_size=8, lr=3e-3, executor="local"),
                    gate=GateConfig(mode="report"), n_train=48, n_val=4, n_test=12)
    res = strata.run(cfg)
    host = AdapterHost(str(tmp_path / "registry"), spec)
    for strategy, model in (("seqlora", "default/seqlora"), ("decoupled", "default/auto")):
        last = res[strategy]["tasks"][-1]
        preds = pq.read_table(tmp_path / strategy / "predictions.parquet").to_pylist()
        recorded = {(p["task"], p["id"]): p for p in preds if p["after_task"] == last}
        requests, expected = [], []
        for task in res[strategy]["tasks"]:
            data = pq.read_table(tmp_path / "data" / f"{task}.parquet")
            for row in data.filter(pc.equal(data["split"], "test")).to_pylist():
                requests.append(Request(model, row["prompt"], (row["image"],), max_tokens=12))
                expected.append(recorded[(task, row["id"])])
        served = host.complete(requests)
        assert [c.text for c in served] == [e["prediction"] for e in expected], strategy
        if strategy == "decoupled":  # `auto` routed every row to the adapter evaluation recorded
            assert [c.model.split("@")[0] for c in served] == [f"default/{e['adapter']}" for e in expected]
        assert any(e["score"] > 0 for e in expected), f"{strategy} learned nothing: the check would be vacuous"
