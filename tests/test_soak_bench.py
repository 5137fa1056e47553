"""The soak at test size: mixed traffic, a promotion and a rollback, a replica killed, no wrong version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_a_short_soak_answers_every_request_from_the_version_due_and_recovers_a_killed_replica(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "24", "--change-every", "5",
           "--kills", "1", "--clients", "4", "--warmup", "5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["checked"] > 50 and r["wrong_version"] == 0 and r["wrong_text"] == 0, r["examples"]
    assert len(r["changes"]) >= 3 and {c["version"] for c in r["changes"]} == {1, 2}  # promoted and rolled back
    assert len(r["recovery_s"]) == 1 and r["recovery_s"][0] < 90
    assert set(r["statuses"]) <= {f"{k} {s}" for k in ("plain", "streamed", "pinned", "auto") for s in (200, 503, 598, 599)}
    assert r["ok_share"] > 0.9 and {k.split()[0] for k in r["statuses"]} == {"plain", "streamed", "pinned", "auto"}
    assert len({m["replica"] for m in r["memory"]}) >= 2 and out.with_suffix(".png").exists()
