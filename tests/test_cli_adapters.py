"""`strata adapters kinds|merge` and `strata probe conflict`: tables, files, and clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from strata import cli
from strata.adapters.lora import add_adapter, save_adapter
from strata.backbone.load import load_backbone
from strata.config import PLACEMENTS, AdapterSpec


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """A wide console, so rich never wraps the paths and reasons the tests look for."""
    monkeypatch.setattr(cli, "console", Console(width=400, no_color=True))


def invoke(*args: object):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def saved(test_spec, backbone_dir: Path, spec: AdapterSpec, dest: Path) -> Path:
    return save_adapter(add_adapter(load_backbone(test_spec, backbone_dir)[0], "task", spec), "task", dest)


def test_kinds_table_lists_every_placement_and_refusals() -> None:
    result = invoke("adapters", "kinds")
    assert result.exit_code == 0, result.output
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip().strip("│").split("│")]
                                              for line in result.output.splitlines() if line.count("│") >= 3)}
    assert rows["lora"] == ["yes"] * len(PLACEMENTS)
    assert rows["bitfit"][PLACEMENTS.index("language_only")] == "—"  # Llama linears have no biases
    assert rows["prefix"][PLACEMENTS.index("language_only")] == "yes"


def test_merge_writes_a_standalone_model(test_spec, backbone_dir: Path, tmp_path: Path) -> None:
    adapter = saved(test_spec, backbone_dir, AdapterSpec(), tmp_path / "adapter")
    result = invoke("adapters", "merge", adapter, tmp_path / "merged", "--backbone", backbone_dir)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_merge_refuses_prefix_and_quantized_bases(test_spec, backbone_dir: Path, tmp_path: Path) -> None:
    prefix = saved(test_spec, backbone_dir, AdapterSpec(kind="prefix", placement="language_only"), tmp_path / "p")
    result = invoke("adapters", "merge", prefix, tmp_path / "out", "--backbone", backbone_dir)
    assert result.exit_code == 1 and "prefix adapters cannot be merged" in " ".join(result.output.split())

    quantized = tmp_path / "quantized-base"
    shutil.copytree(backbone_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    lora = saved(test_spec, backbone_dir, AdapterSpec(), tmp_path / "lora")
    result = invoke("adapters", "merge", lora, tmp_path / "out", "--backbone", quantized)
    assert result.exit_code == 1 and "holds a quantized model" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_probe_conflict_prints_a_table_and_writes_json_and_plot(backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    result = invoke("probe", "conflict", "--backbone", backbone_dir, "--steps", 2, "--rows", 4, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "conflict.json").read_text())
    assert set(report["mode"]["groups"]) == {"phi", "psi"} and set(report["coupled"]["groups"]) == {"moe"}
    assert report["setup"]["steps"] == 2 and report["setup"]["rows"] == 4
    assert (out / "conflict.png").stat().st_size > 0
    assert "psi" in result.output and "cos mean" in result.output


def test_probe_conflict_refuses_a_reference_it_cannot_build(backbone_dir: Path, tmp_path: Path) -> None:
    result = invoke("probe", "conflict", "--backbone", backbone_dir, "--steps", 1,
                    "--reference", tmp_path / "missing.parquet", "--out", tmp_path / "probe")
    assert result.exit_code == 1
    assert "missing.parquet" in "".join(result.output.split())  # a long path may wrap anywhere
    assert not (tmp_path / "probe").exists()


def test_probe_conflict_names_an_unknown_task_or_a_missing_dataset(backbone_dir: Path, tmp_path: Path) -> None:
    result = invoke("probe", "conflict", "--backbone", backbone_dir, "--task", "colours", "--out", tmp_path / "p")
    assert result.exit_code == 1 and "unknown task 'colours'" in " ".join(result.output.split())
    result = invoke("probe", "conflict", "--backbone", backbone_dir, "--data", tmp_path / "nope.parquet",
                    "--out", tmp_path / "p")
    assert result.exit_code == 1 and "nope.parquet" in "".join(result.output.split())
    assert not (tmp_path / "p").exists()


def test_run_refuses_a_kind_placement_pair_before_writing(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("adapter:\n  kind: bitfit\n  placement: language_only\n")
    out = tmp_path / "out"
    result = invoke("run", "--config", config, "--strategy", "seqlora", "--out", out)
    assert result.exit_code == 1
    assert "adapter kind 'bitfit' does not support placement 'language_only'" in " ".join(result.output.split())
    assert not out.exists()
