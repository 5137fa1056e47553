"""Served conversations beyond one image: text-only turns, several images, plain prompts, in one mixed batch.

Each family's rows of 0, 1 or 2 images (where the family takes several), with different adapters
per row, must decode in one batch exactly as each row decodes alone with its PEFT adapter.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from family_models import save_checkpoint
from PIL import Image

from strata.adapters.lora import add_adapter
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, BackboneSpec
from strata.data.collate import Conversation, collate, encode_conversations, several_images
from strata.serving.host import AdapterHost
from strata.serving.mixed_lora import MixedLoRA


def png(size: tuple[int, int], rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


RED, BLUE = png((48, 48), (200, 30, 30)), png((64, 32), (30, 30, 200))


def two_adapters(model):
    torch.manual_seed(0)
    for name in ("a", "b"):
        model = add_adapter(model, name, AdapterSpec(visual_rank=4, text_rank=2))
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.data.normal_(0, 0.5)  # PEFT starts B at zero: give each adapter a real, distinct update
    return model


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "internvl", "gemma3", "idefics3"])
def test_rows_of_zero_one_or_two_images_batch_as_they_decode_alone(model_type: str, tmp_path: Path,
                                                                     request) -> None:
    if model_type == "llava":  # the built-in test backbone
        path = request.getfixturevalue("backbone_dir")
    else:
        save_checkpoint(model_type, path := tmp_path)
    model, processor = load_backbone(BackboneSpec(str(path)), path)
    model = two_adapters(model)
    convs = [Conversation("What colour is it?", (RED,)),
             Conversation("Say something.", ()),
             Conversation("And now?", (BLUE,), history=(("What colour is it?", "red"),), image_turns=(0, 1)),
             Conversation("Once upon a time", raw=True)]
    adapters = ["a", "b", None, "b"]
    if several_images(processor):
        convs.append(Conversation("Which is bigger?", (RED, BLUE)))
        adapters.append("a")
    enc = encode_conversations(processor, convs)
    assert [len(x) for x in enc.images["pixel_values"] if x is not None]  # image rows kept their tensors
    assert sum(x is None for x in enc.images["pixel_values"]) == 2  # the text-only and the plain prompt
    tok = processor.tokenizer
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    batch = collate(enc, tok.pad_token_id, left_pad=True)
    batch.pop("labels")
    with MixedLoRA(model).select(adapters, AdapterHost._vision_rows(enc)) as mixed:
        together = mixed.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for i, name in enumerate(adapters):
        row = collate(enc.select([i]), tok.pad_token_id, left_pad=True)
        row.pop("labels")
        if name is None:
            with model.disable_adapter():
                alone = model.generate(**row, **kw)
        else:
            model.set_adapter(name)
            alone = model.generate(**row, **kw)
        want = alone[0, row["input_ids"].shape[1]:].tolist()
        assert together[i].tolist()[: len(want)] == want, (model_type, i)  # then padding, if it ended early


def test_a_family_that_takes_one_image_per_row_refuses_two_by_name(tmp_path: Path) -> None:
    save_checkpoint("idefics3", tmp_path)
    _, processor = load_backbone(BackboneSpec(str(tmp_path)), tmp_path)
    assert not several_images(processor)
    with pytest.raises(ValueError, match="one image per row for this family"):
        encode_conversations(processor, [Conversation("Which is bigger?", (RED, BLUE))])
