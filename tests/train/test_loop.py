"""The training loop, run in-process (no Ray): it learns, reports the adapter, and never writes
anything but the current task's adapter (the backbone and earlier adapters stay bit-identical)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from reporting import Collector
from safetensors.torch import load_file

from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.hooks import Strategy, TaskContext
from strata.strategies import make_strategy
from strata.train.loop import EarlyStop, step_indices, train_task

LORA = AdapterSpec(visual_rank=4, text_rank=4)


def train_rows(task: str) -> pa.Table:
    table = generate_task(task, 0, n_train=64, n_val=8, n_test=8)
    return table.filter(pc.equal(table["split"], "train"))


@pytest.fixture(scope="module")
def rows() -> dict[str, pa.Table]:
    return {t: train_rows(t) for t in ("colour", "shape")}


def strategy(name: str) -> Strategy:
    return make_strategy(name, RunConfig(strategies=(name,), adapter=LORA))


def ctx(index: int, name: str, state: Path, seen: tuple[str, ...] = ()) -> TaskContext:
    return TaskContext(index, name, seen, {}, str(state))


# ---- step_indices ------------------------------------------------------------------------------

def test_step_indices_deterministic_and_sized() -> None:
    cfg = TrainConfig(steps=25, batch_size=8, seed=3)
    batches = step_indices(20, cfg, task_index=1)
    assert batches == step_indices(20, cfg, task_index=1)
    assert len(batches) == 25
    assert all(len(b) == 8 for b in batches)
    assert all(0 <= i < 20 for b in batches for i in b)
    assert all(len(set(b)) == len(b) for b in batches[:2])  # the first epoch has no repeats
    flat = [i for b in batches for i in b]
    assert sorted(flat[:20]) == list(range(20))  # every row once per epoch
    assert batches != step_indices(20, cfg, task_index=2)
    assert batches != step_indices(20, TrainConfig(steps=25, batch_size=8, seed=4), task_index=1)


def test_step_indices_full_batches_when_rows_fewer_than_batch() -> None:
    batches = step_indices(3, TrainConfig(steps=4, batch_size=8, num_workers=2), task_index=0)
    assert all(len(b) == 8 for b in batches)


# ---- train_task --------------------------------------------------------------------------------

def test_loss_decreases_and_final_report_holds_the_adapter(backbone, rows, tmp_path: Path) -> None:
    model, processor = backbone
    report = Collector(tmp_path / "kept")
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, checkpoint_every=0, report_every=4)
    final = train_task(model, processor, strategy("seqlora"), ctx(0, "colour", tmp_path / "state"),
                       rows["colour"], cfg, report, log_every=5)
    metrics = [m for m, _ in report.reports]
    assert [m["step"] for m in metrics] == [4, 8, 12, 16, 20, 24, 28, 30]  # every report_every, and the end
    assert all(m["task"] == "colour" for m in metrics)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"], [m["loss"] for m in metrics]
    assert final == metrics[-1]
    assert final["trainable_params"] > 0 and 0 < final["trainable_pct"] < 100
    # Without periodic checkpoints only the final report carries one: the adapter in PEFT's format.
    assert [c is None for _, c in report.reports] == [True] * 7 + [False]
    ckpt = report.reports[-1][1] / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it trained
    assert not any("lora_" not in k for k in weights)  # adapter only, never backbone weights


def test_training_is_reproducible(test_spec, backbone_dir, rows, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, batch_size=2)
    digests = []
    for run in range(2):
        model, processor = load_backbone(test_spec, backbone_dir)
        report = Collector(tmp_path / f"run{run}")
        c = ctx(0, "colour", tmp_path)
        train_task(model, processor, strategy("seqlora"), c, rows["colour"], cfg, report)
        digests.append(load_file(str(report.reports[-1][1] / "adapter" / "adapter_model.safetensors")))
    assert digests[0].keys() == digests[1].keys()
    assert all(torch.equal(digests[0][k], digests[1][k]) for k in digests[0])


class NoAdapter(Strategy):
    name = "no-adapter"

    def before_task(self, backbone, processor, ctx):
        return backbone


def test_strategy_without_trainable_params_is_refused(backbone, rows, tmp_path: Path) -> None:
    model, processor = backbone
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        train_task(model, processor, NoAdapter(), ctx(0, "colour", tmp_path), rows["colour"],
                   TrainConfig(steps=1, batch_size=2), Collector(tmp_path))


class FinishRecorder(Strategy):
    """Plain sequential LoRA whose finish_task records what it was given and writes one state file."""

    name = "finish-recorder"

    def finish_task(self, model, processor, ctx, train, dest):
        self.seen_finish = (model.training, train["id"].to_pylist())
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "note.txt").write_text(ctx.name)


@pytest.mark.parametrize("own", [True, False], ids=["task_rows", "default"])
def test_finish_task_gets_the_trained_model_and_its_files_travel_in_the_final_checkpoint(
    own: bool, backbone, rows, tmp_path: Path
) -> None:
    model, processor = backbone
    mixed = pa.concat_tables([rows["colour"], rows["shape"].slice(0, 4)])  # as replay would train
    recorder, report = FinishRecorder(adapter=LORA), Collector(tmp_path / "ckpt")
    train_task(model, processor, recorder, ctx(0, "colour", tmp_path), mixed, TrainConfig(steps=2, batch_size=2),
               report, **({"task_rows": rows["colour"]} if own else {}))
    training, ids = recorder.seen_finish
    assert training is False  # after the last step, in eval mode
    assert ids == (rows["colour"] if own else mixed)["id"].to_pylist()
    final = report.reports[-1][1]
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "state"]
    assert (final / "state" / "note.txt").read_text() == "colour"
    assert all(ckpt is None or not (ckpt / "state").exists() for _, ckpt in report.reports[:-1])


# ---- isolation: the key property of the decoupled strategy -------------------------------------

def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def backbone_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own tensors, under their original names even after PEFT wrapped its layers."""
    state = model.state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert changed == []


def test_decoupled_task2_never_changes_task1_adapter_or_backbone(
    test_spec, backbone_dir, rows, tmp_path: Path
) -> None:
    decoupled = strategy("decoupled")
    state = tmp_path / "state"
    on_disk = file_hashes(backbone_dir)
    cfg = TrainConfig(steps=8, batch_size=4, lr=5e-3)

    # Task 1, trained and installed as the driver does.
    first_backbone, processor = load_backbone(test_spec, backbone_dir)
    original = {k: v.clone() for k, v in first_backbone.state_dict().items()}
    c1 = ctx(0, "colour", state)
    task1_dir = c1.adapters_dir / "colour"
    train_task(first_backbone, processor, decoupled, c1, rows["colour"], cfg,
               Collector(tmp_path / "r1", install_to=task1_dir))
    assert (task1_dir / "adapter_config.json").exists()
    task1_files = file_hashes(task1_dir)
    task1_weights = load_file(str(task1_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in task1_weights.items())
    assert_same_tensors(backbone_tensors(first_backbone), original)
    task1_in_memory = {k: v.clone() for k, v in first_backbone.state_dict().items() if "lora_" in k}
    assert task1_in_memory

    c2 = ctx(1, "shape", state, seen=("colour",))
    # Task 2 on a freshly loaded backbone, as a Ray worker would.
    fresh, processor2 = load_backbone(test_spec, backbone_dir)
    train_task(fresh, processor2, decoupled, c2, rows["shape"], cfg,
               Collector(tmp_path / "r2", install_to=c2.adapters_dir / "shape"))
    assert file_hashes(task1_dir) == task1_files
    assert_same_tensors(backbone_tensors(fresh), original)
    assert not any(".colour." in k for k in fresh.state_dict())  # task 1 was never loaded here

    # Task 2 again, on the same in-memory object that trained task 1.
    train_task(first_backbone, processor, decoupled, c2, rows["shape"], cfg,
               Collector(tmp_path / "r3", install_to=c2.adapters_dir / "shape"))
    assert file_hashes(task1_dir) == task1_files
    assert_same_tensors(backbone_tensors(first_backbone), original)
    now = first_backbone.state_dict()
    # Task 1's LoRA weights, still in this model, were not touched either.
    assert all(torch.equal(now[k], v) for k, v in task1_in_memory.items())
    assert any(".shape." in k for k in now)  # and task 2 really trained next to it

    assert sorted(p.name for p in c1.adapters_dir.iterdir()) == ["colour", "shape"]
    shape_weights = load_file(str(c2.adapters_dir / "shape" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in shape_weights.items())
    assert file_hashes(backbone_dir) == on_disk  # the backbone is never written


# ---- resumable checkpoints ---------------------------------------------------------------------

def test_resuming_from_a_checkpoint_matches_the_uninterrupted_run(test_spec, backbone_dir, rows, tmp_path: Path) -> None:
    """A worker restarted from the step-8 checkpoint ends with the same adapter as one that never stopped."""
    cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, checkpoint_every=4, report_every=1)
    whole = Collector(tmp_path / "whole")
    model, processor = load_backbone(test_spec, backbone_dir)
    train_task(model, processor, strategy("dgg"), ctx(0, "colour", tmp_path / "s1"), rows["colour"], cfg, whole)
    kept = {m["step"]: c for m, c in whole.reports if c is not None}
    assert sorted(kept) == [4, 8, 12]
    assert {p.name for p in (kept[8] / "resume").iterdir()} == {
        "trainable.safetensors", "optimizer.safetensors", "strategy.safetensors", "progress.json"}
    assert not any("base_layer" in k for k in load_file(str(kept[8] / "resume" / "trainable.safetensors")))

    resumed = Collector(tmp_path / "resumed")
    model, processor = load_backbone(test_spec, backbone_dir)
    final = train_task(model, processor, strategy("dgg"), ctx(0, "colour", tmp_path / "s2"), rows["colour"], cfg,
                       resumed, resume=kept[8])
    assert final["resumed_from"] == 8
    assert [m["step"] for m, _ in resumed.reports] == [9, 10, 11, 12]
    a = load_file(str(kept[12] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.reports[-1][1] / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert final["loss"] == pytest.approx(whole.reports[-1][0]["loss"], rel=1e-5)


def test_bf16_and_gradient_checkpointing_switches(test_spec, backbone_dir, rows, tmp_path: Path) -> None:
    """Checkpointing recomputes the same numbers; bf16 autocast trains the fp32 adapter to a close loss."""
    losses = {}
    for name, switches in {"plain": {}, "checkpointing": {"gradient_checkpointing": True},
                           "bf16": {"bf16": True}}.items():
        model, processor = load_backbone(test_spec, backbone_dir)
        report = Collector()
        train_task(model, processor, strategy("seqlora"), ctx(0, "colour", tmp_path / name), rows["colour"],
                   TrainConfig(steps=4, batch_size=4, checkpoint_every=0, report_every=1, **switches), report)
        losses[name] = [m["loss"] for m, _ in report.reports]
        if name == "checkpointing":
            assert model.is_gradient_checkpointing
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert losses["checkpointing"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["bf16"] != losses["plain"] and losses["bf16"] == pytest.approx(losses["plain"], rel=0.05)


# ---- early stopping ----------------------------------------------------------------------------

def test_early_stop_waits_for_patience_checks_without_a_one_percent_gain() -> None:
    stop = EarlyStop(patience=2)
    assert [stop.should_stop(x) for x in (1.0, 0.5, 0.499, 0.3, 0.3, 0.31)] == [False, False, False, False, False, True]
    small = EarlyStop(patience=2)  # near zero a 10% gain of 0.005 nats is not a gain
    assert [small.should_stop(x) for x in (0.05, 0.045, 0.041)] == [False, False, True]
    learned = EarlyStop(patience=2)  # under 0.01 nats per answer token the task is learned: stop at once
    assert [learned.should_stop(x) for x in (0.4, 0.02, 0.009)] == [False, False, True]


def test_a_task_stops_once_its_val_loss_stops_improving(backbone, rows, tmp_path: Path) -> None:
    model, processor = backbone
    report = Collector(tmp_path / "kept")
    # lr 0: the val loss never moves, so the checks at 5 (the first best), 10 and 15 end the task at 15.
    cfg = TrainConfig(steps=200, batch_size=4, lr=0.0, checkpoint_every=0, val_every=5, patience=2, report_every=1)
    val = rows["colour"].slice(0, 12)
    final = train_task(model, processor, strategy("seqlora"), ctx(0, "colour", tmp_path / "state"),
                       rows["colour"], cfg, report, val_rows=val)
    assert final["step"] == 15 and final["stopped_early"] and final["val_loss"] > 0
    assert [m["step"] for m, _ in report.reports] == list(range(1, 16))
    assert report.reports[-1][1] is not None  # the adapter at the stop is what gets installed
    # Without val rows (or with val_every 0) the cap is the number of steps.
    full = train_task(model, processor, strategy("seqlora"), ctx(0, "colour", tmp_path / "state2"),
                      rows["colour"], replace(cfg, steps=20, val_every=0), Collector(), val_rows=val)
    assert full["step"] == 20 and not full["stopped_early"] and full["val_loss"] is None
