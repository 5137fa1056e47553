"""The DGG probe at test size: it compares θ − θ* with the true task-1 gradient during task 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dgg_probe import cosine


def test_cosine_spans_tensor_lists() -> None:
    a = [torch.tensor([1.0, 0.0]), None, torch.tensor([[0.0]])]
    assert cosine(a, [torch.tensor([2.0, 0.0]), torch.ones(3), torch.tensor([[5.0]])]) == pytest.approx(2 / 32**0.5)  # None is zero: b keeps its norm
    assert cosine(a, [torch.tensor([-1.0, 0.0]), None, torch.zeros(1, 1)]) == pytest.approx(-1.0)
    assert cosine([torch.zeros(2)], [torch.ones(2)]) == 0.0


def test_probe_runs_two_tasks_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "dgg_probe.py"), "--backbone", "builtin:test", "--steps", "6",
           "--every", "2", "--seeds", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert [p["step"] for p in run["probes"]] == [2, 4, 6]  # task 2 only: task 1 has no θ*
    assert all(-1.0 <= p["cos_displacement"] <= 1.0 and p["task1_loss"] > 0 for p in run["probes"])
    assert run["trace"]["step"] == [1, 2, 3, 4, 5, 6]
    assert result["summary"]["probes"] == 3
    assert out.with_suffix(".png").stat().st_size > 0
