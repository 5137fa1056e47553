"""The gate in the arrival path: a sabotaged task is rejected and production is untouched; the CLI on top."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from lora_helper import trained_adapter
from rich.console import Console
from typer.testing import CliRunner

from strata import cli
from strata.config import AdapterSpec, BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.data.benchmark import write_benchmark
from strata.data.llava_import import import_llava
from strata.open_stream import arrive
from strata.pipeline import coordinator
from strata.registry import Ref, Registry, backbone_info


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_a_sabotaged_task_fails_the_gate_and_leaves_production_serving(backbone_dir, tmp_path):
    data = write_benchmark(tmp_path / "data", 0, ("colour", "shape"), 128, 24, 40)
    cfg = RunConfig(strategies=("seqlora",), out=str(tmp_path / "stream"), backbone=BackboneSpec(str(backbone_dir)),
                    adapter=AdapterSpec(visual_rank=4, text_rank=4),
                    train=TrainConfig(steps=30, batch_size=8, lr=3e-3, executor="local", checkpoint_every=0))
    quiet = Console(quiet=True)
    arrive(cfg, "seqlora", "colour", data["colour"], quiet)
    reg = Registry(str(tmp_path / "stream" / "registry"))
    assert reg.production("default", "seqlora") == 1
    served = files_of(tmp_path / "stream" / "seqlora" / "state" / "adapters" / "shared")

    sabotaged = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=5.0))  # far too high
    metrics = arrive(sabotaged, "seqlora", "shape", data["shape"], quiet)

    card = reg.card(Ref("default", "seqlora", 2))
    assert card["stage"] == "rejected" and not card["gate"]["passed"]
    assert any("anchor drift" in r for r in card["reasons"]), card["reasons"]
    assert card["metrics"]["val_accuracy"].keys() == {"colour", "shape"}
    assert reg.production("default", "seqlora") == 1 and reg.card(Ref("default", "seqlora", 1))["stage"] == "production"
    entry = coordinator(cfg).timeline("seqlora")[-1]
    assert entry["status"] == "rejected" and entry["reasons"] == card["reasons"]
    # The working state is production again, so the next task trains from what is served.
    assert files_of(tmp_path / "stream" / "seqlora" / "state" / "adapters" / "shared") == served
    assert metrics["tasks"] == ["colour"] and metrics["versions"] == [1]

    # A rejected task may arrive again (here with the gate only reporting) and is learned after the others.
    metrics = arrive(dataclasses.replace(cfg, gate=GateConfig(mode="report")), "seqlora", "shape", data["shape"], quiet)
    assert metrics["tasks"] == ["colour", "shape"] and metrics["versions"] == [1, 3]
    assert reg.production("default", "seqlora") == 3


def test_a_rejected_decoupled_task_leaves_the_router_and_its_adapters_as_served(backbone_dir, tmp_path):
    """Decoupled routes with the served state's router, so the rejection path must read it before restoring it."""
    data = write_benchmark(tmp_path / "data", 0, ("colour",), 64, 8, 24)
    repo = Path(__file__).resolve().parents[1]
    import_llava(repo / "examples/llava/conversations.json", repo / "examples/llava/images", tmp_path / "where.parquet",
                 val_fraction=0.2, test_fraction=0.2)
    cfg = RunConfig(strategies=("decoupled",), out=str(tmp_path / "stream"), backbone=BackboneSpec(str(backbone_dir)),
                    adapter=AdapterSpec(visual_rank=2, text_rank=2),
                    train=TrainConfig(steps=15, batch_size=8, lr=3e-3, executor="local", checkpoint_every=0))
    quiet = Console(quiet=True)
    arrive(cfg, "decoupled", "colour", data["colour"], quiet)
    unreachable = dataclasses.replace(cfg, gate=GateConfig(min_gain=101))  # no accuracy can pass
    metrics = arrive(unreachable, "decoupled", "where", tmp_path / "where.parquet", quiet)

    assert metrics["tasks"] == ["colour"] and metrics["versions"] == [1]
    card = Registry(str(tmp_path / "stream" / "registry")).card(Ref("default", "where", 1))
    assert card["stage"] == "rejected" and len(card["reasons"]) == 1 and "floor" in card["reasons"][0]
    # colour's adapter is untouched and its rows are routed on their prompts, as serving does: no drift.
    assert card["gate"]["kl"] < 1e-3, card["gate"]
    assert [p.name for p in (tmp_path / "stream" / "decoupled" / "state" / "adapters").iterdir()] == ["colour"]
    with pytest.raises(ValueError, match="'colour' was already learned"):  # a rejected task may come again; not this
        arrive(cfg, "decoupled", "colour", data["colour"], quiet)


@pytest.fixture()
def registry(backbone, test_spec, backbone_dir, tmp_path) -> Path:
    """A registry with three pushed versions of default/seqlora: v1 and v2 promoted in turn, v3 a candidate."""
    model, _ = backbone
    info = backbone_info(test_spec.source, backbone_dir, model)
    reg = Registry(str(tmp_path / "registry"))
    from strata.backbone.load import load_backbone

    for v in (1, 2, 3):
        src, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp_path / f"a{v}", seed=v)
        card = {"strategy": "seqlora", "task": f"t{v}", "metrics": {"val_accuracy": {"colour": 50.0 + v}}}
        reg.push(Ref("default", "seqlora", v), src, card, info)
        if v < 3:
            reg.promote(Ref("default", "seqlora", v))
    return tmp_path / "registry"


def invoke(*args) -> tuple[int, str]:
    """Exit code and output with table borders and line breaks flattened to single spaces."""
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    return result.exit_code, " ".join(re.sub(r"[\u2500-\u257f]", " ", result.output).split())


def test_registry_commands_list_show_promote_roll_back_diff_and_collect(registry):
    r = ["--registry", registry]
    code, out = invoke("registry", "ls", *r)
    assert code == 0 and "seqlora" in out and "v2" in out
    code, out = invoke("registry", "show", "default/seqlora", *r)
    assert code == 0 and "default/seqlora@v2" in out and "production" in out and "adapter_model.safetensors" in out
    code, out = invoke("registry", "diff", "default/seqlora@v1", "seqlora@v2", *r)
    assert code == 0 and "val colour" in out and "51.0 52.0 +1.0" in out
    assert invoke("registry", "promote", "default/seqlora@v3", *r)[0] == 0
    assert Registry(str(registry)).production("default", "seqlora") == 3
    code, out = invoke("registry", "rollback", "default/seqlora", *r)
    assert code == 0 and "v3 -> v2" in out
    code, out = invoke("registry", "gc", "default/seqlora", "--keep", "0", *r)
    assert code == 0 and "removed v1, v3" in out
    assert Registry(str(registry)).versions("default", "seqlora") == [2]

    assert invoke("registry", "show", "default/nope", *r) == (1, f"error: no adapter default/nope in registry {registry}")
    code, out = invoke("registry", "promote", "default/seqlora", *r)
    assert code == 1 and "promote needs a version" in out
    code, out = invoke("registry", "show", "../etc/seqlora", *r)
    assert code == 1 and "invalid adapter id" in out
    code, out = invoke("registry", "show", "default/seqlora@v9", *r)
    assert code == 1 and "no committed version default/seqlora@v9 (committed: v2)" in out


def test_monitor_drift_writes_a_report_and_a_plot(registry, tmp_path):
    write_benchmark(tmp_path / "data", 0, ("colour", "shape"), 8, 8, 8)
    code, out = invoke("monitor", "drift", "default/seqlora", "--registry", registry, "--anchor", tmp_path / "data",
                       "--rows", 16, "--against", "1", "--out", tmp_path / "mon")
    assert code == 0, out
    report = json.loads((tmp_path / "mon" / "drift.json").read_text())
    kl = {r["version"]: r["kl"] for r in report["drift"]}
    assert report["against"] == "default/seqlora@v1" and report["anchor_rows"] == 16
    assert kl[1] == pytest.approx(0.0, abs=1e-6) and kl[2] > 0 and kl[3] > 0
    assert (tmp_path / "mon" / "drift.png").stat().st_size > 1000
