"""The `strata` command: clear exits and messages for good and bad datasets, imports and configs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from strata import cli
from strata.data.benchmark import generate_task
from strata.data.schema import read_table, validate_dataset, write_table

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """A wide console, so rich never wraps the paths and reasons the tests look for."""
    monkeypatch.setattr(cli, "console", Console(width=400, no_color=True))


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table in the output, as lists of stripped cells."""
    return [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in text.splitlines() if line.count("│") >= 3]


@pytest.fixture(scope="module")
def good_table() -> pa.Table:
    return generate_task("colour", 0, n_train=4, n_val=2, n_test=2)


def test_validate_good_file(good_table, tmp_path: Path) -> None:
    path = write_table(good_table, tmp_path / "colour.parquet")
    result = invoke("data", "validate", path)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "8 rows" in result.output


def test_validate_bad_file_names_rows_and_reasons(good_table, tmp_path: Path) -> None:
    rows = good_table.to_pylist()
    rows[3]["id"] = rows[1]["id"]  # duplicate id
    rows[5]["answer"] = "   "  # empty answer
    bad = pa.Table.from_pylist(rows, schema=good_table.schema)
    path = write_table(bad, tmp_path / "bad.parquet")
    result = invoke("data", "validate", path)
    assert result.exit_code == 1
    out = flat(result.output)
    assert "2 problem(s)" in out
    assert table_rows(result.output) == [
        ["3", rows[1]["id"], "id", f"duplicate id {rows[1]['id']!r}: also used by row 1"],
        ["5", rows[5]["id"], "answer", "answer is empty or whitespace-only"],
    ]
    assert "is not a valid dataset" in out


def test_validate_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.parquet"
    result = invoke("data", "validate", missing)
    assert result.exit_code == 1
    assert "error:" in result.output
    assert f"dataset not found: {missing}" in flat(result.output)
    assert "Traceback" not in result.output


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_import_llava_writes_a_valid_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png((255, 0, 0)))
    (images / "b.png").write_bytes(png((0, 0, 255)))
    records = [
        {"id": "r1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is it round?"},
            {"from": "gpt", "value": "no"}]},
        {"id": "r2", "image": "b.png", "conversations": [
            {"from": "human", "value": "What colour is it?\n<image>"},
            {"from": "gpt", "value": "blue"}]},
    ]  # fmt: skip
    json_path = tmp_path / "llava.json"
    json_path.write_text(json.dumps(records))
    out = tmp_path / "out" / "llava.parquet"
    result = invoke("data", "import-llava", json_path, images, out)
    assert result.exit_code == 0, result.output
    assert "wrote 3 rows from 2 conversations" in flat(result.output)
    assert validate_dataset(out).ok
    table = read_table(out).to_pylist()
    assert [r["answer"] for r in table] == ["red", "no", "blue"]
    assert table[0]["image"] == (images / "a.png").read_bytes()
    assert table[2]["image"] == (images / "b.png").read_bytes()
    # The written file passes the CLI's own validation too.
    assert invoke("data", "validate", out).exit_code == 0


def test_import_llava_bad_json_exits_cleanly(tmp_path: Path) -> None:
    json_path = tmp_path / "llava.json"
    json_path.write_text("{not json")
    out = tmp_path / "out.parquet"
    result = invoke("data", "import-llava", json_path, tmp_path, out)
    assert result.exit_code == 1
    assert "is not valid JSON" in flat(result.output)
    assert not out.exists()


def test_run_unknown_strategy_exits_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("run", "--strategy", "seqlora", "--strategy", "bogus", "--out", out)
    assert result.exit_code != 0
    assert "unknown strategy 'bogus'" in flat(result.output)
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing was built, generated or trained


def test_run_config_unknown_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("strategies: [seqlora]\ntrain:\n  stepz: 3\n")
    out = tmp_path / "run"
    result = invoke("run", "--config", config, "--out", out)
    assert result.exit_code == 1
    assert "unknown key(s) in run config.train: stepz" in flat(result.output)
    assert not out.exists()


def test_build_run_config_flags_override_yaml(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("strategies: [seqlora]\ntasks: 5\ntrain:\n  steps: 9\n  batch_size: 4\n")
    cfg = cli.build_run_config(
        config, ["decoupled"], tasks=2, steps=None, out=str(tmp_path), seed=7,
        backbone="builtin:test", workers=2, data=None, test_rows=10,
    )
    assert cfg.strategies == ("decoupled",)
    assert (cfg.tasks, cfg.seed, cfg.n_test, cfg.out) == (2, 7, 10, str(tmp_path))
    train = cfg.train
    assert (train.steps, train.batch_size, train.num_workers, train.seed) == (9, 4, 2, 7)
    assert cfg.backbone.source == "builtin:test"


def test_run_rejects_a_bad_dataset_before_anything_is_written(tmp_path: Path, backbone_dir: Path) -> None:
    """A stream with one invalid task stops at validation: the report names the row, no output."""
    from strata.data.benchmark import generate_task
    from strata.data.schema import write_table

    data = tmp_path / "data"
    good = generate_task("colour", 0, n_train=8, n_val=2, n_test=4)
    bad = generate_task("shape", 0, n_train=8, n_val=2, n_test=4).to_pylist()
    bad[3]["answer"] = "   "
    write_table(good, data / "a_colour.parquet")
    write_table(pa.Table.from_pylist(bad, schema=good.schema), data / "b_shape.parquet")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["run", "--strategy", "seqlora", "--tasks", "2",
                                          "--data", str(data), "--backbone", str(backbone_dir),
                                          "--out", str(out)])
    assert result.exit_code == 1
    assert "row 3" in result.output and "answer" in result.output
    assert not out.exists()


def test_backbone_build_refuses_an_unknown_name_and_builds_a_known_one_into_the_cache(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    result = invoke("backbone", "build", "builtin:huge")
    assert result.exit_code == 1 and "unknown built-in backbone 'builtin:huge'" in flat(result.output)
    assert "builtin:test" in result.output and "builtin:tiny" in result.output

    from strata.backbone import tiny

    small = dataclasses.replace(tiny.RECIPES["builtin:test"], corpus_size=64, vision_steps=4, vision_batch_size=8,
                                steps=6, binding_steps=6, batch_size=4)
    monkeypatch.setitem(tiny.RECIPES, "builtin:small", small)
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    result = invoke("backbone", "build", "builtin:small")
    assert result.exit_code == 0, result.output
    built = tmp_path / "backbones" / f"small-{small.key()}"
    assert (built / "strata_recipe.json").exists() and f"ready: {built}" in flat(result.output)
