"""DGG: ĝ against hand computations, the Bernoulli stream (rate, rank agreement, per-task α), the
ablation switches, and a real two-task run in which the guidance pulls the adapter toward θ*."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from reporting import Collector
from safetensors.torch import load_file

from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, TrainConfig
from strata.data.benchmark import generate_task
from strata.grads import Grads
from strata.hooks import TaskContext
from strata.strategies.dgg import DGG, STEPS, DGGConfig
from strata.train.loop import train_task

LORA = AdapterSpec(visual_rank=4, text_rank=4)
# θ − θ* per parameter of a Linear(3, 2): ‖d‖² = 1 + 4 + 4 + 1 + 4 = 14.
D_WEIGHT = [[1.0, 2.0, 0.0], [0.0, -2.0, 1.0]]
D_BIAS = [2.0, 0.0]


def ctx(index: int, state: Path, seed: int = 0, name: str = "task") -> TaskContext:
    return TaskContext(index, name, (), {}, str(state), seed)


def toy(dgg: DGG, index: int, tmp_path: Path, grad: float | None) -> torch.nn.Linear:
    """A Linear(3, 2) whose θ* is its initial state, moved by (D_WEIGHT, D_BIAS), with every grad = `grad`."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    dgg.begin(model, ctx(index, tmp_path))
    with torch.no_grad():
        model.weight += torch.tensor(D_WEIGHT)
        model.bias += torch.tensor(D_BIAS)
    for p in model.parameters():
        p.grad = None if grad is None else torch.full_like(p, grad)
    return model


def step(dgg: DGG, model: torch.nn.Module, n: int = 1) -> None:
    for i in range(n):
        dgg.after_backward(model, Grads(list(model.parameters())), i + 1)


@pytest.mark.parametrize(
    ("grad", "scaling", "expected_ghat_factor"),
    [
        (0.5, True, math.sqrt(8 * 0.25) / math.sqrt(14)),  # ‖d‖ = √14 > ‖∇L‖ = √2: rescaled to ‖∇L‖
        (2.0, True, 1.0),  # ‖d‖ = √14 < ‖∇L‖ = √32: θ − θ* as is
        (0.5, False, 1.0),  # scaling off: never rescaled
    ],
)
def test_ghat_matches_hand_computation(grad: float, scaling: bool, expected_ghat_factor: float,
                                       tmp_path: Path) -> None:
    dgg = DGG(opts=DGGConfig(alpha=1.0, scaling=scaling))
    model = toy(dgg, 1, tmp_path, grad)
    step(dgg, model)
    expected_w = [[grad + expected_ghat_factor * x for x in row] for row in D_WEIGHT]
    expected_b = [grad + expected_ghat_factor * x for x in D_BIAS]
    torch.testing.assert_close(model.weight.grad, torch.tensor(expected_w))
    torch.testing.assert_close(model.bias.grad, torch.tensor(expected_b))
    m = dgg.metrics()
    assert m["dgg/injection_rate"] == 1.0
    assert m["dgg/d_norm"] == pytest.approx(math.sqrt(14))
    assert m["dgg/grad_norm"] == pytest.approx(math.sqrt(8 * grad**2))


def test_param_without_grad_gets_ghat(tmp_path: Path) -> None:
    dgg = DGG(opts=DGGConfig(alpha=1.0))
    model = toy(dgg, 1, tmp_path, grad=2.0)
    model.bias.grad = None  # took no part in the loss: its gradient counts as zero in ‖∇L‖
    step(dgg, model)
    assert dgg.metrics()["dgg/grad_norm"] == pytest.approx(math.sqrt(6 * 4.0))  # √24 > √14: no rescale
    torch.testing.assert_close(model.bias.grad, torch.tensor(D_BIAS))


@pytest.mark.parametrize(("index", "alpha"), [(1, 0.0), (0, 1.0)])
def test_grads_unchanged_without_injection(index: int, alpha: float, tmp_path: Path) -> None:
    """α = 0 never injects; task 0 has no θ* so nothing is injected even at α = 1."""
    dgg = DGG(opts=DGGConfig(alpha=alpha))
    model = toy(dgg, index, tmp_path, grad=0.5)
    step(dgg, model, n=20)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert dgg.metrics()["dgg/injection_rate"] == 0.0 and dgg.metrics()["dgg/scaled_rate"] == 0.0
    # The norms are traced on every step that has a θ*, injected or not.
    assert len(dgg.trace) == (20 if index > 0 else 0)
    assert all(not injected and d == pytest.approx(math.sqrt(14)) for _, d, _, injected, _ in dgg.trace)


def test_every_step_is_traced_and_written_per_task(tmp_path: Path) -> None:
    dgg = DGG(opts=DGGConfig(alpha=0.5))
    model = toy(dgg, 1, tmp_path, grad=0.5)  # ‖θ − θ*‖ = √14 > ‖∇L‖ = √2: every injection is rescaled
    for i in range(40):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)  # a fresh backward each step
        dgg.after_backward(model, Grads(list(model.parameters())), i + 1)
    dgg.finish_task(model, None, ctx(1, tmp_path, name="shape"), pa.table({}), tmp_path / "out")
    written = json.loads((tmp_path / "out" / STEPS / "shape.json").read_text())
    assert written["step"] == list(range(1, 41))
    assert written["injected"] == written["scaled"]
    assert 5 < sum(written["injected"]) < 35 and sum(written["injected"]) == dgg.injected
    assert dgg.metrics()["dgg/scaled_rate"] == 1.0
    assert all(g == pytest.approx(math.sqrt(8 * 0.25)) for g in written["grad_norm"])
    # ‖θ − θ*‖ is read before each step's edit: θ itself only moves in the optimizer (not run here).
    assert all(d == pytest.approx(math.sqrt(14)) for d in written["d_norm"])
    # A resumed worker continues the trace where the checkpoint left it.
    again = DGG(opts=DGGConfig(alpha=0.5))
    again.load_train_state(dgg.train_state())
    assert again.trace == dgg.trace


@pytest.mark.parametrize("alpha", [0.2, 0.05])
def test_bernoulli_rate_is_alpha(alpha: float, tmp_path: Path) -> None:
    n = 3000
    dgg = DGG(opts=DGGConfig(alpha=alpha))
    model = toy(dgg, 1, tmp_path, grad=0.5)
    step(dgg, model, n=n)
    rate = dgg.metrics()["dgg/injection_rate"]
    assert abs(rate - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n), rate  # 4 binomial std devs


def draws(seed: int, index: int, tmp_path: Path, n: int = 200) -> list[bool]:
    dgg = DGG(opts=DGGConfig(alpha=0.5))
    dgg.begin(torch.nn.Linear(2, 2), ctx(index, tmp_path, seed=seed))
    return [dgg.draw() for _ in range(n)]


def test_draws_agree_across_instances_and_differ_across_tasks(tmp_path: Path) -> None:
    torch.manual_seed(123)  # the global RNG (which differs per rank in practice) must not matter
    first = draws(seed=7, index=2, tmp_path=tmp_path)
    torch.manual_seed(456)
    assert draws(seed=7, index=2, tmp_path=tmp_path) == first  # two ranks, same (seed, task)
    assert draws(seed=7, index=3, tmp_path=tmp_path) != first
    assert draws(seed=8, index=2, tmp_path=tmp_path) != first
    assert 60 < sum(first) < 140


def test_per_task_alpha(tmp_path: Path) -> None:
    dgg = DGG(opts=DGGConfig(alpha=(0.0, 1.0, 0.3)))
    rates = {}
    for index in (1, 2, 5):  # task 5 repeats the list's last value
        model = toy(dgg, index, tmp_path, grad=0.5)
        step(dgg, model, n=2000)
        rates[index] = dgg.metrics()["dgg/injection_rate"]
    assert dgg.alpha == 0.3
    assert rates[1] == 1.0
    assert abs(rates[2] - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    assert abs(rates[5] - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    toy(dgg, 0, tmp_path, grad=0.5)
    assert dgg.alpha == 0.0


def test_without_bernoulli_injects_every_step(tmp_path: Path) -> None:
    dgg = DGG(opts=DGGConfig(alpha=0.1, bernoulli=False))
    model = toy(dgg, 1, tmp_path, grad=0.5)
    step(dgg, model, n=50)
    assert dgg.metrics()["dgg/injection_rate"] == 1.0


# ---- which rows it trains on ------------------------------------------------------------------

def tables() -> dict[str, pa.Table]:
    return {t: generate_task(t, 0, n_train=6, n_val=0, n_test=0) for t in ("colour", "shape")}


@pytest.mark.parametrize("replay", [True, False])
def test_replay_switch_decides_the_rows(replay: bool, tmp_path: Path) -> None:
    data = tables()
    dgg = DGG(opts=DGGConfig(per_task=2, replay=replay))
    dgg.after_task(ctx(0, tmp_path, name="colour"), data["colour"])
    rows = dgg.training_table(ctx(1, tmp_path, name="shape"), data["shape"])
    shape_ids, colour_ids = data["shape"]["id"].to_pylist(), set(data["colour"]["id"].to_pylist())
    assert rows["id"].to_pylist()[:6] == shape_ids
    replayed = rows["id"].to_pylist()[6:]
    if replay:
        assert len(replayed) == 2 and set(replayed) <= colour_ids
    else:  # ĝ only: the current task's rows, and no raw rows of earlier tasks are kept at all
        assert replayed == []
        assert not (tmp_path / "buffer").exists()


# ---- a real run on the test backbone ------------------------------------------------------------

def train_rows(task: str) -> pa.Table:
    table = generate_task(task, 0, n_train=32, n_val=0, n_test=0)
    return table.filter(pc.equal(table["split"], "train"))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


def test_guidance_pulls_the_adapter_toward_theta_star(test_spec, backbone_dir, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = TrainConfig(steps=8, batch_size=4, lr=5e-3)
    first = ctx(0, state, name="colour")
    train_task(*load_backbone(test_spec, backbone_dir), DGG(adapter=LORA, opts=DGGConfig(alpha=1.0)), first,
               train_rows("colour"), cfg, Collector(tmp_path / "r0", install_to=first.adapters_dir / "shared"))
    theta_star = load_file(str(first.adapters_dir / "shared" / "adapter_model.safetensors"))

    second = ctx(1, state, name="shape")
    results = {}
    for label, opts in (("guided", DGGConfig(alpha=1.0, bernoulli=False, replay=False)),
                        ("plain", DGGConfig(alpha=0.0, replay=False))):
        report = Collector(tmp_path / label)
        final = train_task(*load_backbone(test_spec, backbone_dir), DGG(adapter=LORA, opts=opts), second,
                           train_rows("shape"), cfg, report)
        after = load_file(str(report.reports[-1][1] / "adapter" / "adapter_model.safetensors"))
        results[label] = (distance(after, theta_star), final)
    (guided, guided_metrics), (plain, plain_metrics) = results["guided"], results["plain"]
    assert guided_metrics["dgg/injection_rate"] == 1.0 and guided_metrics["dgg/d_norm"] > 0
    assert plain_metrics["dgg/injection_rate"] == 0.0
    assert 0 < guided < 0.8 * plain, (guided, plain)
