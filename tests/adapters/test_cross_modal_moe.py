"""Cross-modality MoE adapter layers: top-k gating, identity at init, usage counts, freezing, and a
save/load round trip that gives the same logits and generations on the test backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from strata.adapters import cross_modal_moe as cma
from strata.adapters.custom import adapter_parameters, read_side, save_side
from strata.adapters.lora import trainable_parameters
from strata.backbone.load import load_backbone
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.generation import Generated, generate


@pytest.fixture(scope="module")
def enc(test_spec, backbone_dir):
    _, processor = load_backbone(test_spec, backbone_dir)
    return encode_table(processor, generate_task("colour", 0, n_train=6, n_val=1, n_test=1), with_answers=True)


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter weight (zero-initialised up-projections included) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_topk_gating_matches_a_dense_reference() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = cma.CrossModalMoE(base, dim=8, experts=5, top_k=2, hidden=4, joint=False)
    randomise(layer)
    x = torch.randn(3, 7, 8)  # (B, L, D)
    weights, idx = layer.route(base(x).reshape(-1, 8))
    assert weights.shape == idx.shape == (21, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(21))
    assert all(len(set(row)) == 2 for row in idx.tolist())  # k distinct experts per token
    logits = layer.gate(base(x).reshape(-1, 8))
    assert torch.equal(idx, logits.topk(2, dim=-1).indices)  # the k highest gate logits
    # Dense reference: every expert on every token, weighted by the softmax over the chosen k, 0 elsewhere.
    h = base(x).reshape(-1, 8)
    dense = torch.stack([e(h) for e in layer.experts], dim=1)  # (N, E, D)
    g = torch.zeros(21, 5).scatter(1, idx, weights)  # (N, E)
    expected = h + (g.unsqueeze(-1) * dense).sum(1)
    assert torch.allclose(layer(x).reshape(-1, 8), expected, atol=1e-6)


def test_every_expert_gets_a_gradient_even_when_no_token_chose_it() -> None:
    # DDP without find_unused_parameters needs a gradient for every trainable parameter each step.
    layer = cma.CrossModalMoE(nn.Linear(4, 4).requires_grad_(False), dim=4, experts=6, top_k=1, hidden=3,
                              joint=False)
    layer(torch.randn(1, 1, 4)).sum().backward()  # one token: one expert chosen, five not
    grads = [e.up.weight.grad for e in layer.experts]
    assert all(g is not None for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) == 1


def test_bad_top_k_and_block_count_are_refused(backbone) -> None:
    with pytest.raises(ValueError, match="top_k"):
        cma.CrossModalMoE(nn.Linear(4, 4), dim=4, experts=2, top_k=3, hidden=2, joint=False)
    model, _ = backbone
    with pytest.raises(ValueError, match="blocks must be in"):
        cma.attach(model, blocks=99, experts=4, top_k=2, hidden=4)


def test_no_block_count_wraps_every_lm_block(backbone) -> None:
    model, _ = backbone
    n_layers = model.config.text_config.num_hidden_layers
    names = cma.attach(model, blocks=None, experts=4, top_k=2, hidden=4)
    assert names == [f"model.language_model.layers.{i}" for i in range(n_layers)]


def test_adapter_is_identity_at_init_and_wraps_the_last_blocks(backbone, enc) -> None:
    model, processor = backbone
    batch = collate(enc.select([0, 1, 2]), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch).logits
    n_layers = model.config.text_config.num_hidden_layers
    names = cma.attach(model, blocks=1, experts=4, top_k=2, hidden=4)
    assert names == [f"model.language_model.layers.{n_layers - 1}"]
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert cma.joint_head(model)[0] == f"{names[-1]}.joint"
    # Only the adapter trains; the backbone stays frozen.
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in adapter_parameters(model).values()}
    with pytest.raises(ValueError, match="already holds CMA layers"):
        cma.attach(model, blocks=1, experts=4, top_k=2, hidden=4)


def test_usage_counts_real_tokens_only_and_shares_sum_to_one(backbone, enc) -> None:
    model, processor = backbone
    cma.attach(model, blocks=2, experts=6, top_k=2, hidden=4)
    rows = enc.select([0, 1, 2, 3])
    rows.input_ids[0], rows.labels[0] = rows.input_ids[0][:-3], rows.labels[0][:-3]  # a shorter row
    batch = collate(rows, processor.tokenizer.pad_token_id)
    real = int(batch["attention_mask"].sum())
    assert real < batch["attention_mask"].numel()  # the batch has padding, which must not count
    model.train()
    model(**batch)
    cma.record_usage(model, batch["attention_mask"])
    for layer in cma.moe_layers(model).values():
        assert layer.counts.sum().item() == 2 * real  # k selections per real token
        assert cma.shares(layer.counts).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no recorded choices"):  # each forward counts once
        cma.record_usage(model, batch["attention_mask"])
    model.eval()
    model(**batch)  # evaluation and generation never count
    assert all(layer.last_choice is None for layer in cma.moe_layers(model).values())
    assert torch.allclose(cma.shares(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))
    assert cma.entropy(cma.shares(torch.ones(4))) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert cma.entropy(cma.shares(torch.tensor([0.0, 3.0, 0.0]))) == 0.0


def test_freeze_experts_takes_them_out_of_the_trainable_set(backbone) -> None:
    model, _ = backbone
    names = cma.attach(model, blocks=2, experts=4, top_k=2, hidden=4)
    masks = {names[0]: [True, False, False, True], names[1]: [False] * 4}
    assert cma.freeze_experts(model, masks) == 2
    layer = cma.moe_layers(model)[names[0]]
    trainable = {id(p) for p in trainable_parameters(model)}
    for e, frozen in enumerate(masks[names[0]]):
        params = list(layer.experts[e].parameters())
        assert all(p.requires_grad != frozen for p in params)
        assert all((id(p) in trainable) != frozen for p in params)
    assert layer.gate.weight.requires_grad  # the gate keeps learning
    with pytest.raises(ValueError, match="layers the model lacks"):
        cma.freeze_experts(model, {"nope": [True] * 4})
    with pytest.raises(ValueError, match="3 entries"):
        cma.freeze_experts(model, {names[0]: [True] * 3})


def test_save_load_round_trip_gives_identical_logits_and_generations(test_spec, backbone_dir, enc,
                                                                    tmp_path: Path) -> None:
    model, processor = load_backbone(test_spec, backbone_dir)
    cma.attach(model, blocks=2, experts=4, top_k=2, hidden=4)
    randomise(model)
    batch = collate(enc.select([0, 1, 2]), processor.tokenizer.pad_token_id)
    model.train()
    model(**batch)
    cma.record_usage(model, batch["attention_mask"])
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    answers = generate(model, processor, enc.select([0, 1]), max_new_tokens=4)

    cma.save(model, tmp_path / "cma")
    config, tensors = read_side(tmp_path / "cma")
    assert config["kind"] == "cma" and config["experts"] == 4 and config["top_k"] == 2
    assert not any(".base." in k for k in tensors)  # adapter only, never backbone weights
    counts = cma.read_counts(tmp_path / "cma")
    assert all(torch.equal(counts[n], layer.counts.cpu()) for n, layer in cma.moe_layers(model).items())

    fresh, _ = load_backbone(test_spec, backbone_dir)
    with torch.no_grad():
        bare = fresh(**batch).logits
    loaded, _ = cma.load(fresh, tmp_path / "cma")
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for evaluation: frozen
    with torch.no_grad():
        again = loaded(**batch).logits
    assert torch.equal(again, logits)
    assert not torch.allclose(bare, logits)  # the random adapter really changes the model
    assert generate(loaded, processor, enc.select([0, 1]), max_new_tokens=4) == answers
    assert all(isinstance(a, Generated) and isinstance(a.text, str) and len(a.tokens) <= 4 for a in answers)


def test_generation_with_kv_cache_matches_full_recompute(backbone, enc) -> None:
    model, processor = backbone
    cma.attach(model, blocks=2, experts=4, top_k=2, hidden=4)
    randomise(model, seed=1)
    model.eval()
    batch = collate(enc.select([0, 1, 2]), processor.tokenizer.pad_token_id, left_pad=True)
    batch.pop("labels")
    pad = processor.tokenizer.pad_token_id
    # eos=-1: never stop early, so both runs decode every step (the adapter is per token, so a cache is exact).
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=pad,
                            eos_token_id=-1)
    full = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=pad,
                          eos_token_id=-1)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 6
    assert torch.equal(cached, full)


def test_loading_something_else_is_refused(backbone, tmp_path: Path) -> None:
    model, _ = backbone
    with pytest.raises(FileNotFoundError):
        cma.load(model, tmp_path / "missing")
    cma.attach(model, blocks=1, experts=2, top_k=1, hidden=2)
    save_side(model, tmp_path / "other", {"kind": "bottleneck", "version": 1})
    with pytest.raises(ValueError, match="not a CMA adapter"):
        cma.read_counts(tmp_path / "other")
