"""Strategies, one table row each: frozen backbone, adapter naming, which rows each trains on."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from strata.adapters.lora import save_adapter
from strata.config import AdapterSpec, RunConfig
from strata.data.benchmark import generate_task
from strata.data.schema import write_table
from strata.hooks import TaskContext
from strata.routing import LOW_CONFIDENCE, ROUTER_FILE, PrototypeRouter, Routed
from strata.strategies import builtin, make_strategy, names
from strata.strategies.decoupled import DecoupledConfig
from strata.strategies.dgg import DGGConfig
from strata.strategies.replay import ReplayConfig

# name -> (shared adapter?, which earlier rows it trains on)
TABLE = {
    "seqlora": (True, "none"),
    "replay": (True, "buffer"),
    "decoupled": (False, "none"),
    "multitask": (True, "all"),
    "ewc": (True, "none"),
    "lwf": (True, "none"),
    "dgg": (True, "buffer"),
    "mode": (True, "none"),
    "cma": (True, "none"),
}
TASKS = ("colour", "shape", "count")


def test_table_covers_every_strategy() -> None:
    assert set(TABLE) == set(builtin())  # tests may register their own


def cfg(replay_per_task: int | None = None) -> RunConfig:
    options = {} if replay_per_task is None else {
        "replay": ReplayConfig(per_task=replay_per_task), "dgg": DGGConfig(per_task=replay_per_task)}
    return RunConfig(strategies=tuple(names()), adapter=AdapterSpec(visual_rank=2, text_rank=4), options=options)


def ctx_for(t: int, state: Path, train_paths: dict[str, str] | None = None) -> TaskContext:
    return TaskContext(t, TASKS[t], TASKS[:t], dict(train_paths or {}), str(state))


@pytest.fixture(scope="module")
def train_tables() -> dict[str, pa.Table]:
    return {t: generate_task(t, 0, n_train=6, n_val=0, n_test=0) for t in TASKS}


@pytest.mark.parametrize("name", list(TABLE))
def test_make_strategy_uses_run_config(name: str) -> None:
    strategy = make_strategy(name, cfg(replay_per_task=7))
    assert strategy.name == name
    assert strategy.adapter == AdapterSpec(visual_rank=2, text_rank=4)
    assert strategy.shared is TABLE[name][0]
    if name in ("replay", "dgg"):
        assert strategy.opts.per_task == 7


def test_make_strategy_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'ewc9'"):
        make_strategy("ewc9", cfg())


@pytest.mark.parametrize("name", list(TABLE))
def test_adapter_name_and_eval_adapters(name: str, tmp_path: Path) -> None:
    strategy = make_strategy(name, cfg())
    first, third = ctx_for(0, tmp_path), ctx_for(2, tmp_path)
    if TABLE[name][0]:
        assert strategy.adapter_name(first) == strategy.adapter_name(third) == "shared"
        assert strategy.eval_adapters(third) == ["shared"]
    else:
        assert strategy.adapter_name(first) == "colour"
        assert strategy.adapter_name(third) == "count"
        assert strategy.eval_adapters(first) == ["colour"]
        assert strategy.eval_adapters(third) == ["colour", "shape", "count"]


def assert_only_adapter_trainable(model: torch.nn.Module, adapter: str) -> list[str]:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "no trainable parameters"
    assert all("lora_" in n and f".{adapter}." in n for n in trainable), trainable[:5]
    # Both sides of the adapter train (visual_rank and text_rank are both > 0).
    assert any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert any("language_model" in n for n in trainable)
    frozen_backbone = [n for n, p in model.named_parameters() if "lora_" not in n]
    params = dict(model.named_parameters())
    assert frozen_backbone and not any(params[n].requires_grad for n in frozen_backbone)
    return trainable


@pytest.mark.parametrize("name", ["seqlora", "replay", "decoupled", "multitask", "dgg", "lwf"])
def test_before_task_trains_only_lora(name: str, test_spec, backbone_dir, tmp_path: Path) -> None:
    from strata.backbone.load import load_backbone

    strategy = make_strategy(name, cfg())
    first = ctx_for(0, tmp_path)
    model = strategy.before_task(*load_backbone(test_spec, backbone_dir), first)
    assert_only_adapter_trainable(model, strategy.adapter_name(first))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.25)  # "trained" weights, so continuing from them is observable
    name1 = strategy.adapter_name(first)
    save_adapter(model, name1, first.adapters_dir / name1)

    second = ctx_for(1, tmp_path)
    model2 = strategy.before_task(*load_backbone(test_spec, backbone_dir), second)
    trainable = assert_only_adapter_trainable(model2, strategy.adapter_name(second))
    params = dict(model2.named_parameters())
    continued = all(torch.all(params[n] == 0.25) for n in trainable if "lora_B" in n)
    # Shared strategies continue from the saved adapter; decoupled starts a fresh one per task.
    assert continued is TABLE[name][0]


def write_train_paths(tables: dict[str, pa.Table], root: Path, upto: int) -> dict[str, str]:
    paths = {}
    for t in TASKS[: upto + 1]:
        paths[t] = str(write_table(tables[t], root / "data" / f"{t}.train.parquet"))
    return paths


def ids(table: pa.Table) -> list[str]:
    return table["id"].to_pylist()


@pytest.mark.parametrize("name", list(TABLE))
def test_training_table(name: str, train_tables, tmp_path: Path) -> None:
    strategy = make_strategy(name, cfg(replay_per_task=2))
    state = tmp_path / "state"
    expected_earlier: list[str] = []
    for t, task in enumerate(TASKS):
        ctx = ctx_for(t, state, write_train_paths(train_tables, tmp_path, t))
        current = train_tables[task]
        rows = strategy.training_table(ctx, current)
        mode = TABLE[name][1]
        if mode == "none":
            assert ids(rows) == ids(current)
        elif mode == "all":
            assert ids(rows) == [i for s in TASKS[: t + 1] for i in ids(train_tables[s])]
        else:  # current rows + the buffer's rows of earlier tasks, never the current task's own
            assert ids(rows)[: current.num_rows] == ids(current)
            assert sorted(ids(rows)[current.num_rows :]) == sorted(expected_earlier)
            assert len(expected_earlier) == 2 * t
        if mode == "buffer":  # replay and DGG keep rows here; the others keep none (or not in this hook)
            strategy.after_task(ctx, current)
            expected_earlier = ids(strategy.buffer(ctx).rows())


def test_replay_excludes_the_current_task_when_retrained(train_tables, tmp_path: Path) -> None:
    strategy = make_strategy("replay", cfg(replay_per_task=3))
    ctx0 = ctx_for(0, tmp_path)
    strategy.after_task(ctx0, train_tables["colour"])
    again = strategy.training_table(ctx0, train_tables["colour"])
    assert ids(again) == ids(train_tables["colour"])  # its own reservoir is not added twice
    ctx1 = ctx_for(1, tmp_path)
    mixed = strategy.training_table(ctx1, train_tables["shape"])
    assert mixed.num_rows == train_tables["shape"].num_rows + 3
    assert mixed.schema == train_tables["shape"].schema


def test_decoupled_routing_option_is_validated() -> None:
    with pytest.raises(ValueError, match="decoupled.routing must be 'auto' or 'name'"):
        DecoupledConfig(routing="random")


# ---- PrototypeRouter ---------------------------------------------------------------------------

def clusters(seed: int, n: int = 40, d: int = 8, spread: float = 6.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:3] * spread
    names = ("a", "b", "c")
    return {name: centres[i] + torch.randn(n, d, generator=gen) for i, name in enumerate(names)}


def fitted_router() -> PrototypeRouter:
    router = PrototypeRouter()
    for name, feats in clusters(0).items():
        router = router.add(name, feats)
    return router


def test_router_routes_well_separated_clusters() -> None:
    router = fitted_router()
    assert router.names == ["a", "b", "c"]
    assert router.means.shape == (3, 8)
    assert router.counts.tolist() == [40.0, 40.0, 40.0]
    for name, feats in clusters(1).items():  # fresh samples from the same clusters
        assert router.route(feats) == [name] * len(feats)


def test_a_row_far_from_every_task_goes_to_the_nearest_flagged() -> None:
    router = fitted_router()
    fresh = clusters(5)
    for name, feats in fresh.items():
        routed = router.assign(feats)
        assert [r.task for r in routed] == [name] * len(feats)
        distances = torch.tensor([r.distance for r in routed])
        assert 0.5 < float(distances.mean()) < 2.0  # a task's own rows sit near 1
        assert sum(r.low_confidence for r in routed) <= 1
    stranger = fresh["a"] + torch.eye(8)[7] * 30.0  # nowhere near any cluster, still nearest to "a"
    routed = router.assign(stranger)
    assert all(r.task == "a" and r.low_confidence and r.distance > LOW_CONFIDENCE for r in routed)
    assert not Routed("a").low_confidence  # routed by name: no distance, never flagged


def test_router_uses_covariance_not_plain_distance() -> None:
    # Two tasks differ only along dim 0; dim 1 is shared and very noisy. Euclidean distance to the
    # means is dominated by dim-1 noise, the within-task covariance down-weights it.
    gen = torch.Generator().manual_seed(0)
    def sample(offset: float) -> torch.Tensor:
        x = torch.randn(200, 2, generator=gen)
        return torch.stack([x[:, 0] * 0.1 + offset, x[:, 1] * 20.0], dim=1)
    router = PrototypeRouter().add("left", sample(-1.0)).add("right", sample(1.0))
    test = sample(1.0)
    euclid = (test[:, None] - router.means[None]).norm(dim=-1).argmin(1)
    assert (euclid == 1).sum() < 150  # plain nearest mean is close to a coin flip here
    assert router.route(test).count("right") >= 195


def test_router_replacing_a_task_keeps_one_entry() -> None:
    router = fitted_router()
    # "a" moves from dim 0 to dim 4.
    moved = clusters(2)["a"] - torch.eye(8)[0] * 6.0 + torch.eye(8)[4] * 6.0
    before = fitted_router()
    router = router.add("a", moved)
    assert before.names == ["a", "b", "c"] and torch.equal(before.means, fitted_router().means)  # add copies
    assert sorted(router.names) == ["a", "b", "c"]
    assert router.means.shape == (3, 8) and router.scatters.shape == (3, 8, 8)
    torch.testing.assert_close(router.means[router.names.index("a")], moved.mean(0))
    probe = clusters(3)["a"] - torch.eye(8)[0] * 6.0 + torch.eye(8)[4] * 6.0
    assert router.route(probe) == ["a"] * len(probe)


def test_router_save_load_round_trip(tmp_path: Path) -> None:
    router = fitted_router()
    assert router.save(str(tmp_path)) == tmp_path / ROUTER_FILE
    assert [p.name for p in tmp_path.iterdir()] == ["router.safetensors"]  # no temp file left
    loaded = PrototypeRouter.load(tmp_path)
    assert PrototypeRouter.load(str(tmp_path)).names == router.names  # str or Path
    assert loaded.names == router.names
    assert torch.equal(loaded.counts, router.counts)
    assert torch.equal(loaded.means, router.means)
    assert torch.equal(loaded.scatters, router.scatters)
    probe = torch.cat(list(clusters(4).values()))
    assert loaded.route(probe) == router.route(probe)


def test_router_of_and_merge_combine_tasks_the_later_entry_winning() -> None:
    parts = [PrototypeRouter.of(name, feats) for name, feats in clusters(0).items()]
    assert [p.names for p in parts] == [["a"], ["b"], ["c"]]
    merged = PrototypeRouter.merge(parts)
    fitted = fitted_router()
    assert merged.names == fitted.names
    assert torch.equal(merged.means, fitted.means) and torch.equal(merged.scatters, fitted.scatters)
    assert torch.equal(merged.counts, fitted.counts)
    assert merged.only("b").names == ["b"]
    newer = PrototypeRouter.of("a", clusters(5)["b"])
    remerged = PrototypeRouter.merge([merged, newer])
    assert remerged.names == ["b", "c", "a"]  # a replaced task moves to the end
    torch.testing.assert_close(remerged.means[2], clusters(5)["b"].mean(0))
    assert PrototypeRouter.merge([]).names == []


def test_router_refuses_features_of_another_size() -> None:
    with pytest.raises(ValueError, match=r"prototypes of \['a', 'b', 'c'\] have 8 dims but the rows' features have 6"):
        fitted_router().route(torch.zeros(2, 6))


def test_empty_router_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no tasks"):
        PrototypeRouter().route(torch.zeros(2, 8))
    empty = PrototypeRouter.load(str(tmp_path))  # nothing saved yet
    assert empty.names == []
    with pytest.raises(RuntimeError, match="no tasks"):
        empty.route(torch.zeros(1, 8))
