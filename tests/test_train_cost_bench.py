"""The train-cost benchmark runs end to end at smoke size and writes a complete report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_cost.py"
VARIANTS = ("full_ft", "lora_all", "lora_text", "lora_text_cached_vision")
RATIOS = ("step_ms_median_ratio", "step_ms_min_ratio", "step_cpu_ms_median_ratio",
          "peak_tensor_mb_ratio", "peak_tensor_no_param_mb_ratio", "peak_rss_growth_mb_ratio")


def test_smoke_run_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "results" / "train_cost.json"
    # One thread: the smoke test checks plumbing, and a busy 2-core box slows 2-thread steps most.
    cmd = [sys.executable, str(SCRIPT), "--smoke-test", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads(out.read_text())
    assert not list(out.parent.glob(".*")), "temp file left behind by the atomic write"
    for key in ("command", "machine", "config", "memory_definitions", "cached_vision_loss_check",
                "variants", "seconds"):
        assert key in report
    assert {"platform", "cpu_count", "torch"} <= set(report["machine"])
    assert "--smoke-test" in report["command"]
    assert report["config"]["recipe"]["width"] == 64 and report["config"]["steps"] == 2
    assert report["config"]["image_tokens"] == 9

    check = report["cached_vision_loss_check"]
    assert check["passed"] and check["abs_diff"] <= 1e-5 and check["grad_max_abs_diff"] <= 1e-5

    rows = report["variants"]
    assert tuple(rows) == VARIANTS
    for name, row in rows.items():
        assert len(row["step_ms_all"]) == 2
        for key in RATIOS:
            assert row[key] is not None and row[key] > 0, (name, key, row[key])
        assert 0 < row["trainable_pct"] <= 100
        assert row["peak_tensor_mb"] > row["peak_tensor_no_param_mb"] > 0
    assert rows["full_ft"]["trainable_pct"] == 100
    assert rows["full_ft"]["step_ms_median_ratio"] == 1.0
    # Exact byte counts do not depend on load: LoRA keeps far less optimizer state than full FT.
    for name in VARIANTS[1:]:
        assert rows[name]["trainable_pct"] < 50
        assert rows[name]["optimizer_state_mb"] < rows["full_ft"]["optimizer_state_mb"]
    assert rows["lora_text_cached_vision"]["vision_nograd_ms_median"] > 0
