"""Modality-routed LoRA: image tokens use ψ only, text tokens ϕ only, read from the input ids; the
switches (disabled, text detached), cached generation and router statistics."""

from __future__ import annotations

import math

import pyarrow.compute as pc
import pytest
import torch

from strata.adapters import custom
from strata.adapters import modality_lora as ml
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table

CFG = ml.ModalityLoRAConfig(experts=3, rank=4)
FIRST = "model.language_model.layers.0.self_attn.q_proj"  # its input is the embedding: adapter-independent


def rows(n: int = 3):
    table = generate_task("colour", 0, n_train=n, n_val=0, n_test=0)
    return table.filter(pc.equal(table["split"], "train"))


def batch(processor, n: int = 3, answers: bool = True) -> dict[str, torch.Tensor]:
    enc = encode_table(processor, rows(n), with_answers=answers)
    return collate(enc, processor.tokenizer.pad_token_id)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B everywhere (a fresh adapter's B is zero, so its Δ would be zero too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in {**ml.phi(model), **ml.psi(model)}.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def first_layer_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    got = []
    handle = model.get_submodule(FIRST).register_forward_hook(lambda m, a, out: got.append(out.detach()))
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    return got[0]  # (B, L, d_out)


def changed_positions(model, inputs, group: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """(B, L) bool: where the first layer's output moves when `group` is zeroed."""
    before = first_layer_output(model, inputs)
    saved = {n: p.detach().clone() for n, p in group.items()}
    with torch.no_grad():
        for p in group.values():
            p.zero_()
    after = first_layer_output(model, inputs)
    with torch.no_grad():
        for n, p in group.items():
            p.copy_(saved[n])
    return (before - after).abs().amax(-1) > 0


def test_image_tokens_use_psi_and_text_tokens_phi(backbone) -> None:
    model, processor = backbone
    ml.attach(model, CFG)
    perturb(model)
    inputs = batch(processor)
    image = inputs["input_ids"] == model.config.image_token_id
    assert image.any() and (~image).any()
    assert torch.equal(changed_positions(model, inputs, ml.psi(model)), image)
    assert torch.equal(changed_positions(model, inputs, ml.phi(model)), ~image)


def test_coupled_sends_every_token_through_the_moe(backbone) -> None:
    model, processor = backbone
    ml.attach(model, ml.ModalityLoRAConfig(experts=2, rank=4, coupled=True))
    assert ml.psi(model) == {}
    assert all(layer.visual is None for layer in custom.layers(model).values())
    perturb(model)
    inputs = batch(processor)
    assert changed_positions(model, inputs, ml.phi(model)).all()


def test_attach_wraps_every_lm_linear_once(backbone) -> None:
    model, _ = backbone
    n_lm_linears = sum(1 for n, m in model.named_modules()
                       if ".language_model." in n and isinstance(m, torch.nn.Linear))
    ml.attach(model, CFG)
    wrapped = custom.layers(model)
    assert len(wrapped) == n_lm_linears == 7 * model.config.text_config.num_hidden_layers
    assert all(".language_model." in n for n in wrapped)
    assert ml.attach(model, CFG) is model and len(custom.layers(model)) == len(wrapped)  # idempotent
    with pytest.raises(ValueError, match="already holds modality-routed LoRA"):
        ml.attach(model, ml.ModalityLoRAConfig(experts=2, rank=4))
    # ϕ and ψ partition the adapter parameters; the backbone stays frozen.
    adapter = custom.adapter_parameters(model)
    assert set(ml.phi(model)) | set(ml.psi(model)) == set(adapter)
    assert not set(ml.phi(model)) & set(ml.psi(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapter)


def test_fresh_adapter_and_disabled_adapters_are_the_backbone(backbone) -> None:
    model, processor = backbone
    inputs = {k: v for k, v in batch(processor).items() if k != "labels"}
    with torch.no_grad():
        bare = model(**inputs).logits
        ml.attach(model, CFG)
        assert torch.equal(model(**inputs).logits, bare)  # B = 0 at init
        perturb(model)
        assert not torch.allclose(model(**inputs).logits, bare)
        with ml.adapters_disabled(model):
            assert torch.equal(model(**inputs).logits, bare)
    assert not ml.context(model).disabled  # the switch is restored


def test_detached_text_keeps_values_and_cuts_phi_gradient(backbone) -> None:
    model, processor = backbone
    ml.attach(model, CFG)
    perturb(model)
    for p in {**ml.phi(model), **ml.psi(model)}.values():
        p.requires_grad_(True)
    inputs = batch(processor)
    plain = model(**inputs)
    with ml.text_detached(model):
        detached = model(**inputs)
    assert torch.equal(plain.logits, detached.logits)
    detached.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in ml.phi(model).values())
    assert any(p.grad is not None and p.grad.any() for p in ml.psi(model).values())


def test_forward_without_input_ids_is_refused(backbone) -> None:
    model, processor = backbone
    ml.attach(model, CFG)
    inputs = batch(processor)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_cached_generation_matches_uncached(backbone) -> None:
    model, processor = backbone
    ml.attach(model, CFG)
    perturb(model, seed=1)
    enc = encode_table(processor, rows(3), with_answers=False)
    inputs = collate(enc, processor.tokenizer.pad_token_id, left_pad=True)
    inputs.pop("labels")
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        full = model.generate(**inputs, use_cache=False, **kwargs)  # every step re-reads the whole prompt
        with ml.adapters_disabled(model):
            bare = model.generate(**inputs, **kwargs)
    assert cached.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(cached, full)
    assert not torch.equal(cached, bare)


def test_router_stats_count_attended_text_tokens(backbone) -> None:
    model, processor = backbone
    ml.attach(model, CFG)
    perturb(model)
    inputs = batch(processor)
    ml.router_stats(model, reset=True)
    with torch.no_grad():
        model(**{k: v for k, v in inputs.items() if k != "labels"})
    stats = ml.router_stats(model)
    text = (inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()
    assert stats["tokens"] == int(text.sum()) * len(custom.layers(model))
    assert len(stats["expert_weight"]) == CFG.experts
    assert math.isclose(sum(stats["expert_weight"]), 1.0, rel_tol=1e-5)
    assert 0 < stats["entropy"] < math.log(CFG.experts)
    assert ml.router_stats(model)["tokens"] == 0  # reset
