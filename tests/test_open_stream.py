"""The user-facing refusals of an open stream: versions that do not exist or were tampered with."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_helper import trained_adapter

from strata.arrival import StrategyStream
from strata.config import BackboneSpec, RunConfig, TrainConfig
from strata.coordinator import Coordinator
from strata.hooks import TaskContext
from strata.open_stream import evaluate, pinned
from strata.registry import HashMismatch, Ref, RegistryError


def stream(tmp_path: Path, strategy: str, backbone_dir: Path) -> StrategyStream:
    cfg = RunConfig(strategies=(strategy,), out=str(tmp_path), backbone=BackboneSpec(str(backbone_dir)),
                    train=TrainConfig(executor="local"))
    return StrategyStream(cfg, strategy, backbone_dir, Coordinator("s", str(tmp_path / "coordinator"), use_ray=False))


def test_pinned_versions_come_hash_checked_from_the_registry(tmp_path: Path, backbone, backbone_dir: Path) -> None:
    s = stream(tmp_path, "dgg", backbone_dir)
    src, _ = trained_adapter(backbone, tmp_path / "trained", seed=0)
    s.registry.push(Ref("default", "dgg", 1), src, {"strategy": "dgg"}, s.backbone)
    ctx = TaskContext(0, "colour", (), {}, str(s.state_dir))
    got = Path(pinned(s, ctx, 1, tmp_path / "pin").adapters_dir) / "shared"
    assert (got / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RegistryError, match=r"no committed version default/dgg@v2 \(committed: v1\)"):
        pinned(s, ctx, 2, tmp_path / "pin2")
    weights = tmp_path / "registry" / "default" / "dgg" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    with pytest.raises(HashMismatch, match="adapter_model.safetensors has sha256"):
        pinned(s, ctx, 1, tmp_path / "pin3")


def test_decoupled_has_no_versions_and_an_empty_stream_has_nothing_to_evaluate(tmp_path: Path,
                                                                                backbone_dir: Path) -> None:
    s = stream(tmp_path, "decoupled", backbone_dir)
    with pytest.raises(ValueError, match="keeps one adapter per task"):
        pinned(s, TaskContext(0, "colour", (), {}, str(s.state_dir)), 1, tmp_path)
    with pytest.raises(ValueError, match="has learned no task in stream 'default'"):
        evaluate(s.cfg, "decoupled")
