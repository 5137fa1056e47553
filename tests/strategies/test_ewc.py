"""EWC: the penalty against a hand computation, the Fisher on the real test backbone (non-negative,
non-zero, accumulated over tasks, names matching the training model) and the state file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from reporting import Collector

from strata.adapters.lora import named_adapter_parameters
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.hooks import TaskContext
from strata.strategies.ewc import (
    EWC,
    STATE_FILE,
    EWCConfig,
    estimate_fisher,
    ewc_penalty,
    load_state,
    save_state,
)
from strata.train.checkpoint import STATE
from strata.train.loop import train_task

LORA = AdapterSpec(visual_rank=4, text_rank=4)


def ctx(index: int, state: Path, name: str = "colour") -> TaskContext:
    return TaskContext(index, name, (), {}, str(state))


def test_penalty_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    params = dict(model.named_parameters())
    theta_old = {n: p.detach().clone() for n, p in params.items()}
    fisher = {"weight": torch.tensor([[2.0, 0.5]]), "bias": torch.tensor([4.0])}

    at_old = ewc_penalty(params, fisher, theta_old, weight=3.0)
    at_old.backward()
    assert at_old.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params.values())

    model.zero_grad()
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, -2.0]])
        model.bias += torch.tensor([0.5])
    penalty = ewc_penalty(params, fisher, theta_old, weight=3.0)
    penalty.backward()
    # 3/2 * (2·1² + 0.5·(−2)² + 4·0.5²) = 1.5 * 5 = 7.5; gradient = 3·F·(θ − θ_old)
    assert penalty.item() == pytest.approx(7.5)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[6.0, -3.0]]))
    torch.testing.assert_close(model.bias.grad, torch.tensor([6.0]))


def test_penalty_refuses_names_that_do_not_line_up() -> None:
    params = dict(torch.nn.Linear(2, 1).named_parameters())
    fisher = {"weight": torch.ones(1, 2)}
    with pytest.raises(ValueError, match="do not line up.*bias"):
        ewc_penalty(params, fisher, {n: p.detach() for n, p in params.items()}, 1.0)


def test_state_file_round_trip(tmp_path: Path) -> None:
    fisher = {"base_model.model.a.lora_A.shared.weight": torch.rand(3, 2), "b.lora_B.shared.weight": torch.rand(2)}
    theta = {k: torch.randn_like(v) for k, v in fisher.items()}
    path = save_state(tmp_path, fisher, theta)
    assert path == tmp_path / STATE_FILE
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind
    loaded_fisher, loaded_theta = load_state(tmp_path)
    assert loaded_fisher.keys() == fisher.keys() and loaded_theta.keys() == theta.keys()
    assert all(torch.equal(loaded_fisher[k], fisher[k]) and torch.equal(loaded_theta[k], theta[k]) for k in fisher)
    assert load_state(tmp_path / "empty") is None


def train_rows(task: str) -> pa.Table:
    table = generate_task(task, 0, n_train=16, n_val=0, n_test=0)
    return table.filter(pc.equal(table["split"], "train"))


@pytest.mark.parametrize("spec", [LORA, AdapterSpec(kind="bottleneck", visual_rank=4, text_rank=4)],
                         ids=lambda s: s.kind)
def test_fisher_on_the_test_backbone(spec: AdapterSpec, test_spec, backbone_dir, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ewc = EWC(adapter=spec, opts=EWCConfig(weight=10.0, fisher_rows=8))
    first = ctx(0, state)
    rows = train_rows("colour")
    model, processor = load_backbone(test_spec, backbone_dir)
    report = Collector(tmp_path / "ckpt", install_to=first.adapters_dir / "shared")
    train_task(model, processor, ewc, first, rows, TrainConfig(steps=4, batch_size=4, lr=5e-3), report)
    trainable = set(ewc.params)  # the training model's trainable names (set in before_task)

    # Worker side: the loop's finish_task put the trained model's Fisher and θ in the final checkpoint.
    final_ckpt = report.reports[-1][1]
    assert [p.name for p in (final_ckpt / STATE).iterdir()] == [STATE_FILE]
    worker_fisher, worker_theta = load_state(final_ckpt / STATE)
    assert worker_fisher.keys() == worker_theta.keys() == trainable
    eval_model = ewc.load_eval(load_backbone(test_spec, backbone_dir)[0], first)
    params = dict(eval_model.named_parameters())
    assert all(torch.equal(worker_theta[n], params[n]) for n in worker_theta)  # θ_old is the saved adapter

    # finish_task on the installed adapter over a fresh, frozen backbone, written straight into the state dir.
    ewc.finish_task(eval_model, processor, first, rows, state)
    fisher, theta = load_state(state)
    assert fisher.keys() == theta.keys() == trainable  # the names line up with the training model
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert any("vision_tower" in n and float(f.sum()) > 0 for n, f in fisher.items())
    assert all(torch.equal(theta[n], params[n]) for n in theta)
    assert not any(p.requires_grad or p.grad is not None for p in eval_model.parameters())  # restored
    torch.testing.assert_close(fisher, worker_fisher)  # the same Fisher as the training model's
    assert ewc.state_records(first)["fisher"] == state / STATE_FILE

    # A second task adds its Fisher to the stored one (same model and rows here: exactly twice).
    ewc.finish_task(eval_model, processor, ctx(1, state, "shape"), rows, state)
    doubled, _ = load_state(state)
    assert all(torch.equal(doubled[n], 2 * fisher[n]) for n in fisher)

    # Worker side of the next task: zero penalty at θ_old, positive and adapter-only once θ moves.
    train_model = ewc.before_task(load_backbone(test_spec, backbone_dir)[0], processor, ctx(1, state, "shape"))
    assert ewc.loss(train_model, {}, None, 1).item() == 0.0
    with torch.no_grad():
        for n, p in train_model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    penalty = ewc.loss(train_model, {}, None, 1)
    assert penalty.item() > 0
    penalty.backward()
    grads = [n for n, p in train_model.named_parameters() if p.grad is not None]
    assert set(grads) == trainable


def test_first_task_has_no_penalty_and_bad_state_is_refused(test_spec, backbone_dir, tmp_path: Path) -> None:
    ewc = EWC(adapter=LORA)
    model = ewc.before_task(*load_backbone(test_spec, backbone_dir), ctx(0, tmp_path))
    assert ewc.loss(model, {}, None, 1) is None
    save_state(tmp_path, {"not.a.param": torch.ones(1)}, {"not.a.param": torch.ones(1)})
    with pytest.raises(ValueError, match="do not line up"):
        ewc.before_task(*load_backbone(test_spec, backbone_dir), ctx(1, tmp_path, "shape"))


def test_the_fisher_is_per_row_not_per_batch(test_spec, backbone_dir, tmp_path: Path) -> None:
    """F = mean over rows of (∇ answer log-likelihood)², which a batch-mean gradient would shrink."""
    ewc = EWC(adapter=LORA)
    model, processor = load_backbone(test_spec, backbone_dir)
    model = ewc.before_task(model, processor, ctx(0, tmp_path)).eval()  # eval: no adapter dropout
    rows = train_rows("colour").slice(0, 3)
    with torch.no_grad():  # non-zero B, so every LoRA parameter has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    params = named_adapter_parameters(model, "shared")
    fisher = estimate_fisher(model, processor, rows, "shared")
    enc = encode_table(processor, rows, with_answers=True)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(enc)):
        batch = collate(enc.select([i]), processor.tokenizer.pad_token_id)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="sum")
        for n, g in zip(params, torch.autograd.grad(nll, list(params.values()))):
            expected[n] += g.pow(2) / len(enc)
    torch.testing.assert_close(fisher, expected, rtol=1e-4, atol=1e-9)
