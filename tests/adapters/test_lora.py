"""LoRA adapters: per-side ranks, no LoRA on dead vision layers, a save that plain PEFT loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from strata.adapters.lora import (
    add_adapter,
    load_adapter,
    lora_config,
    save_adapter,
    trainable_parameters,
    used_vision_layers,
)
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table


def lora_shapes(model: torch.nn.Module, adapter: str) -> dict[str, tuple[int, int]]:
    """Module name -> (rank of lora_A, rank of lora_B) for every module carrying `adapter`."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and adapter in mod.lora_A:
            out[name] = (mod.lora_A[adapter].weight.shape[0], mod.lora_B[adapter].weight.shape[1])
    return out


def randomise_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """PEFT initialises B to zero; random B makes the adapter change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def batch(test_spec, backbone_dir):
    _, processor = load_backbone(test_spec, backbone_dir)
    rows = generate_task("shape", 0, n_train=3, n_val=0, n_test=0)
    enc = encode_table(processor, rows, with_answers=True)
    return collate(enc, processor.tokenizer.pad_token_id)


def test_per_side_ranks(backbone) -> None:
    model, _ = backbone
    peft_model = add_adapter(model, "t1", AdapterSpec(visual_rank=4, text_rank=12))
    shapes = lora_shapes(peft_model, "t1")
    vision = {n: r for n, r in shapes.items() if "vision_tower" in n}
    projector = {n: r for n, r in shapes.items() if "multi_modal_projector" in n}
    text = {n: r for n, r in shapes.items() if "language_model" in n}
    assert len(vision) == 2 * 6  # 2 layers x (q, k, v, out, fc1, fc2)
    assert len(projector) == 2
    assert len(text) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert set(vision.values()) == set(projector.values()) == {(4, 4)}
    assert set(text.values()) == {(12, 12)}
    assert len(shapes) == len(vision) + len(projector) + len(text)  # nothing else (no lm_head)
    # Alpha follows each side's rank: scaling = alpha / r = alpha_ratio on both sides.
    for name, mod in peft_model.named_modules():
        if name in shapes:
            assert mod.scaling["t1"] == pytest.approx(AdapterSpec().alpha_ratio)


def test_visual_rank_larger_than_text_rank(backbone) -> None:
    model, _ = backbone
    shapes = lora_shapes(add_adapter(model, "t1", AdapterSpec(visual_rank=16, text_rank=2)), "t1")
    assert {r for n, r in shapes.items() if "language_model" not in n} == {(16, 16)}
    assert {r for n, r in shapes.items() if "language_model" in n} == {(2, 2)}


def test_visual_rank_zero_leaves_vision_side_alone(backbone) -> None:
    model, _ = backbone
    peft_model = add_adapter(model, "t1", AdapterSpec(visual_rank=0, text_rank=4))
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert names and all("language_model" in n for n in names)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)


def test_text_rank_zero_leaves_language_model_alone(backbone) -> None:
    model, _ = backbone
    shapes = lora_shapes(add_adapter(model, "t1", AdapterSpec(visual_rank=4, text_rank=0)), "t1")
    assert shapes and not any("language_model" in n for n in shapes)
    assert set(shapes.values()) == {(4, 4)}


@pytest.mark.parametrize(
    ("layers", "feature_layer", "used"),
    [(2, -1, 2), (2, -2, 1), (24, -2, 23), (4, 3, 3), (4, [-2, -3], 3)],
)
def test_used_vision_layers(layers: int, feature_layer, used: int) -> None:
    config = SimpleNamespace(model_type="llava", vision_config=SimpleNamespace(num_hidden_layers=layers),
                             vision_feature_layer=feature_layer)
    assert used_vision_layers(config) == used


def test_used_vision_layers_mixed_sign_list() -> None:
    config = SimpleNamespace(model_type="llava", vision_config=SimpleNamespace(num_hidden_layers=4),
                             vision_feature_layer=[1, -2])
    assert used_vision_layers(config) == 3


def test_feature_layer_minus_two_puts_no_lora_on_last_vision_layer(backbone) -> None:
    model, _ = backbone
    # LLaVA's usual choice: the last layer never reaches the LM.
    model.config.vision_feature_layer = -2
    shapes = lora_shapes(add_adapter(model, "t1", AdapterSpec(visual_rank=4, text_rank=4)), "t1")
    assert any(".encoder.layers.0." in n for n in shapes)
    assert not any(".encoder.layers.1." in n for n in shapes)
    assert any("multi_modal_projector" in n for n in shapes)
    cfg = lora_config(AdapterSpec(), model)
    assert "layers\\.(0)\\." in cfg.target_modules


def test_saved_adapter_loads_with_plain_peft_and_gives_same_logits(
    backbone, test_spec, backbone_dir, batch, tmp_path: Path
) -> None:
    model, _ = backbone
    peft_model = add_adapter(model, "task_a", AdapterSpec(visual_rank=4, text_rank=8))
    randomise_lora_b(peft_model)
    peft_model.eval()
    dest = save_adapter(peft_model, "task_a", tmp_path / "adapters" / "task_a")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in dest.iterdir()}
    assert [p.name for p in dest.parent.iterdir()] == ["task_a"]  # no temp dir left beside it

    fresh, _ = load_backbone(test_spec, backbone_dir)
    with torch.no_grad():
        base = fresh(**batch).logits
    loaded = PeftModel.from_pretrained(fresh, str(dest))  # plain PEFT, default adapter name
    loaded.eval()
    assert lora_shapes(loaded, "default") == lora_shapes(peft_model, "task_a")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = loaded(**batch).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter really changes outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_adapter_under_a_name(backbone, test_spec, backbone_dir, tmp_path: Path) -> None:
    model, _ = backbone
    peft_model = add_adapter(model, "task_a", AdapterSpec(visual_rank=2, text_rank=4))
    randomise_lora_b(peft_model)
    saved = save_adapter(peft_model, "task_a", tmp_path / "a")
    fresh, _ = load_backbone(test_spec, backbone_dir)
    frozen = load_adapter(fresh, saved, "colour")
    assert trainable_parameters(frozen) == []
    fresh2, _ = load_backbone(test_spec, backbone_dir)
    trainable = load_adapter(fresh2, saved, "colour", trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".colour." in n and "lora_" in n for n in names)
    ref = dict(peft_model.named_parameters())
    for n, p in trainable.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ref[n.replace(".colour.", ".task_a.")])


def test_save_adapter_replaces_existing_dir(backbone, tmp_path: Path) -> None:
    model, _ = backbone
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"old")
    (dest / "adapter_config.json").write_text("{}")
    peft_model = add_adapter(model, "t1", AdapterSpec(visual_rank=0, text_rank=3))
    save_adapter(peft_model, "t1", dest)
    assert not (dest / "stale.bin").exists()
    assert json.loads((dest / "adapter_config.json").read_text())["r"] == 3
    # Saving again (a new version) swaps the whole dir and leaves no temp or .old dir around.
    save_adapter(peft_model, "t1", dest)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_second_adapter_is_added_next_to_the_first(backbone) -> None:
    model, _ = backbone
    first = add_adapter(model, "t1", AdapterSpec(visual_rank=2, text_rank=2))
    second = add_adapter(first, "t2", AdapterSpec(visual_rank=0, text_rank=6))
    assert second is first
    assert second.active_adapter == "t2"
    trainable = [n for n, p in second.named_parameters() if p.requires_grad]
    assert trainable and all(".t2." in n for n in trainable)
    assert set(lora_shapes(second, "t2").values()) == {(6, 6)}
    assert lora_shapes(second, "t1")  # the first adapter is still there


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden"])
def test_invalid_adapter_names_refused(backbone, tmp_path: Path, bad: str) -> None:
    model, _ = backbone
    with pytest.raises(ValueError, match="invalid adapter name"):
        add_adapter(model, bad, AdapterSpec())
    with pytest.raises(ValueError, match="invalid adapter name"):
        load_adapter(model, tmp_path, bad)
    assert not any("lora_" in n for n, _ in model.named_parameters())
