"""LwF: the teacher is exactly the previous task's model, KD is zero until the student moves, and
its gradient reaches only the shared adapter."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import torch

from strata.adapters.lora import load_adapter, save_adapter
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.hooks import TaskContext
from strata.losses import kd_loss, target_mask
from strata.strategies.lwf import LwF, LwFConfig

LORA = AdapterSpec(visual_rank=4, text_rank=4)


def ctx(index: int, state: Path) -> TaskContext:
    return TaskContext(index, ("colour", "shape")[index], (), {}, str(state))


def batch(processor) -> dict[str, torch.Tensor]:
    table = generate_task("shape", 0, n_train=4, n_val=0, n_test=0)
    table = table.filter(pc.equal(table["split"], "train"))
    return collate(encode_table(processor, table, with_answers=True), processor.tokenizer.pad_token_id)


def test_kd_from_the_previous_model(test_spec, backbone_dir, tmp_path: Path) -> None:
    lwf = LwF(adapter=LORA, opts=LwFConfig(weight=2.0, temperature=2.0))
    first = ctx(0, tmp_path)
    model, processor = load_backbone(test_spec, backbone_dir)
    model = lwf.before_task(model, processor, first)
    inputs = batch(processor)
    assert lwf.loss(model, inputs, model(**inputs), 1) is None  # task 0 has no previous model
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" task-0 adapter, so the teacher differs from the bare backbone
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, "shared", first.adapters_dir / "shared")

    student = lwf.before_task(load_backbone(test_spec, backbone_dir)[0], processor, ctx(1, tmp_path))
    student.train()
    at_start = lwf.loss(student, inputs, student(**inputs), 1)
    assert abs(at_start.item()) < 1e-6  # student == teacher at step 0

    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    outputs = student(**inputs)
    kd = lwf.loss(student, inputs, outputs, 2)
    # Same value from an independently loaded previous model: the teacher is the task-0 adapter.
    teacher = load_adapter(load_backbone(test_spec, backbone_dir)[0], first.adapters_dir / "shared", "shared")
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    expected = 2.0 * kd_loss(outputs.logits, teacher_logits, target_mask(inputs["labels"]), 2.0)
    torch.testing.assert_close(kd, expected, rtol=1e-4, atol=1e-6)
    assert kd.item() > 1e-4

    kd.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all("lora_" in n and ".shared." in n for n in with_grad)
    assert any(float(p.grad.abs().sum()) > 0 for p in student.parameters() if p.grad is not None)
    # Moving the student never moved the teacher snapshot.
    saved = {n: p for n, p in teacher.named_parameters() if "lora_" in n}
    assert saved.keys() == lwf.teacher.keys()
    assert all(torch.equal(lwf.teacher[n], saved[n]) for n in saved)
