"""Data parallelism changes nothing but speed: 2 workers (DDP, or DeepSpeed ZeRO-2/3 on gloo) at the same
global batch reach the 1-worker parameters, and DGG draws and scales the same ĝ on every rank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from family_models import save_checkpoint
from safetensors.torch import load_file

from strata.config import AdapterSpec, BackboneSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.schema import write_table
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.strategies.dgg import DGGConfig
from strata.train.driver import TaskJob, fit_local, fit_task

STEPS = 6

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task0(backbone_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return train_task0(backbone_dir, tmp_path_factory.mktemp("parity"))


def train_task0(backbone_dir: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """A state dir holding a DGG adapter trained on task 0 (θ* for task 1), and both tasks' rows."""
    paths = {}
    for task in ("colour", "shape"):
        table = generate_task(task, 0, n_train=64, n_val=0, n_test=0)
        paths[task] = str(write_table(table.filter(pc.equal(table["split"], "train")), root / f"{task}.parquet"))
    job = make_job(BackboneSpec(str(backbone_dir)), backbone_dir, root / "state", paths, 0, TrainConfig(steps=10, batch_size=8))
    fit_local(job)
    return root / "state", paths


def make_job(spec, backbone_dir, state: Path, paths: dict[str, str], index: int, train: TrainConfig) -> TaskJob:
    cfg = RunConfig(strategies=("dgg",), adapter=AdapterSpec(visual_rank=4, text_rank=4),
                    options={"dgg": DGGConfig(alpha=0.5, bernoulli=True)})
    task = ("colour", "shape")[index]
    ctx = TaskContext(index, task, ("colour",)[:index], paths, str(state), seed=0)
    return TaskJob(make_strategy("dgg", cfg), ctx, paths[task], train, spec, str(backbone_dir))


def train_task1(backbone_dir, task0, tmp: Path, **train) -> tuple[dict, dict[str, torch.Tensor]]:
    """DGG on task 1 from the same θ*, in a private copy of the state; returns (metrics, adapter weights)."""
    state, paths = task0
    shutil.copytree(state, tmp / "state")
    cfg = TrainConfig(steps=STEPS, batch_size=8, lr=3e-3, checkpoint_every=0, **train)
    job = make_job(BackboneSpec(str(backbone_dir)), backbone_dir, tmp / "state", paths, 1, cfg)
    metrics = fit_task(job, str(tmp / "ray"), "parity")
    weights = load_file(str(tmp / "state" / "adapters" / "shared" / "adapter_model.safetensors"))
    return metrics, weights


def assert_same_run(one: tuple[dict, dict], two: tuple[dict, dict]) -> None:
    (m1, w1), (m2, w2) = one, two
    assert m1["dgg/injection_rate"] == m2["dgg/injection_rate"] > 0  # the same Bernoulli draws on every rank
    assert m1["dgg/d_norm"] == pytest.approx(m2["dgg/d_norm"], rel=1e-4)  # ‖θ − θ*‖
    assert m1["dgg/grad_norm"] == pytest.approx(m2["dgg/grad_norm"], rel=1e-4)  # ‖∇L‖ over the global batch
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, f"2 workers drifted from 1 worker by {worst}"


@pytest.fixture(scope="module")
def one_worker(ray_cluster, backbone_dir, task0, tmp_path_factory):
    return train_task1(backbone_dir, task0, tmp_path_factory.mktemp("w1"), num_workers=1, cpus_per_worker=1)


def test_two_ddp_workers_match_one_worker(one_worker, backbone_dir, task0, tmp_path) -> None:
    assert_same_run(one_worker, train_task1(backbone_dir, task0, tmp_path, num_workers=2, cpus_per_worker=1))


def test_two_zero2_workers_match_one_worker(one_worker, backbone_dir, task0, tmp_path) -> None:
    assert_same_run(one_worker, train_task1(backbone_dir, task0, tmp_path, num_workers=2, cpus_per_worker=1,
                                            zero_stage=2))


def test_two_zero3_workers_match_one_worker(one_worker, backbone_dir, task0, tmp_path) -> None:
    """Stage 3 also partitions θ: DGG reads its fp32 fragments, and the adapter is gathered to save."""
    assert_same_run(one_worker, train_task1(backbone_dir, task0, tmp_path, num_workers=2, cpus_per_worker=1,
                                            zero_stage=3))


def test_two_zero2_workers_match_one_worker_on_qwen2_vl(ray_cluster, tmp_path) -> None:
    """Qwen's images are variable runs of patch rows in one tensor: each rank must get its own rows' runs."""
    save_checkpoint("qwen2_vl", tmp_path / "model")
    task0 = train_task0(tmp_path / "model", tmp_path / "task0")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = train_task1(tmp_path / "model", task0, tmp_path / "one", num_workers=1, cpus_per_worker=1)
    assert_same_run(one, train_task1(tmp_path / "model", task0, tmp_path / "two", num_workers=2, cpus_per_worker=1,
                                     zero_stage=2))


def test_zero_config_is_validated() -> None:
    with pytest.raises(ValueError, match="train.zero_offload needs train.zero_stage"):
        TrainConfig(zero_offload=True)
    with pytest.raises(ValueError, match="zero_stage must be null or one of"):
        TrainConfig(zero_stage=4)
