"""Every strategy feeds the model tensors on the model's device, in training and in `finish_task`.

CI has no GPU, and on a CPU-only box a batch that a strategy builds itself and never moves with
`.to(device)` works by accident. So on the CPU, `Tensor.to` marks what it returns, and while a
task trains the backbone refuses any input that never went through `.to`: the loop's batches
and every strategy's own batches (MoDE's KD reference, CMA's memory, EWC's Fisher rows, the
Decoupled router's rows) must all be moved. The `gpu` test runs the same stream on CUDA on Ray
Train, where a mismatch fails in torch itself; it is skipped without a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image
from transformers.models.llava import modeling_llava

import strata
import strata.train.driver as driver
from strata.config import AdapterSpec, BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.strategies import builtin

MOVED = "_strata_moved"
DATA = ("input_ids", "attention_mask", "pixel_values")  # what a batch carries into LlavaModel (counts are derived)


def run_config(backbone_dir, out, train: TrainConfig) -> RunConfig:
    from strata.strategies.cma import CMAConfig
    from strata.strategies.mode import MoDEConfig

    return RunConfig(
        strategies=tuple(sorted(builtin())), tasks=2, out=str(out), backbone=BackboneSpec(str(backbone_dir)),
        adapter=AdapterSpec(visual_rank=2, text_rank=2), train=train, gate=GateConfig(mode="report"),
        options={"mode": MoDEConfig(experts=2, rank=2, reference_rows=8, kd_batch=2),
                 "cma": CMAConfig(memory=8, memory_batch=2)},
        n_train=16, n_val=4, n_test=4)


@contextlib.contextmanager
def inputs_must_be_moved(monkeypatch):
    """While `train_task` runs, LLaVA refuses an input tensor that no `.to` call produced."""
    checking = []
    original_to, original_forward, original_train = torch.Tensor.to, modeling_llava.LlavaModel.forward, driver.train_task

    def to(self, *args, **kwargs):
        out = original_to(self, *args, **kwargs)
        if isinstance(out, torch.nn.Parameter) or out.requires_grad:
            return out  # module.to() and leaf parameters keep their identity
        out = out.view_as(out) if out is self else out  # a new object to mark, same storage
        setattr(out, MOVED, True)
        return out

    def forward(self, *args, **kwargs):
        if checking:
            for name in DATA:
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and not getattr(value, MOVED, False):
                    raise AssertionError(f"{checking[-1]}: model input {name!r} was never moved to the device")
        return original_forward(self, *args, **kwargs)

    def train_task(backbone, processor, strategy, *args, **kwargs):
        checking.append(strategy.name)
        try:
            return original_train(backbone, processor, strategy, *args, **kwargs)
        finally:
            checking.pop()

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(modeling_llava.LlavaModel, "forward", forward)
    monkeypatch.setattr(driver, "train_task", train_task)
    yield checking


def test_the_check_catches_a_batch_that_was_not_moved(backbone, monkeypatch) -> None:
    model, processor = backbone
    batch = processor(text=["USER: <image>\nhi ASSISTANT:"], images=[Image.new("RGB", (48, 48))], return_tensors="pt")
    with inputs_must_be_moved(monkeypatch) as checking:
        checking.append("probe")
        model(**{k: v.to("cpu") for k, v in batch.items()})  # moved: fine
        with pytest.raises(AssertionError, match="probe: model input 'input_ids' was never moved"):
            model(**batch)


def test_every_strategy_moves_what_it_feeds_the_model(backbone_dir, tmp_path, monkeypatch) -> None:
    train = TrainConfig(steps=2, batch_size=2, executor="local", checkpoint_every=0)
    with inputs_must_be_moved(monkeypatch):
        results = strata.run(run_config(backbone_dir, tmp_path, train))
    assert set(results) == set(builtin())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_strategy_trains_on_a_gpu_worker(backbone_dir, tmp_path) -> None:
    train = TrainConfig(steps=2, batch_size=2, use_gpu=True, checkpoint_every=0)
    results = strata.run(run_config(backbone_dir, tmp_path, train))
    assert all(len(r["accuracy_matrix"]) == 2 for r in results.values())
