"""Backbone families: every supported architecture is recognised, and each side's adapters land only
on that side (tiny random models built from config, one per family)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from family_models import CONFIGS, tiny_model

from strata.adapters.lora import add_adapter
from strata.adapters.placement import select
from strata.backbone.families import UnsupportedBackbone, family_of, supported_types
from strata.config import AdapterSpec

# model type -> (vision linears per layer x layers that feed the LM, projector linears); every LM has
# 3 layers of 7 linears.
EXPECTED = {
    "llava": (6 * 1, 2),  # CLIP read at layer -2: 1 of its 2 layers feeds the LM
    "qwen2_vl": (4 * 2, 2),  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2; the merger's mlp.0 and mlp.2
    "qwen2_5_vl": (5 * 2, 2),  # attn.qkv, attn.proj and the gate/up/down_proj the LM also has
    "qwen3_vl": (4 * 2, 4),  # the merger and one deepstack merger, two linears each
    "llava_onevision": (6 * 2, 2),
    "idefics3": (6 * 2, 1),
    "smolvlm": (6 * 2, 1),
    "gemma3": (6 * 2, 0),  # the projector is a bare matrix
    "internvl": (6 * 2, 2),  # attention.{q,k,v}_proj, attention.projection_layer, mlp.fc1, mlp.fc2
}
LM_LINEARS = 3 * 7


def test_every_family_has_a_tiny_model_here() -> None:
    assert sorted(CONFIGS) == supported_types() == sorted(EXPECTED)


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_each_side_lands_only_on_its_tower(model_type: str) -> None:
    model = tiny_model(model_type)
    family = family_of(model.config)
    vision = select(AdapterSpec(placement="vision_only"), model)
    text = select(AdapterSpec(placement="language_only"), model)
    both = select(AdapterSpec(placement="all"), model)
    linears, projector = EXPECTED[model_type]
    assert all(family.is_vision(n) for n in vision) and not any(family.is_vision(n) for n in text)
    assert len(vision) == linears + projector and len(text) == LM_LINEARS
    assert both == {**vision, **text}
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in both)  # never Qwen2-VL's Conv3d `proj`
    # The same through PEFT: a language_only LoRA puts no weight on the vision side, and vice versa.
    add_adapter(model, "text", AdapterSpec(placement="language_only"))
    lora = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if ".lora_A" in n}
    assert lora == set(text)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "idefics3"])
def test_vision_only_lora_through_peft(model_type: str) -> None:
    """Qwen2.5-VL's vision MLP shares gate/up/down_proj with its LM; Idefics3's LM is `text_model`."""
    model = tiny_model(model_type)
    add_adapter(model, "vision", AdapterSpec(placement="vision_only"))
    lora = [n for n, _ in model.named_parameters() if ".lora_A" in n]
    family = family_of(model.config)
    assert lora and all(family.is_vision(n.removeprefix("base_model.model.")) for n in lora)


def test_top_half_counts_layers_of_each_tower() -> None:
    model = tiny_model("qwen2_vl")
    names = select(AdapterSpec(placement="top_half"), model)
    assert {n.split(".blocks.")[1].split(".")[0] for n in names if ".blocks." in n} == {"1"}
    assert {n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n} == {"1", "2"}
    assert any(".merger." in n for n in names)  # the projector is the vision side's output end


def test_unsupported_architecture_is_refused_with_the_supported_list() -> None:
    with pytest.raises(UnsupportedBackbone, match=r"'blip-2' .* supported model types: gemma3, idefics3, internvl"):
        family_of(SimpleNamespace(model_type="blip-2"))
