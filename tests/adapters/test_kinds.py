"""Every adapter kind on every placement it supports: where it attaches, that it trains, that it saves,
loads and generates, and that kinds without named switching refuse to share a model."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from strata.adapters import custom
from strata.adapters.lora import (
    MULTI_ADAPTER_KINDS,
    adapter_kind,
    add_adapter,
    load_adapter,
    save_adapter,
    trainable_parameters,
    used_vision_layers,
)
from strata.adapters.placement import COMPATIBLE
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.generation import generate
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.train.loop import train_task

VISION = "model.vision_tower.encoder.layers"
TEXT = "model.language_model.layers"
VISION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "mlp.fc1", "mlp.fc2")
TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# placement -> (vision layers, projector?, LM layers) on the test backbone: 2 vision layers (both feed
# the LM) and 2 LM layers. Top = closest to the output; every_other = even indices from the input end.
LAYERS = {
    "all": ({0, 1}, True, {0, 1}),
    "top_half": ({1}, True, {1}),
    "bottom_half": ({0}, False, {0}),
    "every_other": ({0}, False, {0}),
    "vision_only": ({0, 1}, True, set()),
    "language_only": (set(), False, {0, 1}),
}
CASES = [AdapterSpec(kind=k, placement=p, visual_rank=4, text_rank=6) for k, ps in COMPATIBLE.items() for p in ps]
CASES += [AdapterSpec(kind="lora", visual_rank=0, text_rank=4), AdapterSpec(kind="bottleneck", text_rank=0)]


def case_id(spec: AdapterSpec) -> str:
    return f"{spec.kind}-{spec.placement}-v{spec.visual_rank}-t{spec.text_rank}"


def expected_modules(spec: AdapterSpec) -> dict[str, int]:
    """Module name -> rank (bottleneck width) the adapter should attach to, written out by hand."""
    vision, projector, text = LAYERS[spec.placement]
    if spec.visual_rank == 0:
        vision, projector = set(), False
    if spec.text_rank == 0:
        text = set()
    if spec.kind == "prefix":
        return {}  # prefix tuning touches no module of the backbone
    if spec.kind == "bottleneck":
        names = {f"{VISION}.{i}.mlp": spec.visual_rank for i in vision}
        names |= {"model.multi_modal_projector": spec.visual_rank} if projector else {}
        return names | {f"{TEXT}.{i}.mlp": spec.text_rank for i in text}
    names = {f"{VISION}.{i}.{m}": spec.visual_rank for i in vision for m in VISION_LINEARS}
    names |= {f"model.multi_modal_projector.linear_{j}": spec.visual_rank for j in (1, 2)} if projector else {}
    return names | {f"{TEXT}.{i}.{m}": spec.text_rank for i in text for m in TEXT_LINEARS}


def is_adapter(param_name: str) -> bool:
    """Whether a parameter belongs to an adapter of any kind (LoRA/DoRA, prefix, BitFit, bottleneck)."""
    return any(tag in param_name for tag in ("lora_", "prompt_encoder.", ".delta", ".down.", ".up."))


def attached(model: torch.nn.Module) -> dict[str, int]:
    """Module name -> rank of every module carrying an adapter (LoRA rank, bottleneck width, 0 for BitFit)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    out = {n: m.lora_A[k].out_features for n, m in base.named_modules() if hasattr(m, "lora_A") for k in m.lora_A}
    for name, layer in custom.layers(base).items():
        out[name] = layer.down.out_features if hasattr(layer, "down") else 0
    return out


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every adapter parameter off its (often zero) init, so the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def rows():
    table = generate_task("shape", 0, n_train=8, n_val=0, n_test=0)
    return table.filter(pc.equal(table["split"], "train"))


@pytest.fixture(scope="module")
def batch(test_spec, backbone_dir, rows):
    _, processor = load_backbone(test_spec, backbone_dir)
    return collate(encode_table(processor, rows.slice(0, 3), with_answers=True), processor.tokenizer.pad_token_id)


def test_test_backbone_shape_assumed_here(backbone) -> None:
    model, _ = backbone
    assert used_vision_layers(model.config) == 2 and model.config.text_config.num_hidden_layers == 2


def test_multi_adapter_kinds() -> None:
    assert MULTI_ADAPTER_KINDS == ("lora", "dora")


@pytest.mark.parametrize("spec", CASES, ids=case_id)
def test_attaches_to_exactly_the_placed_modules(backbone, spec: AdapterSpec) -> None:
    model, _ = backbone
    wrapped = add_adapter(model, "t1", spec)
    expected = expected_modules(spec)
    if spec.kind == "bitfit":
        expected = dict.fromkeys(expected, 0)
    assert attached(wrapped) == expected
    if spec.kind == "dora":
        base = wrapped.get_base_model()
        assert all(base.get_submodule(n).use_dora["t1"] for n in expected)
    if spec.kind == "prefix":
        table = wrapped.prompt_encoder["t1"].embedding.weight  # (virtual tokens, layers * 2 * kv width)
        assert table.shape == (spec.text_rank, 2 * 2 * 64)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)


@pytest.mark.parametrize("spec", CASES, ids=case_id)
def test_trains_only_adapter_parameters(backbone, rows, spec: AdapterSpec, tmp_path: Path) -> None:
    backbone_model, processor = backbone
    strategy = make_strategy("seqlora", RunConfig(strategies=("seqlora",), adapter=spec))
    built: dict = {}
    original_before_task = strategy.before_task

    def keep(backbone, processor, ctx):  # remember the model the loop trains, and its starting weights
        built["model"] = original_before_task(backbone, processor, ctx)
        built["start"] = {n: p.detach().clone() for n, p in built["model"].named_parameters()}
        return built["model"]

    strategy.before_task = keep
    final = train_task(backbone_model, processor, strategy, TaskContext(0, "shape", (), {}, str(tmp_path)), rows,
                       TrainConfig(steps=2, batch_size=2, lr=1e-2), lambda metrics, ckpt: None)
    assert math.isfinite(final["loss"])
    model, start = built["model"], built["start"]
    params = dict(model.named_parameters())
    assert params.keys() == start.keys()
    changed = {n for n, p in params.items() if not torch.equal(p, start[n])}
    assert changed and all(is_adapter(n) for n in changed)  # the backbone never moves


@pytest.mark.parametrize("spec", CASES, ids=case_id)
def test_save_load_round_trip_gives_identical_logits(test_spec, backbone_dir, batch, spec: AdapterSpec,
                                                     tmp_path: Path) -> None:
    model, _ = load_backbone(test_spec, backbone_dir)
    with torch.no_grad():
        base = model(**batch).logits
    model = add_adapter(model, "t1", spec)
    perturb(model)
    model.eval()
    dest = save_adapter(model, "t1", tmp_path / "adapters" / "t1")
    assert adapter_kind(dest) == spec.kind
    assert [p.name for p in dest.parent.iterdir()] == ["t1"]  # no temp dir left beside it
    with torch.no_grad():
        expected = model(**batch).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter really changes outputs

    fresh, _ = load_backbone(test_spec, backbone_dir)
    loaded = load_adapter(fresh, dest, "renamed")
    assert trainable_parameters(loaded) == []
    assert attached(loaded) == attached(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    if spec.kind in ("lora", "dora", "prefix"):  # PEFT's format: plain PEFT loads it
        plain = PeftModel.from_pretrained(load_backbone(test_spec, backbone_dir)[0], str(dest))
        plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bottleneck", "bitfit"])
def test_strata_kind_loads_trainable_and_resaves(test_spec, backbone_dir, kind: str, tmp_path: Path) -> None:
    spec = AdapterSpec(kind=kind, placement="vision_only")
    model = add_adapter(load_backbone(test_spec, backbone_dir)[0], "t1", spec)
    perturb(model)
    saved = save_adapter(model, "t1", tmp_path / "a")
    again = load_adapter(load_backbone(test_spec, backbone_dir)[0], saved, "t1", trainable=True)
    trainable = dict(custom.adapter_parameters(again))
    assert trainable and {id(p) for p in trainable.values()} == {id(p) for p in trainable_parameters(again)}
    resaved = save_adapter(again, "t1", tmp_path / "b")
    first, second = load_file(str(saved / custom.SIDE_FILE)), load_file(str(resaved / custom.SIDE_FILE))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert custom.read_side(saved)[0] == custom.read_side(resaved)[0]
    with pytest.raises(ValueError, match="holds Strata adapter 't1', not 'other'"):
        save_adapter(again, "other", tmp_path / "c")


@pytest.mark.parametrize("kind", list(COMPATIBLE))
def test_generate_matches_step_by_step_greedy_decoding(test_spec, backbone_dir, rows, kind: str) -> None:
    """generate() (with its KV cache, and PEFT's prefix cache for prefix tuning) agrees with a plain
    argmax loop over full forwards, so evaluation sees what training trained."""
    model, processor = load_backbone(test_spec, backbone_dir)
    spec = AdapterSpec(kind=kind, placement=COMPATIBLE[kind][-1 if kind == "bitfit" else 0])
    model = add_adapter(model, "t1", spec)
    perturb(model)
    model.eval()
    tok = processor.tokenizer
    enc = encode_table(processor, rows, with_answers=False)
    # Two prompts of one length: the plain loop below passes no position ids, so it is only a
    # reference without padding; left padding is checked against one-by-one decoding at the end.
    same = next([i, j] for i in range(len(enc)) for j in range(i + 1, len(enc))
                if enc.prompt_lengths[i] == enc.prompt_lengths[j])
    prompt = collate(enc.select(same), tok.pad_token_id, left_pad=True)
    prompt.pop("labels")
    steps = 4
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        ids, mask = prompt["input_ids"], prompt["attention_mask"]
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=prompt["pixel_values"]).logits[:, -1]
            logits[:, tok.eos_token_id] = -math.inf  # as min_new_tokens does
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out[:, -steps:], ids[:, -steps:])
    assert len(set(enc.prompt_lengths)) > 1  # the batch below is left-padded
    batched = [g.tokens for g in generate(model, processor, enc, steps, batch_size=len(enc))]
    assert batched == [g.tokens for g in generate(model, processor, enc, steps, batch_size=1)]


@pytest.mark.parametrize(("first", "second"), [("bottleneck", "bitfit"), ("bitfit", "bitfit"), ("lora", "prefix"),
                                               ("prefix", "lora"), ("lora", "bottleneck")])
def test_kinds_without_named_switching_refuse_a_second_adapter(backbone, first: str, second: str) -> None:
    model, _ = backbone
    place = {"prefix": "language_only", "bitfit": "vision_only"}
    model = add_adapter(model, "first", AdapterSpec(kind=first, placement=place.get(first, "all")))
    with pytest.raises(ValueError, match="already holds adapter"):
        add_adapter(model, "second", AdapterSpec(kind=second, placement=place.get(second, "all")))


def test_lora_and_dora_share_a_model(backbone) -> None:
    model, _ = backbone
    model = add_adapter(model, "colour", AdapterSpec(kind="lora"))
    model = add_adapter(model, "shape", AdapterSpec(kind="dora", placement="language_only"))
    assert set(model.peft_config) == {"colour", "shape"} and model.active_adapter == "shape"


def test_load_refuses_a_second_strata_adapter(test_spec, backbone_dir, tmp_path: Path) -> None:
    spec = AdapterSpec(kind="bottleneck", placement="language_only")
    saved = save_adapter(add_adapter(load_backbone(test_spec, backbone_dir)[0], "a", spec), "a", tmp_path / "a")
    model = load_adapter(load_backbone(test_spec, backbone_dir)[0], saved, "a")
    with pytest.raises(ValueError, match="already holds adapter"):
        load_adapter(model, saved, "b")


def test_load_refuses_a_directory_without_an_adapter(backbone, tmp_path: Path) -> None:
    model, _ = backbone
    with pytest.raises(ValueError, match="holds no adapter"):
        load_adapter(model, tmp_path, "a")


def test_load_refuses_a_strategy_side_file(test_spec, backbone_dir, tmp_path: Path) -> None:
    spec = AdapterSpec(kind="bitfit", placement="vision_only")
    model = add_adapter(load_backbone(test_spec, backbone_dir)[0], "a", spec)
    config, _ = custom.read_side(save_adapter(model, "a", tmp_path / "a"))
    experts = custom.save_side(model, tmp_path / "experts", {**config, "kind": "moe-experts"})
    with pytest.raises(ValueError, match="side file of a strategy"):
        load_adapter(load_backbone(test_spec, backbone_dir)[0], experts, "a")
