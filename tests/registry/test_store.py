"""The registry on a local directory: round trips, crashes mid-push, concurrency, tampering, wrong backbones."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lora_helper import trained_adapter
from peft import PeftModel

from strata.backbone.load import load_backbone
from strata.backbone.tiny import RECIPES, build_model
from strata.coordinator import Coordinator
from strata.registry import HashMismatch, IncompatibleAdapter, Ref, Registry, RegistryError, backbone_info


@pytest.fixture()
def info(test_spec, backbone_dir):
    """The stream backbone's identity and module shapes."""
    model, _ = load_backbone(test_spec, backbone_dir)
    return backbone_info(test_spec.source, backbone_dir, model)


def push(reg: Registry, src: Path, info, version: int, adapter: str = "seqlora") -> Ref:
    ref = Ref("s1", adapter, version)
    reg.push(ref, src, {"strategy": "seqlora", "task": f"t{version}", "parent": version - 1 or None}, info)
    return ref


def test_push_promote_rollback_round_trip_and_plain_peft_load(backbone, test_spec, backbone_dir, info, tmp_path):
    src, peft_model = trained_adapter(backbone, tmp_path / "a1", seed=0)
    reg = Registry(str(tmp_path / "registry"))
    v1 = push(reg, src, info, 1)
    card = reg.card(v1)
    assert card["stage"] == "candidate" and reg.production("s1", "seqlora") is None
    assert set(card["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert card["backbone"]["fingerprint"] == info.fingerprint and card["parent"] is None
    reg.promote(v1)
    src2, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp_path / "a2", seed=1)
    v2 = push(reg, src2, info, 2)
    reg.promote(v2)
    assert [reg.card(Ref("s1", "seqlora", v))["stage"] for v in (1, 2)] == ["archived", "production"]
    assert reg.rollback("s1", "seqlora") == v1
    assert [reg.card(Ref("s1", "seqlora", v))["stage"] for v in (1, 2)] == ["production", "archived"]
    assert reg.card(v1)["history"][-1]["reason"] == "rollback from v2"
    assert reg.rollback("s1", "seqlora", to=2) == v2 and reg.production("s1", "seqlora") == 2

    # What the registry wrote loads with plain PEFT and predicts exactly what the trained model did.
    fetched = reg.fetch(v1, tmp_path / "fetched")
    model, _ = load_backbone(test_spec, backbone_dir)
    loaded = PeftModel.from_pretrained(model, str(fetched))
    ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-6)


class CrashingRegistry(Registry):
    """Dies at the `crash_at`-th object write of a push, as a killed process would."""

    def __init__(self, root: str, crash_at: int) -> None:
        super().__init__(root)
        self.crash_at, self.writes = crash_at, 0

    def _put(self, path: str, data: bytes) -> None:
        self.writes += 1
        if self.writes == self.crash_at:
            raise KeyboardInterrupt(f"crash before writing {path}")
        super()._put(path, data)


def test_a_crash_at_any_step_of_a_push_leaves_the_registry_consistent(backbone, info, tmp_path):
    src, _ = trained_adapter(backbone, tmp_path / "a", seed=0)
    root = str(tmp_path / "registry")
    reg = Registry(root)
    reg.promote(push(reg, src, info, 1))
    steps = len(list(src.iterdir())) + 2  # the files, then the card, then the manifest
    for crash_at in range(1, steps + 1):
        with pytest.raises(KeyboardInterrupt):
            push(CrashingRegistry(root, crash_at), src, info, 1 + crash_at)
        assert reg.versions("s1", "seqlora") == [1] and reg.production("s1", "seqlora") == 1
        assert reg.resolve("s1", "seqlora", "latest").version == 1
        with pytest.raises(RegistryError, match="no committed version"):
            reg.card(Ref("s1", "seqlora", 1 + crash_at))
    assert len(reg.gc("s1", "seqlora", keep=5, grace_s=0)) == steps - 1  # the first crash wrote nothing
    reg.verify(Ref("s1", "seqlora", 1))
    push(reg, src, info, 10)  # the registry takes new pushes after the crashes
    assert reg.versions("s1", "seqlora") == [1, 10]


def test_eight_concurrent_pushes_get_eight_distinct_versions(backbone, info, tmp_path):
    src, _ = trained_adapter(backbone, tmp_path / "a", seed=0)
    reg = Registry(str(tmp_path / "registry"))
    coord = Coordinator("s1", str(tmp_path / "coordinator"), use_ray=False)
    got, errors = [], []

    def one() -> None:
        try:
            got.append(push(reg, src, info, coord.next_version("s1/seqlora")).version)
        except Exception as e:  # noqa: BLE001 (reported by the assertion)
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == list(range(1, 9))
    assert reg.versions("s1", "seqlora") == list(range(1, 9))
    with pytest.raises(RegistryError, match="already committed"):
        push(reg, src, info, 3)


def test_a_tampered_weight_file_is_refused_with_its_name(backbone, info, tmp_path):
    src, _ = trained_adapter(backbone, tmp_path / "a", seed=0)
    reg = Registry(str(tmp_path / "registry"))
    ref = push(reg, src, info, 1)
    weights = tmp_path / "registry" / "s1" / "seqlora" / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=r"s1/seqlora@v1: adapter_model\.safetensors has sha256"):
        reg.fetch(ref, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_an_adapter_for_another_backbone_is_refused_at_registration(backbone, test_spec, backbone_dir, info, tmp_path):
    _, processor = backbone
    wider = build_model(replace(RECIPES["builtin:test"], width=96, heads=4), processor)
    wider.save_pretrained(tmp_path / "wider")
    other = backbone_info("wider", tmp_path / "wider", wider)
    src, _ = trained_adapter((wider, processor), tmp_path / "a", seed=0)
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(IncompatibleAdapter, match=r"lora_A\.weight has shape \[4, 192\], but .* has weight shape \[64, 128\]"):
        push(reg, src, info, 1)  # its LoRA shapes do not fit the stream's backbone
    ok, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp_path / "ok", seed=0)
    reg.promote(push(reg, ok, info, 1))
    with pytest.raises(IncompatibleAdapter, match="stream 's1' is pinned to"):
        push(reg, src, other, 2)  # its card says another backbone
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapter, match="target module 'no_such_proj' does not exist"):
        push(reg, src, info, 3)
    assert reg.versions("s1", "seqlora") == [1]


def test_stages_gc_and_bad_names(backbone, info, tmp_path):
    src, _ = trained_adapter(backbone, tmp_path / "a", seed=0)
    reg = Registry(str(tmp_path / "registry"))
    for v in range(1, 5):
        reg.promote(push(reg, src, info, v))
    rejected = push(reg, src, info, 5)
    reg.set_stage(rejected, "rejected", "gate", reasons=["colour dropped 40.0 points"])
    with pytest.raises(RegistryError, match="rejected by the gate \\(colour dropped 40.0 points\\)"):
        reg.promote(rejected)
    assert reg.gc("s1", "seqlora", keep=1) == ["v1", "v2"]  # archived beyond the newest one; never production
    assert reg.versions("s1", "seqlora") == [3, 4, 5] and reg.production("s1", "seqlora") == 4
    with pytest.raises(ValueError, match="invalid stream name"):
        reg.card(Ref("../etc", "seqlora", 1))
    with pytest.raises(RegistryError, match="unknown stage 'live'"):
        reg.set_stage(rejected, "live", "typo")
    with pytest.raises(RegistryError, match="keep must be >= 0"):
        reg.gc("s1", "seqlora", keep=-1)
    reg.promote(push(reg, src, info, 1, adapter="fresh"))
    with pytest.raises(RegistryError, match="fresh has no earlier production version"):
        reg.rollback("s1", "fresh")
