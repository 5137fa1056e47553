"""CMA: the freeze rule on hand-made counts, each loss term on hand tensors, and the key property on
the test backbone: experts frozen after task 0 leave the optimizer and stay bit-identical through task 1."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from reporting import Collector

from strata.adapters import cross_modal_moe as cma
from strata.adapters.custom import adapter_parameters, read_side
from strata.adapters.lora import trainable_parameters
from strata.backbone.features import modality_masks
from strata.backbone.load import load_backbone
from strata.config import RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.data.replay import ReplayBuffer
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.strategies.cma import (
    CMA,
    FREEZE_FILE,
    USAGE_FILE,
    CMAConfig,
    alignment_loss,
    preservation_loss,
    read_masks,
    update_masks,
)
from strata.train.loop import train_task

OPTS = CMAConfig(blocks=2, experts=6, top_k=2, hidden=8, freeze_threshold=0.1, memory=8, memory_batch=4)
TRAIN = TrainConfig(steps=6, batch_size=4, lr=1e-2, weight_decay=0.1)


def train_rows(task: str) -> pa.Table:
    table = generate_task(task, 0, n_train=12, n_val=1, n_test=1)
    return table.filter(pc.equal(table["split"], "train"))


def ctx(index: int, name: str, state: Path, seen: tuple[str, ...] = ()) -> TaskContext:
    return TaskContext(index, name, seen, {}, str(state), seed=0)


# ---- freeze rule ---------------------------------------------------------------------------------

def test_update_masks_freezes_the_busiest_few_up_to_a_cap_and_keeps_earlier_freezes() -> None:
    opts = CMAConfig(experts=6, freeze_threshold=0.1, freeze_top=2, freeze_cap=0.5)
    # Shares 0.4, 0.3, 0.2, 0.1, 0, 0: three are over 0.1, only the busiest two freeze.
    first = update_masks({"L": torch.tensor([40.0, 30.0, 20.0, 10.0, 0.0, 0.0])}, {}, opts)
    assert first == {"L": [True, True, False, False, False, False]}
    # The next task's busiest is already frozen: the next busy ones freeze, up to the cap of 3 of 6.
    second = update_masks({"L": torch.tensor([50.0, 0.0, 0.0, 25.0, 25.0, 0.0])}, first, opts)
    assert second == {"L": [True, True, False, True, False, False]}
    assert first == {"L": [True, True, False, False, False, False]}  # the input is not modified
    # At the cap nothing more freezes, and nothing ever thaws.
    assert update_masks({"L": torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0, 50.0])}, second, opts) == second
    # Only shares strictly above the threshold freeze: an even spread over all six freezes none.
    assert update_masks({"L": torch.ones(6)}, {}, replace(opts, freeze_threshold=1 / 6 + 1e-9)) == {"L": [False] * 6}
    # The no-freezing ablation never freezes, but keeps what an earlier run froze.
    assert update_masks({"L": torch.tensor([9.0, 1.0, 0, 0, 0, 0])}, first, replace(opts, freeze=False)) == first
    with pytest.raises(ValueError, match="freeze mask of 4"):
        update_masks({"L": torch.ones(5)}, {"L": [False] * 4}, opts)


def test_freeze_options_are_validated() -> None:
    with pytest.raises(ValueError, match="cma.freeze_top must be >= 0"):
        CMAConfig(freeze_top=-1)
    with pytest.raises(ValueError, match="cma.freeze_cap"):
        CMAConfig(freeze_cap=1.5)


# ---- loss terms ----------------------------------------------------------------------------------

def test_alignment_is_lower_when_modalities_match_the_joint() -> None:
    joint = torch.eye(4, dtype=torch.float64)
    aligned = alignment_loss(joint.clone(), joint.clone(), joint, 0.07)
    shuffled = alignment_loss(joint[[1, 2, 3, 0]], joint[[3, 0, 1, 2]], joint, 0.07)
    assert aligned.item() < 0.01
    assert shuffled.item() > 5
    # Each modality counts half: one aligned and one shuffled sit halfway.
    half = alignment_loss(joint.clone(), joint[[3, 0, 1, 2]], joint, 0.07)
    assert half.item() == pytest.approx((aligned.item() + shuffled.item()) / 2)


def test_preservation_is_zero_when_old_equals_new_and_grows_with_the_change() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert preservation_loss(z, z.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-12)
    assert preservation_loss(z, 3.0 * z, 2.0).item() == pytest.approx(0.0, abs=1e-12)  # cosine ignores scale
    small = preservation_loss(z, z + 0.1 * torch.randn(6, 5, generator=gen, dtype=torch.float64), 0.5)
    large = preservation_loss(z, torch.randn(6, 5, generator=gen, dtype=torch.float64), 0.5)
    assert 0 < small.item() < large.item()
    # By hand for two samples: each row has a single "other" sample, so its distribution is trivially 1.
    assert preservation_loss(z[:2], torch.randn(2, 5, dtype=torch.float64), 0.5).item() == pytest.approx(0.0)
    # Three samples, old relation uniform, new one not: KL(uniform ‖ q) averaged over rows.
    old = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]], dtype=torch.float64)
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    tau = 1.0
    expected = 0.0
    sims = new @ new.T
    for i in range(3):
        others = [j for j in range(3) if j != i]
        e = [math.exp(sims[i, j].item() / tau) for j in others]
        expected += sum(0.5 * math.log(0.5 / (x / sum(e))) for x in e) / 3
    assert preservation_loss(old, new, tau).item() == pytest.approx(expected, rel=1e-9)
    assert preservation_loss(z[:1], z[:1], 2.0).item() == 0.0
    with pytest.raises(ValueError, match="must both be"):
        preservation_loss(z, z[:3], 2.0)


# ---- the key property: frozen experts are bit-identical after the next task -----------------------

def expert_weights(tensors: dict[str, torch.Tensor], layer: str, expert: int) -> dict[str, torch.Tensor]:
    prefix = f"{layer}.experts.{expert}."
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def test_frozen_experts_leave_the_optimizer_and_stay_bitwise_unchanged(test_spec, backbone_dir,
                                                                        tmp_path: Path) -> None:
    strategy = make_strategy("cma", RunConfig(strategies=("cma",), options={"cma": OPTS}))
    assert isinstance(strategy, CMA) and strategy.opts == OPTS
    state = tmp_path / "state"
    rows = {t: train_rows(t) for t in ("colour", "shape")}

    # Task 0: train, install, then the driver's after_task on the installed adapter's routing counts.
    c0 = ctx(0, "colour", state)
    shared = c0.adapters_dir / "shared"
    model, processor = load_backbone(test_spec, backbone_dir)
    first = train_task(model, processor, strategy, c0, rows["colour"], TRAIN, Collector(install_to=shared))
    assert "cma/loss/distill" not in first and "cma/loss/preserve" not in first  # no previous model at t=0
    assert math.isfinite(first["cma/loss/align"]) and first["cma/frozen_experts"] == 0
    # Usage counts text tokens only: every task's pictures look alike to the gate.
    model.train()
    for layer in cma.moe_layers(model).values():
        layer.counts.zero_()
    batch = collate(encode_table(processor, rows["colour"].slice(0, 3), with_answers=True),
                    processor.tokenizer.pad_token_id)
    strategy.loss(model, batch, model(**batch, output_hidden_states=True), step=0)
    image, text = modality_masks(model, batch)
    assert image.any() and all(layer.counts.sum() == OPTS.top_k * text.sum()
                               for layer in cma.moe_layers(model).values())
    strategy.after_task(c0, rows["colour"])

    masks = read_masks(state)
    counts = cma.read_counts(shared)
    assert set(masks) == set(counts) == {"model.language_model.layers.0", "model.language_model.layers.1"}
    assert masks == update_masks(counts, {}, OPTS)
    frozen = [(layer, e) for layer, mask in masks.items() for e, f in enumerate(mask) if f]
    free = [(layer, e) for layer, mask in masks.items() for e, f in enumerate(mask) if not f]
    assert frozen and free  # top-2 of 6 experts: some are busy, some are not
    usage = [json.loads(line) for line in (state / USAGE_FILE).read_text().splitlines()]
    assert [u["task"] for u in usage] == ["colour", "colour"]
    assert all(sum(u["shares"]) == pytest.approx(1.0) for u in usage)
    assert ReplayBuffer(state / "memory").rows().num_rows == OPTS.memory
    after_task0 = {k: v.clone() for k, v in read_side(shared)[1].items()}
    kept = tmp_path / "task0"
    shutil.copytree(shared, kept)

    # Task 1 on a fresh backbone, as a worker would; weight decay would move anything left in AdamW.
    c1 = ctx(1, "shape", state, seen=("colour",))
    model, processor = load_backbone(test_spec, backbone_dir)
    second = train_task(model, processor, strategy, c1, rows["shape"], TRAIN, Collector(install_to=shared))
    assert second["cma/frozen_experts"] == len(frozen)
    for term in ("align", "distill", "preserve"):
        assert math.isfinite(second[f"cma/loss/{term}"])
    assert second["cma/loss/distill"] > 0  # the adapter moved away from the previous one on memory rows

    # `model` is the backbone the loop trained: its trainable params are exactly what AdamW was given.
    layers = cma.moe_layers(model)
    in_optimizer = {id(p) for p in trainable_parameters(model)}
    for layer, e in frozen:
        assert all(not p.requires_grad and id(p) not in in_optimizer for p in layers[layer].experts[e].parameters())
    after_task1 = read_side(shared)[1]
    for layer, e in frozen:
        old, new = expert_weights(after_task0, layer, e), expert_weights(after_task1, layer, e)
        assert old and all(torch.equal(old[k], new[k]) for k in old), (layer, e)
    # Their gate rows are pinned too (AdamW's weight decay is on), so old tokens keep their routes.
    for layer, mask in masks.items():
        rows_before, rows_after = after_task0[f"{layer}.gate.weight"], after_task1[f"{layer}.gate.weight"]
        frozen_rows = torch.tensor(mask)
        assert torch.equal(rows_before[frozen_rows], rows_after[frozen_rows]), layer
        assert not torch.equal(rows_before[~frozen_rows], rows_after[~frozen_rows]), layer
    changed = [(layer, e) for layer, e in free
               if any(not torch.equal(v, after_task1[k]) for k, v in expert_weights(after_task0, layer, e).items())]
    assert changed

    # Control: the same task without freezing moves the busy experts (so the check above can fail).
    shutil.rmtree(shared)
    shutil.copytree(kept, shared)
    thawed = CMA(opts=replace(OPTS, freeze=False))
    model, processor = load_backbone(test_spec, backbone_dir)
    train_task(model, processor, thawed, c1, rows["shape"], TRAIN, Collector())
    trained = {k: p.detach() for k, p in adapter_parameters(model).items()}
    moved = [(layer, e) for layer, e in frozen
             if any(not torch.equal(v, trained[k]) for k, v in expert_weights(after_task0, layer, e).items())]
    assert moved

    # after_task of task 1: masks are a union, memory is split evenly, both tasks are logged.
    strategy.after_task(c1, rows["shape"])
    later = read_masks(state)
    assert all(a <= b for layer in masks for a, b in zip(masks[layer], later[layer]))
    assert json.loads((state / FREEZE_FILE).read_text())["after"] == "shape"
    memory = ReplayBuffer(state / "memory")
    assert memory.tasks() == ["colour", "shape"]
    assert memory.rows().num_rows == OPTS.memory  # 4 + 4
    assert len((state / USAGE_FILE).read_text().splitlines()) == 4
    assert strategy.state_records(c1) == {"optimum": shared, "freeze_masks": state / FREEZE_FILE,
                                          "memory/colour": state / "memory" / "colour.parquet",
                                          "memory/shape": state / "memory" / "shape.parquet"}


def test_no_freeze_ablation_never_freezes(test_spec, backbone_dir, tmp_path: Path) -> None:
    strategy = CMA(opts=replace(OPTS, freeze=False))
    c0 = ctx(0, "colour", tmp_path)
    model, processor = load_backbone(test_spec, backbone_dir)
    train_task(model, processor, strategy, c0, train_rows("colour"), replace(TRAIN, steps=2),
               Collector(install_to=c0.adapters_dir / "shared"))
    strategy.after_task(c0, train_rows("colour"))
    masks = read_masks(tmp_path)
    assert masks and not any(any(m) for m in masks.values())


def test_changed_layer_options_mid_stream_are_refused(test_spec, backbone_dir, tmp_path: Path) -> None:
    c0 = ctx(0, "colour", tmp_path)
    model, processor = load_backbone(test_spec, backbone_dir)
    cma.attach(model, OPTS.blocks, OPTS.experts, OPTS.top_k, OPTS.hidden)
    cma.save(model, c0.adapters_dir / "shared")
    wider = CMA(opts=replace(OPTS, experts=OPTS.experts + 2))
    with pytest.raises(ValueError, match=r"was built with .* which does not match"):
        wider.before_task(load_backbone(test_spec, backbone_dir)[0], processor, ctx(1, "shape", tmp_path, ("colour",)))
