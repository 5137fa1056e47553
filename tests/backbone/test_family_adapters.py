"""Every adapter kind at every placement it allows, on each family Strata trains: it attaches to the
side the placement names, one optimizer step moves only its own parameters, and the loss is finite."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from family_models import save_checkpoint

from strata.adapters.lora import add_adapter
from strata.adapters.placement import COMPATIBLE
from strata.backbone.families import family_of
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, BackboneSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table

FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "internvl")
CASES = [(kind, placement) for kind, placements in COMPATIBLE.items() for placement in placements]
SIDES = {"vision_only": {"vision"}, "language_only": {"language"}}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    save_checkpoint(request.param, path)
    return path


@pytest.fixture(scope="module")
def batch(checkpoint) -> dict[str, torch.Tensor]:
    _, processor = load_backbone(BackboneSpec(str(checkpoint)), checkpoint)
    table = generate_task("colour", 0, n_train=4, n_val=0, n_test=0)
    return collate(encode_table(processor, table.filter(pc.equal(table["split"], "train")), with_answers=True),
                   processor.tokenizer.pad_token_id)


@pytest.mark.parametrize(("kind", "placement"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_each_kind_and_placement_trains_on_its_own_side(checkpoint, batch, kind: str, placement: str) -> None:
    model, _ = load_backbone(BackboneSpec(str(checkpoint)), checkpoint)
    family = family_of(model.config)
    if kind in family.refused_kinds:  # refused by name, with the reason, before anything is attached
        with pytest.raises(ValueError, match=f"{kind!r} does not work on the {family.name} family"):
            add_adapter(model, "task", AdapterSpec(kind=kind, placement=placement))
        return
    model = add_adapter(model, "task", AdapterSpec(kind=kind, placement=placement, visual_rank=4, text_rank=4))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params, f"{kind}/{placement} trains nothing on {family.name}"
    sides = {"vision" if family.is_vision(n) else "language" for n in params}
    assert sides <= SIDES.get(placement, {"vision", "language"}), sorted(params)[:5]
    before = {n: p.detach().clone() for n, p in params.items()}
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(list(params.values()), lr=1.0).step()
    moved = [n for n, p in params.items() if not torch.equal(p, before[n])]
    assert moved, f"no parameter of {kind}/{placement} moved on {family.name}"
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    assert all(p.grad is None for p in frozen.values())  # the backbone stays frozen
