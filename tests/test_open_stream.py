"""The user-facing refusals of an open stream: versions that do not exist or were tampered with."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.arrival import StrategyStream, tree_hash
from strata.config import BackboneSpec, RunConfig, TrainConfig
from strata.coordinator import Coordinator
from strata.open_stream import evaluate, pinned
from strata.strategies.base import TaskContext


def stream(tmp_path: Path, strategy: str, backbone_dir: Path) -> StrategyStream:
    cfg = RunConfig(strategies=(strategy,), out=str(tmp_path), backbone=BackboneSpec(str(backbone_dir)),
                    train=TrainConfig(executor="local"))
    return StrategyStream(cfg, strategy, backbone_dir, Coordinator("s", str(tmp_path / "coordinator"), use_ray=False))


def promote_v1(s: StrategyStream, tmp_path: Path) -> Path:
    kept = tmp_path / "v1"
    kept.mkdir()
    (kept / "adapter_model.safetensors").write_bytes(b"weights")
    s.coord.begin_task(s.name, "colour", s.owner)
    adapter = {"name": "shared", "path": str(kept), "sha256": tree_hash(kept)}
    s.coord.commit_task(s.name, "colour", s.owner, "promoted", {"adapter": adapter, "accuracy": {"colour": 1.0}})
    return kept


def test_pinned_versions_are_checked(tmp_path: Path, backbone_dir: Path) -> None:
    s = stream(tmp_path, "dgg", backbone_dir)
    kept = promote_v1(s, tmp_path)
    ctx = TaskContext(0, "colour", (), {}, str(s.state_dir))
    (tmp_path / "pin").mkdir()
    assert (Path(pinned(s, ctx, 1, tmp_path / "pin").adapters_dir) / "shared").resolve() == kept
    with pytest.raises(ValueError, match=r"'shared' has versions 1..1, not 2"):
        pinned(s, ctx, 2, tmp_path / "pin2")
    (kept / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match its recorded hash"):
        pinned(s, ctx, 1, tmp_path / "pin3")


def test_decoupled_has_no_versions_and_an_empty_stream_has_nothing_to_evaluate(tmp_path: Path,
                                                                                backbone_dir: Path) -> None:
    s = stream(tmp_path, "decoupled", backbone_dir)
    with pytest.raises(ValueError, match="keeps one adapter per task"):
        pinned(s, TaskContext(0, "colour", (), {}, str(s.state_dir)), 1, tmp_path)
    with pytest.raises(ValueError, match="has learned no task in stream 'default'"):
        evaluate(s.cfg, "decoupled")
