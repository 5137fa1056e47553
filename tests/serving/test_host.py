"""AdapterHost: registry versions served from one backbone, promotion and rollback live, LRU, `auto`."""

from __future__ import annotations

import pytest
import torch
from lora_helper import trained_adapter
from peft import PeftModel

from strata.backbone.features import pooled_features
from strata.backbone.load import load_backbone
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.registry import Ref, Registry, RegistryError, backbone_info
from strata.serving.host import AdapterHost, Request, UnknownAdapter
from strata.strategies.decoupled import ROUTER_FILE, PrototypeRouter


@pytest.fixture(scope="module")
def rows():
    """Test rows of two built-in tasks, as they arrive from a client."""
    return {t: generate_task(t, 0, n_train=0, n_val=0, n_test=4).to_pylist() for t in ("colour", "shape")}


@pytest.fixture(scope="module")
def registry(test_spec, backbone_dir, tmp_path_factory, rows):
    """default/seqlora v1 (production) and v2 (candidate); default/colour and default/shape with prototypes."""
    tmp = tmp_path_factory.mktemp("host")
    model, processor = load_backbone(test_spec, backbone_dir)
    info = backbone_info(test_spec.source, backbone_dir, model)
    reg = Registry(str(tmp / "registry"))
    for v in (1, 2):
        src, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp / f"s{v}", seed=v)
        reg.push(Ref("default", "seqlora", v), src, {"strategy": "seqlora"}, info)
    reg.promote(Ref("default", "seqlora", 1))
    for seed, task in enumerate(("colour", "shape")):
        src, _ = trained_adapter(load_backbone(test_spec, backbone_dir), tmp / task, seed=10 + seed)
        router = PrototypeRouter()
        train = generate_task(task, 1, n_train=256, n_val=0, n_test=0)
        router.add(task, pooled_features(model, processor, encode_table(processor, train, with_answers=False)))
        router.save(str(tmp / f"proto-{task}"))
        ref = Ref("default", task, 1)
        reg.push(ref, src, {"strategy": "decoupled"}, info, side={ROUTER_FILE: tmp / f"proto-{task}" / ROUTER_FILE})
        reg.promote(ref)
    return reg


def request(row: dict, model: str, max_tokens: int = 8) -> Request:
    return Request(model, row["prompt"], row["image"], max_tokens=max_tokens)


@torch.no_grad()
def offline(reg: Registry, ref: Ref, row: dict, test_spec, backbone_dir, tmp_path, max_tokens: int = 8) -> list[int]:
    """Greedy tokens from plain PEFT on a fresh backbone: what serving must reproduce."""
    model, processor = load_backbone(test_spec, backbone_dir)
    peft = PeftModel.from_pretrained(model, str(reg.fetch(ref, tmp_path / f"{ref.adapter}-v{ref.version}")))
    enc = encode_table(processor, generate_task("colour", 0, 0, 0, 0).schema.empty_table().from_pylist([row]),
                       with_answers=False)
    batch = collate(enc, processor.tokenizer.pad_token_id, left_pad=True)
    batch.pop("labels")
    tok = processor.tokenizer
    out = peft.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id)[0, batch["input_ids"].shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def test_answers_match_offline_peft_and_follow_promotion_and_rollback(registry, rows, test_spec, backbone_dir, tmp_path):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    row = rows["colour"][0]
    first = host.complete([request(row, "default/seqlora")])[0]
    assert first.model == "default/seqlora@v1"
    assert first.tokens == offline(registry, Ref("default", "seqlora", 1), row, test_spec, backbone_dir, tmp_path)
    registry.promote(Ref("default", "seqlora", 2))
    second = host.complete([request(row, "seqlora")])[0]  # bare adapter: the default stream
    assert second.model == "default/seqlora@v2"
    assert second.tokens == offline(registry, Ref("default", "seqlora", 2), row, test_spec, backbone_dir, tmp_path)
    registry.rollback("default", "seqlora")
    assert host.complete([request(row, "default/seqlora")])[0].model == "default/seqlora@v1"
    assert host.complete([request(row, "default/seqlora@v2")])[0].tokens == second.tokens  # pinned version


def test_a_mixed_batch_larger_than_the_lru_matches_one_by_one(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=2)
    models = ["default/seqlora@v1", "default/seqlora@v2", "default/colour", "default/shape"] * 2
    batch = [request(rows["colour"][i % 4], m, max_tokens=3 + i % 3) for i, m in enumerate(models)]
    together = host.complete(batch)
    alone = [host.complete([r])[0] for r in batch]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert all(len(c.tokens) <= r.max_tokens for c, r in zip(together, batch))
    assert sum(host.stats.evictions.values()) > 0 and len(host.resident) == 2


def test_auto_routes_with_the_decoupled_prototypes(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec)
    got = host.complete([request(r, "default/auto") for t in ("colour", "shape") for r in rows[t]])
    assert [c.model for c in got] == ["default/colour@v1"] * 4 + ["default/shape@v1"] * 4


def test_unknown_and_invalid_ids_are_refused(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=1)
    row = rows["colour"][0]
    for bad, error, message in [("default/nope", UnknownAdapter, "no adapter default/nope"),
                                ("default/seqlora@v9", UnknownAdapter, "no version v9 of default/seqlora"),
                                ("../../etc/passwd", RegistryError, "invalid adapter id"),
                                ("other/seqlora", UnknownAdapter, "no adapter other/seqlora")]:
        with pytest.raises(error, match=message):
            host.complete([request(row, bad)])
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        AdapterHost(registry.uri, test_spec, capacity=0)
