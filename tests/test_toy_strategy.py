"""A strategy defined in this file alone runs through the whole pipeline: the registry, the run
config's options, the training loop's hooks, the driver's hooks and the coordinator's records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import strata
from strata.config import BackboneSpec, RunConfig
from strata.hooks import Strategy, TaskContext
from strata.strategies import get, names, options_for, register, run_config


@dataclass(frozen=True)
class ToyConfig:
    """Options of the toy strategy."""

    note: str = "plain"
    rows_file: str = "toy_rows.json"


@register("toy", ToyConfig, aliases={"toy_note": "note"})
@dataclass
class Toy(Strategy):
    """A shared adapter that counts the rows it trained on and keeps the count as state."""

    opts: ToyConfig = field(default_factory=ToyConfig)

    def __post_init__(self) -> None:
        self.steps = 0

    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        self.steps = 0
        return super().before_task(backbone, processor, ctx)

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        self.steps += 1
        return None

    def finish_task(self, model, processor, ctx: TaskContext, train: pa.Table, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / self.opts.rows_file).write_text(json.dumps({"task": ctx.name, "rows": train.num_rows,
                                                            "steps": self.steps, "note": self.opts.note}))

    def after_task(self, ctx: TaskContext, train: pa.Table) -> None:
        seen = json.loads((Path(ctx.state_dir) / self.opts.rows_file).read_text())
        assert seen["task"] == ctx.name and seen["rows"] == train.num_rows  # finish_task's file is installed
        (Path(ctx.state_dir) / "driver.log").open("a").write(f"{ctx.name}\n")

    def state_records(self, ctx: TaskContext) -> dict[str, Path]:
        return super().state_records(ctx) | {"rows": Path(ctx.state_dir) / self.opts.rows_file}

    def metrics(self) -> dict[str, float]:
        return {"toy/steps": float(self.steps)}


def test_the_registry_knows_the_toy_strategy() -> None:
    assert "toy" in names() and get("toy").cls is Toy and Toy.name == "toy"
    with pytest.raises(ValueError, match="unknown key\\(s\\) in run config.toy: nope"):
        run_config({"strategies": ["toy"], "toy": {"nope": 1}}, "run config")


def test_a_strategy_defined_in_a_test_file_runs_through_the_pipeline(backbone_dir, tmp_path) -> None:
    cfg = run_config({
        "strategies": ["toy"], "tasks": 2, "out": str(tmp_path), "toy_note": "from-alias",
        "toy": {"rows_file": "counted.json"}, "gate": {"mode": "report"},
        "train": {"steps": 3, "batch_size": 8, "executor": "local"}, "n_train": 24, "n_val": 4, "n_test": 8,
    }, "run config")
    cfg = RunConfig(**{**cfg.__dict__, "backbone": BackboneSpec(str(backbone_dir))})
    assert options_for(cfg, "toy") == ToyConfig(note="from-alias", rows_file="counted.json")

    res = strata.run(cfg)["toy"]
    tasks = res["tasks"]
    assert len(tasks) == 2 and [t["toy/steps"] for t in res["training"]] == [3.0, 3.0]
    state = tmp_path / "toy" / "state"
    assert (state / "driver.log").read_text().split() == tasks
    assert json.loads((state / "counted.json").read_text())["note"] == "from-alias"
    coordinator = json.loads((tmp_path / "coordinator" / "default" / "coordinator.json").read_text())
    records = coordinator["strategies"]["toy"]["records"]
    assert set(records) == set(tasks)
    last = records[tasks[-1]]
    assert last["rows"]["path"] == "counted.json" and len(last["rows"]["sha256"]) == 64
    assert last["optimum"]["path"] == "adapters/shared"
