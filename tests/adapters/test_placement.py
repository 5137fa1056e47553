"""Placement: which layers each placement picks, the published kind x placement table and its refusals,
and per-layer (adaptive) ranks through PEFT's rank_pattern and as bottleneck widths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from strata.adapters import custom
from strata.adapters.lora import add_adapter, lora_config, save_adapter
from strata.adapters.placement import (
    COMPATIBLE,
    check,
    compatibility_markdown,
    layer_plan,
    select,
    tower_layers,
)
from strata.backbone.load import load_backbone
from strata.config import ADAPTER_KINDS, PLACEMENTS, AdapterSpec

VISION = "model.vision_tower.encoder.layers"
TEXT = "model.language_model.layers"


def lora_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Backbone module name -> LoRA rank of the active adapter, with alpha/r checked on the way."""
    out = {}
    for name, mod in model.get_base_model().named_modules():
        for key, a in getattr(mod, "lora_A", {}).items():
            out[name] = a.out_features
            assert mod.scaling[key] == pytest.approx(AdapterSpec().alpha_ratio)  # alpha follows every rank
    return out


def config(vision_layers: int = 4, feature_layer: int = -2, text_layers: int = 5) -> SimpleNamespace:
    return SimpleNamespace(model_type="llava", vision_config=SimpleNamespace(num_hidden_layers=vision_layers),
                           vision_feature_layer=feature_layer,
                           text_config=SimpleNamespace(num_hidden_layers=text_layers))


@pytest.mark.parametrize(("placement", "n", "expected"), [
    ("all", 3, (0, 1, 2)),
    ("vision_only", 2, (0, 1)),
    ("language_only", 1, (0,)),
    ("top_half", 1, (0,)),
    ("top_half", 4, (2, 3)),
    ("top_half", 5, (2, 3, 4)),  # odd: the middle layer is in both halves
    ("bottom_half", 1, (0,)),
    ("bottom_half", 4, (0, 1)),
    ("bottom_half", 5, (0, 1, 2)),
    ("every_other", 1, (0,)),
    ("every_other", 5, (0, 2, 4)),
    ("every_other", 6, (0, 2, 4)),
])
def test_tower_layers(placement: str, n: int, expected: tuple[int, ...]) -> None:
    assert tower_layers(placement, n) == expected


def test_tower_layers_refuses_unknown_placement() -> None:
    with pytest.raises(ValueError, match="placement must be one of"):
        tower_layers("middle", 4)


@pytest.mark.parametrize(("placement", "expected"), [
    ("all", ((0, 1, 2), True, (0, 1, 2, 3, 4))),  # vision layer 3 never reaches the LM (feature layer -2)
    ("top_half", ((1, 2), True, (2, 3, 4))),
    ("bottom_half", ((0, 1), False, (0, 1, 2))),
    ("every_other", ((0, 2), False, (0, 2, 4))),
    ("vision_only", ((0, 1, 2), True, ())),
    ("language_only", ((), False, (0, 1, 2, 3, 4))),
])
def test_layer_plan_per_tower(placement: str, expected) -> None:
    assert layer_plan(AdapterSpec(placement=placement), config()) == expected


def test_rank_zero_side_is_left_out() -> None:
    assert layer_plan(AdapterSpec(visual_rank=0, text_rank=4), config()) == ((), False, (0, 1, 2, 3, 4))
    assert layer_plan(AdapterSpec(visual_rank=4, text_rank=0, placement="top_half"), config()) == ((1, 2), True, ())


@pytest.mark.parametrize(("placement", "visual", "text"), [("vision_only", 0, 4), ("language_only", 4, 0)])
def test_placement_that_selects_nothing_is_refused(placement: str, visual: int, text: int) -> None:
    with pytest.raises(ValueError, match="selects no layer"):
        check(AdapterSpec(placement=placement, visual_rank=visual, text_rank=text), config())


def test_published_table_covers_every_kind_and_renders() -> None:
    assert set(COMPATIBLE) == set(ADAPTER_KINDS)
    assert all(set(allowed) <= set(PLACEMENTS) for allowed in COMPATIBLE.values())
    assert COMPATIBLE["lora"] == COMPATIBLE["dora"] == COMPATIBLE["bottleneck"] == PLACEMENTS
    md = compatibility_markdown()
    lines = md.splitlines()
    assert lines[0] == "| kind | " + " | ".join(PLACEMENTS) + " |"
    assert "| bitfit | no | no | no | no | yes | no |" in lines
    assert "| prefix | no | no | no | no | no | yes |" in lines
    assert "| lora | yes | yes | yes | yes | yes | yes |" in lines
    assert "Llama linear layers have no biases" in md


REFUSED = [(k, p) for k in ADAPTER_KINDS for p in PLACEMENTS if p not in COMPATIBLE[k]]


@pytest.mark.parametrize(("kind", "placement"), REFUSED)
def test_every_combination_outside_the_table_is_refused(kind: str, placement: str) -> None:
    hint = {"bitfit": "Llama linear layers have no biases.*use vision_only", "prefix": "use language_only"}[kind]
    with pytest.raises(ValueError, match=rf"kind '{kind}' does not support placement '{placement}'.*{hint}"):
        check(AdapterSpec(kind=kind, placement=placement), config())


def test_refused_on_the_model_too_and_nothing_is_attached(backbone) -> None:
    model, _ = backbone
    with pytest.raises(ValueError, match="Llama linear layers have no biases"):
        add_adapter(model, "t1", AdapterSpec(kind="bitfit", placement="all"))
    assert not custom.layers(model)


@pytest.mark.parametrize("kind", ["prefix", "bitfit"])
def test_layer_ranks_refused_for_kinds_without_a_rank(kind: str) -> None:
    spec = AdapterSpec(kind=kind, placement=COMPATIBLE[kind][0], layer_ranks={"fc1": 2})
    with pytest.raises(ValueError, match=f"'{kind}' has no per-layer rank"):
        check(spec, config())


def test_bitfit_refused_where_the_selected_linears_have_no_bias(backbone) -> None:
    model, _ = backbone
    spec = AdapterSpec(kind="bitfit", placement="vision_only")
    check(spec, model)  # CLIP and the projector have biases
    for name in select(spec, model):
        model.get_submodule(name).bias = None  # a vision tower built without biases
    with pytest.raises(ValueError, match="none of the selected linear layers .* has a bias"):
        check(spec, model)


def test_unsupported_model_refused() -> None:
    with pytest.raises(ValueError, match="unsupported backbone architecture None .* supported model types: .*llava"):
        check(AdapterSpec(), torch.nn.Linear(2, 2))


def test_unmatched_layer_rank_regex_is_an_error(backbone) -> None:
    model, _ = backbone
    spec = AdapterSpec(placement="language_only", layer_ranks={r"vision_tower\..*": 2})  # vision is not placed
    with pytest.raises(ValueError, match=r"layer_ranks key 'vision_tower\\\\\.\.\*' matches none of the 14 modules"):
        add_adapter(model, "t1", spec)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_layer_ranks_give_per_layer_lora_ranks(backbone, test_spec, backbone_dir, tmp_path: Path) -> None:
    model, _ = backbone
    spec = AdapterSpec(visual_rank=4, text_rank=6, layer_ranks={
        r"layers\.1\.self_attn\.q_proj": 3,  # first match wins: beats the broader key below
        r"language_model\.layers\.1\..*": 12,
        r"mlp\.fc1": 2,
    })
    peft_model = add_adapter(model, "t1", spec)
    ranks = lora_ranks(peft_model)
    assert ranks == select(spec, peft_model)
    assert ranks[f"{TEXT}.1.self_attn.q_proj"] == 3
    assert ranks[f"{VISION}.1.self_attn.q_proj"] == 3  # the key has no tower in it, so both towers match
    assert {ranks[f"{TEXT}.1.{m}"] for m in ("self_attn.k_proj", "mlp.down_proj")} == {12}
    assert {ranks[f"{VISION}.{i}.mlp.fc1"] for i in (0, 1)} == {2}
    assert ranks[f"{TEXT}.0.mlp.down_proj"] == 6 and ranks[f"{VISION}.0.mlp.fc2"] == 4
    assert ranks["model.multi_modal_projector.linear_1"] == 4
    # The ranks are in the saved config, so plain PEFT rebuilds the same shapes.
    dest = save_adapter(peft_model, "t1", tmp_path / "t1")
    plain = PeftModel.from_pretrained(load_backbone(test_spec, backbone_dir)[0], str(dest))
    assert lora_ranks(plain) == ranks


def test_layer_ranks_for_dora(backbone) -> None:
    model, _ = backbone
    spec = AdapterSpec(kind="dora", placement="top_half", layer_ranks={r".*down_proj": 10})
    ranks = lora_ranks(add_adapter(model, "t1", spec))
    assert ranks[f"{TEXT}.1.mlp.down_proj"] == 10 and ranks[f"{TEXT}.1.mlp.up_proj"] == 8
    assert not any(".0." in n and "language_model" in n for n in ranks)  # top half only


def test_layer_ranks_give_bottleneck_widths(backbone) -> None:
    model, _ = backbone
    spec = AdapterSpec(kind="bottleneck", visual_rank=4, text_rank=6,
                       layer_ranks={r"language_model\.layers\.0\.mlp": 3})
    add_adapter(model, "t1", spec)
    widths = {n: layer.down.out_features for n, layer in custom.layers(model).items()}
    assert widths == {f"{VISION}.0.mlp": 4, f"{VISION}.1.mlp": 4, "model.multi_modal_projector": 4,
                      f"{TEXT}.0.mlp": 3, f"{TEXT}.1.mlp": 6}


def test_lora_config_refuses_other_kinds(backbone) -> None:
    with pytest.raises(ValueError, match="not 'bottleneck'"):
        lora_config(AdapterSpec(kind="bottleneck"), backbone[0])
