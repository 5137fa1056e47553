"""MoDE: the KD anchor reaches ψ only while the task CE reaches ϕ and ψ; the reference set is the
backbone's own captions; training continues from the saved adapter, and a save/load round trip
reproduces the logits and generates."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from reporting import Collector

from strata.adapters import custom
from strata.adapters import modality_lora as ml
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.data.schema import write_table
from strata.generation import generate
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.strategies.mode import MoDE, MoDEConfig
from strata.train.loop import train_task

OPTS = MoDEConfig(experts=2, rank=4, kd_weight=0.3, reference_rows=8, kd_batch=2)


def ctx(index: int, state: Path, seed: int = 0) -> TaskContext:
    return TaskContext(index, ("colour", "shape")[index], (), {}, str(state), seed)


def train_rows(task: str = "colour", n: int = 8):
    table = generate_task(task, 0, n_train=n, n_val=0, n_test=0)
    return table.filter(pc.equal(table["split"], "train"))


def batch(processor) -> dict[str, torch.Tensor]:
    return collate(encode_table(processor, train_rows(n=3), with_answers=True), processor.tokenizer.pad_token_id)


def perturb(model: torch.nn.Module) -> None:
    """Non-zero B (a fresh adapter is the backbone, so KD and ∇A would be zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in {**ml.phi(model), **ml.psi(model)}.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def nonzero(params: dict[str, torch.nn.Parameter]) -> list[str]:
    return [n for n, p in params.items() if p.grad is not None and p.grad.any()]


def test_make_strategy_builds_mode() -> None:
    s = make_strategy("mode", RunConfig(strategies=("mode",), options={"mode": OPTS}))
    assert isinstance(s, MoDE) and s.opts == OPTS and s.shared


def test_kd_reaches_only_psi_and_ce_reaches_both(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    mode = MoDE(opts=OPTS)
    model = mode.before_task(model, processor, ctx(0, tmp_path))
    assert all(p.requires_grad for p in {**ml.phi(model), **ml.psi(model)}.values())
    perturb(model)
    model.train()
    inputs = batch(processor)

    kd = mode.loss(model, inputs, None, step=1)
    assert kd.item() > 0
    kd.backward()
    assert nonzero(ml.phi(model)) == []  # stop-gradient through ϕ for the KD term
    assert len(nonzero(ml.psi(model))) > len(ml.psi(model)) // 2

    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    for group in (ml.phi(model), ml.psi(model)):
        got = nonzero(group)
        assert any(".lora_a" in n for n in got) and any(".lora_b" in n for n in got)
    assert any(".router." in n for n in nonzero(ml.phi(model)))
    assert "mode/kd" in mode.metrics()


def test_coupled_kd_trains_the_shared_moe(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    mode = MoDE(opts=MoDEConfig(experts=2, rank=4, reference_rows=8, kd_batch=2, coupled=True))
    model = mode.before_task(model, processor, ctx(0, tmp_path))
    assert ml.psi(model) == {}
    perturb(model)
    mode.loss(model, batch(processor), None, step=1).backward()
    assert nonzero(ml.phi(model))  # no ψ to take the anchor: it goes into the one MoE


def test_reference_is_a_seeded_sample_of_pretraining_captions(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    mode = MoDE(opts=OPTS)
    ref = mode.build_reference(model, processor, seed=0)
    assert len(ref) == OPTS.reference_rows
    assert all(any(t != -100 for t in labels) for labels in ref.labels)  # caption tokens are supervised
    assert mode.build_reference(model, processor, seed=0) is ref  # built once
    again = MoDE(opts=OPTS).build_reference(model, processor, seed=0)
    other = MoDE(opts=OPTS).build_reference(model, processor, seed=1)
    assert again.input_ids == ref.input_ids
    assert other.input_ids != ref.input_ids

    parquet = write_table(generate_task("shape", 0, n_train=5, n_val=0, n_test=0), tmp_path / "ref.parquet")
    from_file = MoDE(opts=MoDEConfig(reference=str(parquet), reference_rows=3)).build_reference(model, processor, 0)
    assert len(from_file) == 3 and set(from_file.answers) <= set(generate_task("shape", 0, 5, 0, 0)["answer"].to_pylist())


def test_a_reference_file_without_the_columns_or_rows_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    from strata.strategies.mode import file_reference

    no_answer = write_table(pa.table({"image": [b""], "prompt": ["p"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        file_reference(str(no_answer), rows=4, seed=0)
    empty = write_table(generate_task("shape", 0, 2, 0, 0).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="has no rows"):
        file_reference(str(empty), rows=4, seed=0)


def test_pretraining_reference_needs_a_builtin_backbone(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    model.name_or_path = str(tmp_path)  # a user's model dir: no recipe, so no known captions
    with pytest.raises(ValueError, match="not a built-in backbone"):
        MoDE(opts=OPTS).build_reference(model, processor, seed=0)


def test_train_continue_save_load_and_generate(test_spec, backbone_dir, tmp_path: Path) -> None:
    mode = MoDE(adapter=AdapterSpec(alpha_ratio=2.0), opts=OPTS)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, executor="local")
    first = ctx(0, tmp_path / "state")
    model, processor = load_backbone(test_spec, backbone_dir)
    report = Collector(install_to=first.adapters_dir / "shared")  # where the driver would put it
    final = train_task(model, processor, mode, first, train_rows(), cfg, report, log_every=3)
    assert final["mode/kd"] >= 0 and 0 < final["mode/router_entropy"] <= torch.log(torch.tensor(2.0)).item()
    config, tensors = custom.read_side(first.adapters_dir / "shared")
    assert config["kind"] == "mode" and config["experts"] == 2 and config["rank"] == 4 and not config["coupled"]
    assert any("visual.lora_b" in k and v.any() for k, v in tensors.items())  # ψ trained
    assert any("text.lora_b" in k and v.any() for k, v in tensors.items())  # ϕ trained

    # Round trip: a fresh backbone with the saved adapter gives the trained model's logits, frozen.
    inputs = {k: v for k, v in batch(processor).items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        loaded = mode.load_eval(load_backbone(test_spec, backbone_dir)[0], first)
        assert torch.equal(loaded(**inputs).logits, trained)
    assert not any(p.requires_grad for p in loaded.parameters())
    enc = encode_table(processor, train_rows(n=2), with_answers=False)
    assert len(generate(loaded, processor, enc, max_new_tokens=4)) == 2

    # The next task continues from the saved adapter, trainable.
    second = MoDE(opts=OPTS).before_task(load_backbone(test_spec, backbone_dir)[0], processor, ctx(1, tmp_path / "state"))
    params = custom.adapter_parameters(second)
    assert all(torch.equal(p, tensors[n]) and p.requires_grad for n, p in params.items())
    with pytest.raises(ValueError, match="start a new stream"):
        MoDE(opts=MoDEConfig(experts=3, rank=4)).before_task(
            load_backbone(test_spec, backbone_dir)[0], processor, ctx(1, tmp_path / "state"))
