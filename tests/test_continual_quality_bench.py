"""The continual-quality benchmark at smoke size: one process per run, a summary, and resumption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "continual_quality.py"


def test_smoke_run_summarises_and_resumes(tmp_path: Path) -> None:
    results, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, str(SCRIPT), "--smoke-test", "--suite", "cma", "--suite", "conflict", "--seeds", "0",
           "--results", str(results), "--benchmarks-md", str(md)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    report = json.loads((results / "continual_quality.json").read_text())
    cma = report["summary"]["cma"]
    assert set(cma) == {"cma-freeze", "cma-no-freeze"}
    for label, agg in cma.items():
        assert agg["seeds"] == [0] and agg["tasks"] == 2, label
        assert 0.0 <= agg["faa"] <= 100.0 and agg["peak_rss_mb"] > 100, label
        assert agg["extra_rss_mb"] is None  # no SeqLoRA run in this selection to pair with
    assert set(report["conflict"]["0"]["mode"]["groups"]) == {"phi", "psi"}
    assert (results / "continual_quality.png").stat().st_size > 0
    assert not md.exists()  # smoke runs never write the published figures

    runs = {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*.json")}
    assert len(runs) == 3  # two CMA configurations and one probe, one seed
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # Every (configuration, seed) was already done: nothing reruns, nothing is rewritten.
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*.json")} == runs
    assert json.loads((results / "continual_quality.json").read_text())["summary"] == report["summary"]
    # A row of another configuration (or an older backbone build) is run again.
    stale = results / "runs" / "cma" / "cma-freeze" / "seed0.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "config_key": "older"}))
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(stale.read_text())["config_key"] != "older"
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*.json") if p != stale} == \
        {p: t for p, t in runs.items() if p != stale}
