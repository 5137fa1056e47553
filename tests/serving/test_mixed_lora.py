"""Mixed-adapter batches: one gathered LoRA forward equals PEFT row by row, in logits and in greedy tokens."""

from __future__ import annotations

import pytest
import torch
from lora_helper import trained_adapter

from strata.adapters.lora import load_adapter
from strata.backbone.load import load_backbone
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.serving.mixed_lora import MixedLoRA

ROWS = ["a", "b", None, "c", "a", "b"]


@pytest.fixture(scope="module")
def served(test_spec, backbone_dir, tmp_path_factory):
    """One backbone holding three LoRA adapters of different ranks, and six encoded rows."""
    tmp = tmp_path_factory.mktemp("mixed")
    model, processor = load_backbone(test_spec, backbone_dir)
    for seed, (name, ranks) in enumerate({"a": (2, 4), "b": (4, 8), "c": (0, 2)}.items()):
        src, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp / name, seed=seed, ranks=ranks)
        model = load_adapter(model, src, name)
    table = generate_task("colour", 0, n_train=0, n_val=0, n_test=len(ROWS))
    enc = encode_table(processor, table, with_answers=True)
    return model, processor, enc


def one_by_one(model, batch: dict, adapters: list[str | None]) -> torch.Tensor:
    """Logits with PEFT, each row alone with its own adapter active."""
    out = []
    for i, name in enumerate(adapters):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        if name is None:
            with model.disable_adapter():
                out.append(model(**row).logits)
        else:
            model.set_adapter(name)
            out.append(model(**row).logits)
    return torch.cat(out)


@torch.no_grad()
def test_mixed_logits_equal_peft_row_by_row_and_peft_adapter_names(served):
    model, processor, enc = served
    batch = collate(enc, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    mixed = MixedLoRA(model)
    with mixed.select(ROWS) as m:
        got = m(**batch).logits
    want = one_by_one(model, batch, ROWS)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    peft_mixed = model(**batch, adapter_names=[n or "__base__" for n in ROWS]).logits
    assert torch.allclose(got, peft_mixed, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the adapters really differ


@torch.no_grad()
def test_mixed_greedy_generation_matches_one_by_one_tokens(served):
    model, processor, enc = served
    tok = processor.tokenizer
    batch = collate(enc, tok.pad_token_id, left_pad=True)
    batch.pop("labels")
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    with MixedLoRA(model).select(ROWS) as m:
        together = m.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for i, name in enumerate(ROWS):
        row = collate(enc.select([i]), tok.pad_token_id, left_pad=True)
        row.pop("labels")
        if name is None:
            with model.disable_adapter():
                alone = model.generate(**row, **kw)
        else:
            model.set_adapter(name)
            alone = model.generate(**row, **kw)
        alone = alone[0, row["input_ids"].shape[1]:]
        assert tok.decode(together[i], skip_special_tokens=True) == tok.decode(alone, skip_special_tokens=True), i


def test_unknown_adapters_and_wrong_batch_sizes_are_refused(served):
    model, processor, enc = served
    mixed = MixedLoRA(model)
    with pytest.raises(KeyError, match=r"adapters not loaded: \['zzz'\]"), mixed.select(["a", "zzz"]):
        pass
    batch = collate(enc, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    with pytest.raises(RuntimeError, match="a batch of 6 rows reached a LoRA layer, but 2 adapters"), \
            mixed.select(["a", "b"]) as m, torch.no_grad():
        m(**batch)
