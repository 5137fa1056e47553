"""The frozen backbone: fully frozen, cached, same weights by name or by dir, stable fingerprint."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from strata.adapters.lora import add_adapter
from strata.backbone.features import FEATURE_PARTS, pooled_features
from strata.backbone.load import fingerprint, load_backbone, resolve
from strata.backbone.tiny import ensure_builtin
from strata.config import AdapterSpec, BackboneSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table


def test_every_parameter_is_frozen_and_model_in_eval(backbone) -> None:
    model, _ = backbone
    names = [n for n, _ in model.named_parameters()]
    assert any("multi_modal_projector" in n for n in names)  # the projector is part of the check
    assert any("vision_tower" in n for n in names) and any("language_model" in n for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert not model.training
    assert all(not m.training for m in model.modules())


def test_ensure_builtin_second_call_is_cached(backbone_dir: Path) -> None:
    started = time.perf_counter()
    again = ensure_builtin("builtin:test")
    assert time.perf_counter() - started < 1.0
    assert again == backbone_dir
    assert (again / "strata_recipe.json").exists()
    assert resolve(BackboneSpec("builtin:test")) == backbone_dir
    assert resolve(BackboneSpec(str(backbone_dir))) == backbone_dir


def test_local_dir_spec_loads_the_same_weights_as_builtin(backbone) -> None:
    by_dir, _ = backbone
    by_name, processor = load_backbone(BackboneSpec("builtin:test"))
    a, b = by_dir.state_dict(), by_name.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert processor.tokenizer.padding_side == "left"


def test_fingerprint_is_stable_and_content_based(backbone_dir: Path, tmp_path: Path) -> None:
    fp = fingerprint(backbone_dir)
    assert fp == fingerprint(backbone_dir)
    assert len(fp) == 16
    copy = Path(shutil.copytree(backbone_dir, tmp_path / "copy"))
    assert fingerprint(copy) == fp  # content, not location
    (copy / "strata_recipe.json").write_text("{}")  # build metadata is not part of the weights
    assert fingerprint(copy) == fp
    config = copy / "config.json"
    config.write_text(config.read_text().replace("{", '{"_edited": 1,', 1))
    assert fingerprint(copy) != fp


@pytest.fixture(scope="module")
def rows():
    return generate_task("colour", 0, n_train=5, n_val=0, n_test=0)


def test_pooled_features_shape_and_unit_norm_parts(backbone, rows) -> None:
    model, processor = backbone
    enc = encode_table(processor, rows, with_answers=False)
    feats = pooled_features(model, processor, enc)
    hidden = model.config.text_config.hidden_size
    assert feats.shape == (5, FEATURE_PARTS * hidden)
    for part in feats.split(hidden, dim=1):  # image, text in context, text alone
        torch.testing.assert_close(part.norm(dim=-1), torch.ones(5))
    # Batching only changes how rows are grouped, not the features.
    torch.testing.assert_close(pooled_features(model, processor, enc, batch_size=2), feats)
    # Answer tokens are left out: rows encoded with answers (the gate's anchor) route like prompts.
    torch.testing.assert_close(pooled_features(model, processor, encode_table(processor, rows, with_answers=True)),
                               feats)


def test_the_text_alone_part_reads_the_words_not_the_image(backbone) -> None:
    model, processor = backbone
    rows = generate_task("count", 0, n_train=6, n_val=0, n_test=0)
    prompts = rows.column("prompt").to_pylist()
    same = rows.set_column(rows.column_names.index("prompt"), "prompt", pa.array([prompts[0]] * 6))
    feats = pooled_features(model, processor, encode_table(processor, same, with_answers=False))
    image, in_context, alone = feats.split(model.config.text_config.hidden_size, dim=1)
    assert not torch.allclose(image[0], image[1])  # different pictures...
    assert not torch.allclose(in_context[0], in_context[1])  # ...seen by the question's states in context
    torch.testing.assert_close(alone, alone[:1].expand_as(alone), atol=1e-5, rtol=0)  # one prompt, one feature


def test_pooled_features_ignore_adapters(backbone, rows) -> None:
    model, processor = backbone
    enc = encode_table(processor, rows, with_answers=False)
    before = pooled_features(model, processor, enc)
    peft_model = add_adapter(model, "task_a", AdapterSpec(visual_rank=4, text_rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # make the adapter change the model's outputs
    enc_batch = encode_table(processor, rows.slice(0, 2), with_answers=False)
    batch = collate(enc_batch, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        with_adapter = peft_model(**batch).logits
        with peft_model.disable_adapter():
            without = peft_model(**batch).logits
    assert not torch.allclose(with_adapter, without, atol=1e-3)  # the adapter is not a no-op
    after = pooled_features(peft_model, processor, enc)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
