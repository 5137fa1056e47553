"""Merge-for-deploy: a merged standalone model gives the adapter model's logits; unmergeable kinds and
quantized bases are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from strata.adapters.lora import add_adapter, save_adapter, trainable_parameters
from strata.adapters.merge import MERGE_INFO, merge_adapter
from strata.backbone.load import fingerprint, load_backbone
from strata.config import AdapterSpec, BackboneSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table


@pytest.fixture(scope="module")
def batch(test_spec, backbone_dir):
    _, processor = load_backbone(test_spec, backbone_dir)
    rows = generate_task("colour", 0, n_train=3, n_val=0, n_test=0)
    return collate(encode_table(processor, rows, with_answers=True), processor.tokenizer.pad_token_id)


def saved_adapter(test_spec, backbone_dir, spec: AdapterSpec, dest: Path) -> tuple[Path, torch.nn.Module]:
    """An adapter moved off its init (so merging it changes the weights), saved to `dest`."""
    model = add_adapter(load_backbone(test_spec, backbone_dir)[0], "task", spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()
    return save_adapter(model, "task", dest), model


@pytest.mark.parametrize("spec", [
    AdapterSpec(kind="lora", visual_rank=4, text_rank=6, layer_ranks={r".*down_proj": 2}),
    AdapterSpec(kind="dora", placement="top_half"),
    AdapterSpec(kind="bitfit", placement="vision_only"),
], ids=lambda s: s.kind)
def test_merged_model_matches_the_adapter_model(test_spec, backbone_dir, batch, spec: AdapterSpec,
                                                tmp_path: Path) -> None:
    adapter_dir, model = saved_adapter(test_spec, backbone_dir, spec, tmp_path / "adapter")
    backbone_files = {p.name: p.read_bytes() for p in backbone_dir.iterdir() if p.is_file()}
    out = merge_adapter(test_spec, backbone_dir, adapter_dir, tmp_path / "deploy" / "merged")

    assert out == tmp_path / "deploy" / "merged"
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # written atomically, no temp dir left
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", MERGE_INFO} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    info = json.loads((out / MERGE_INFO).read_text())
    assert info["kind"] == spec.kind and info["backbone_fingerprint"] == fingerprint(backbone_dir)
    assert {p.name: p.read_bytes() for p in backbone_dir.iterdir() if p.is_file()} == backbone_files  # untouched

    merged, processor = load_backbone(BackboneSpec(str(out)), out)  # a plain LLaVA model dir, no adapter
    assert not any("lora_" in n or ".delta" in n for n, _ in merged.named_parameters())
    base, _ = load_backbone(test_spec, backbone_dir)
    with torch.no_grad():
        expected, got, bare = model(**batch).logits, merged(**batch).logits, base(**batch).logits
    assert (expected - bare).abs().max() > 0.1  # the adapter changes outputs far beyond the tolerance below
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)  # float32 summation order differs
    assert processor.tokenizer.get_vocab() == load_backbone(test_spec, backbone_dir)[1].tokenizer.get_vocab()


@pytest.mark.parametrize(("spec", "why"), [
    (AdapterSpec(kind="prefix", placement="language_only"), "prefix adapters cannot be merged: .*virtual"),
    (AdapterSpec(kind="bottleneck"), "bottleneck adapters cannot be merged: .*non-linear"),
], ids=lambda x: getattr(x, "kind", ""))
def test_unmergeable_kinds_are_refused(test_spec, backbone_dir, spec: AdapterSpec, why: str,
                                       tmp_path: Path) -> None:
    adapter_dir, _ = saved_adapter(test_spec, backbone_dir, spec, tmp_path / "adapter")
    with pytest.raises(ValueError, match=why):
        merge_adapter(test_spec, backbone_dir, adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_quantized_base_is_refused(test_spec, backbone_dir, tmp_path: Path) -> None:
    adapter_dir, _ = saved_adapter(test_spec, backbone_dir, AdapterSpec(), tmp_path / "adapter")
    quantized = BackboneSpec(test_spec.source, quantization="4bit")
    with pytest.raises(ValueError, match="merge needs a full-precision base.*'4bit'"):
        merge_adapter(quantized, backbone_dir, adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_directory_without_an_adapter_is_refused(test_spec, backbone_dir, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no adapter"):
        merge_adapter(test_spec, backbone_dir, tmp_path, tmp_path / "merged")
