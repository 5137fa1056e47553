"""Heat-map PNG and terminal tables."""

from __future__ import annotations

import pytest
from rich.console import Console

from strata.eval.plots import plot_accuracy_matrix
from strata.eval.report import comparison_table, matrix_table

NAN = float("nan")
R = [[80.0, NAN, NAN], [60.0, 90.0, None], [50.0, 70.0, 85.25]]
TASKS = ["vqa", "caption", "ocr"]


def _render(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


def test_plot_writes_png(tmp_path):
    out = plot_accuracy_matrix(R, TASKS, tmp_path / "sub" / "R.png", title="demo")
    assert out == tmp_path / "sub" / "R.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    # The temp file was renamed away, not left behind.
    assert [p.name for p in out.parent.iterdir()] == ["R.png"]


def test_plot_rejects_wrong_task_count(tmp_path):
    with pytest.raises(ValueError, match="2 task names"):
        plot_accuracy_matrix(R, TASKS[:2], tmp_path / "R.png")


def test_matrix_table():
    text = _render(matrix_table(R, TASKS, "accuracy"))
    assert "accuracy" in text and "caption" in text
    assert "85.2" in text and "60.0" in text
    assert "nan" not in text.lower()
    first_row = next(line for line in text.splitlines() if "80.0" in line)
    assert "90.0" not in first_row  # row 0 has only task 0 evaluated


def test_comparison_table():
    results = {
        "lora_seq": {"faa": 60.0, "mfn": 58.25, "mft": 80.0, "maa": 70.0, "bwt": -12.5,
                     "fwt": None, "forgetting": 15.0},
        "moe": {"faa": 75.0, "mfn": 74.0, "mft": 79.0, "maa": 77.0, "bwt": -1.0,
                "fwt": 2.0, "forgetting": 1.5, "router_accuracy": 96.5},
    }
    text = _render(comparison_table(results))
    for header in ("FAA", "MFN", "MFT", "MAA", "BWT", "FWT", "F", "router acc"):
        assert header in text
    assert "lora_seq" in text and "-12.5" in text and "+2.0" in text and "96.5" in text
    lora_row = next(line for line in text.splitlines() if "lora_seq" in line)
    assert lora_row.count("—") == 2  # FWT None and router acc absent

    no_router = _render(comparison_table({"x": results["lora_seq"]}))
    assert "router" not in no_router
