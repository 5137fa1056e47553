"""Decoupled's optional contrastive alignment: symmetric InfoNCE by hand, off by default, and on
the test backbone a finite loss on pooled image/text states whose gradient reaches the task's adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from strata.config import AdapterSpec, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.hooks import TaskContext
from strata.losses import info_nce
from strata.routing import ROUTER_FILE, PrototypeRouter
from strata.strategies.decoupled import Decoupled, DecoupledConfig
from strata.train.checkpoint import STATE
from strata.train.loop import train_task

LORA = AdapterSpec(visual_rank=4, text_rank=4)
TAU = 0.07


def test_info_nce_by_hand() -> None:
    eye = torch.eye(3, dtype=torch.float64)  # float64: the aligned loss is ~1e-6
    # Aligned: each positive has cosine 1 and each negative 0, in both directions.
    aligned = math.log(1 + 2 * math.exp(-1 / TAU))
    assert info_nce(eye, eye, TAU).item() == pytest.approx(aligned, rel=1e-6)
    # Shuffled: each positive has cosine 0 and one negative has cosine 1.
    shuffled = math.log(math.exp(1 / TAU) + 2)
    assert info_nce(eye, eye[[1, 2, 0]], TAU).item() == pytest.approx(shuffled, rel=1e-9)
    # Cosine similarity: the scale of the inputs does not matter.
    torch.manual_seed(0)
    v, t = torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(info_nce(3 * v, 0.5 * t, TAU), info_nce(v, t, TAU))
    assert info_nce(v, v + 0.01 * t, TAU) < info_nce(v, t, TAU)


def test_info_nce_refuses_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match="visual and text must both be"):
        info_nce(torch.ones(3, 4), torch.ones(2, 4), TAU)


def ctx(tmp_path: Path) -> TaskContext:
    return TaskContext(0, "colour", (), {}, str(tmp_path))


def rows():
    table = generate_task("colour", 0, n_train=8, n_val=0, n_test=0)
    return table.filter(pc.equal(table["split"], "train"))


def test_off_by_default(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    decoupled = Decoupled(adapter=LORA)
    assert decoupled.needs_hidden_states is False
    model = decoupled.before_task(model, processor, ctx(tmp_path))
    inputs = collate(encode_table(processor, rows().slice(0, 2), with_answers=True), processor.tokenizer.pad_token_id)
    assert decoupled.loss(model, inputs, model(**inputs), 1) is None


def test_on_gives_a_finite_loss_that_trains_the_adapter(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    decoupled = Decoupled(adapter=LORA, opts=DecoupledConfig(contrastive=True, contrastive_weight=0.5))
    assert decoupled.needs_hidden_states is True
    assert Decoupled.needs_hidden_states is False  # set on this instance only
    model = decoupled.before_task(model, processor, ctx(tmp_path))
    model.train()
    inputs = collate(encode_table(processor, rows().slice(0, 4), with_answers=True), processor.tokenizer.pad_token_id)
    outputs = model(**inputs, output_hidden_states=True)
    loss = decoupled.loss(model, inputs, outputs, 1)
    assert torch.isfinite(loss) and loss.item() > 0

    # The same number from pooling each row by hand.
    hidden = outputs.hidden_states[-1]
    image = inputs["input_ids"] == model.config.image_token_id
    text = inputs["attention_mask"].bool() & ~image
    assert image.any(1).all() and text.any(1).all()
    v = torch.stack([hidden[i][image[i]].mean(0) for i in range(len(hidden))])
    t = torch.stack([hidden[i][text[i]].mean(0) for i in range(len(hidden))])
    torch.testing.assert_close(loss, 0.5 * info_nce(v, t, TAU))

    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n and ".colour." in n for n in grads)
    assert any("vision_tower" in n and float(g.abs().sum()) > 0 for n, g in grads.items())
    assert any("language_model" in n and float(g.abs().sum()) > 0 for n, g in grads.items())


def test_the_loop_runs_with_the_alignment_term(backbone, tmp_path: Path) -> None:
    model, processor = backbone
    decoupled = Decoupled(adapter=LORA, opts=DecoupledConfig(contrastive=True))
    routers = []

    def report(metrics: dict, ckpt: Path | None) -> None:
        if ckpt is not None and (ckpt / STATE / ROUTER_FILE).exists():
            routers.append(PrototypeRouter.load(ckpt / STATE))

    final = train_task(model, processor, decoupled, ctx(tmp_path), rows(), TrainConfig(steps=2, batch_size=4), report)
    assert math.isfinite(final["loss"])
    # finish_task put the router with this task's prototype in the final checkpoint.
    assert [r.names for r in routers] == [["colour"]]
