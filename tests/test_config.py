"""Configs: from_dict fills nested dataclasses; unknown keys and bad values fail clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from strata.config import (
    AdapterSpec,
    BackboneSpec,
    RunConfig,
    TrainConfig,
    check_name,
    from_dict,
    smoke_test,
)
from strata.strategies import make_strategy, options_for, run_config
from strata.strategies.dgg import DGGConfig
from strata.strategies.replay import ReplayConfig


def test_from_dict_fills_nested_dataclasses_and_turns_lists_into_tuples(tmp_path: Path) -> None:
    raw = {
        "strategies": ["seqlora", "replay"],
        "tasks": 2,
        "backbone": {"source": str(tmp_path)},
        "adapter": {"visual_rank": 0, "text_rank": 4},
        "train": {"steps": 5, "batch_size": 6, "num_workers": 3},
    }
    cfg = run_config(raw, "run config")
    assert cfg.strategies == ("seqlora", "replay")
    assert isinstance(cfg.strategies, tuple)
    assert cfg.backbone == BackboneSpec(str(tmp_path))
    assert cfg.adapter == AdapterSpec(visual_rank=0, text_rank=4)
    assert cfg.train == TrainConfig(steps=5, batch_size=6, num_workers=3)
    # Fields not given keep their defaults, nested ones included.
    assert cfg.train.lr == TrainConfig().lr
    assert cfg.options == {}
    assert options_for(cfg, "replay") == ReplayConfig() == options_for(RunConfig(), "replay")


def test_strategy_sections_and_claimed_keys_fill_the_options() -> None:
    cfg = run_config({"strategies": ["dgg", "replay"], "dgg": {"alpha": 0.3}, "replay_per_task": 7})
    assert options_for(cfg, "dgg") == DGGConfig(per_task=7, alpha=0.3)
    assert options_for(cfg, "replay") == ReplayConfig(per_task=7)
    # A section's own per_task wins over the top-level key.
    cfg = run_config({"dgg": {"per_task": 3}, "replay_per_task": 7})
    assert (options_for(cfg, "dgg").per_task, options_for(cfg, "replay").per_task) == (3, 7)
    assert options_for(RunConfig(options={"dgg": DGGConfig(alpha=0.5)}), "dgg").alpha == 0.5
    assert options_for(RunConfig(), "dgg") == DGGConfig()


def test_from_dict_empty_mapping_is_the_default() -> None:
    assert run_config({}) == RunConfig()


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) in run config: stratgies") as e:
        run_config({"stratgies": ["seqlora"]}, "run config")
    assert "strategies" in str(e.value)  # the known keys are listed to help fix the typo


def test_unknown_nested_key_names_key_and_where() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) in run config\.train: stepz"):
        run_config({"train": {"stepz": 3}}, "run config")
    with pytest.raises(ValueError, match=r"in run config\.adapter: rank"):
        run_config({"adapter": {"rank": 3}}, "run config")


def test_from_dict_refuses_a_non_mapping() -> None:
    with pytest.raises(ValueError, match=r"run config\.train must be a mapping, got list"):
        from_dict(TrainConfig, [1, 2], "run config.train")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "builtin:huge"}, r"unknown built-in backbone 'builtin:huge'; known:"),
        (
            {"source": "/no/such/model/dir"},
            r"'/no/such/model/dir' is neither builtin:\* nor a local directory",
        ),
        ({"quantization": "3bit"}, r"quantization must be None, '4bit' or '8bit', got '3bit'"),
    ],
)
def test_backbone_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackboneSpec(**kwargs)


def test_backbone_spec_accepts_builtin_and_local_dir(tmp_path: Path) -> None:
    assert BackboneSpec("builtin:test").source == "builtin:test"
    assert BackboneSpec(str(tmp_path), quantization="4bit").quantization == "4bit"


def test_adapter_spec_refuses_both_ranks_zero() -> None:
    with pytest.raises(ValueError, match=r"not both 0 \(visual_rank=0, text_rank=0\)"):
        AdapterSpec(visual_rank=0, text_rank=0)
    with pytest.raises(ValueError, match=r"ranks must be >= 0"):
        AdapterSpec(visual_rank=-1, text_rank=8)
    with pytest.raises(ValueError, match=r"adapter dropout must be in \[0, 1\), got 1.0"):
        AdapterSpec(dropout=1.0)
    assert AdapterSpec(visual_rank=0, text_rank=4).visual_rank == 0


def test_train_config_batch_must_divide_across_workers() -> None:
    message = r"train.batch_size \(10\) must divide evenly across train.num_workers \(3\)"
    with pytest.raises(ValueError, match=message):
        TrainConfig(batch_size=10, num_workers=3)
    assert TrainConfig(batch_size=9, num_workers=3).num_workers == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, r"train.steps must be >= 1, got 0"),
        ({"num_workers": 0}, r"train.num_workers must be >= 1, got 0"),
        ({"lr": -1e-3}, r"train.lr must be >= 0, got -0.001"),
        ({"max_failures": -1}, r"train.max_failures must be >= 0"),
        ({"resources_per_worker": {"GPU": 1}}, r"train.resources_per_worker\['GPU'\] must be a custom resource"),
    ],
)
def test_train_config_other_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_run_config_unknown_strategy_is_named() -> None:
    known = r"known: \['cma', 'decoupled', 'dgg'"
    with pytest.raises(ValueError, match=rf"unknown strategy 'ewc2'; {known}"):
        run_config({"strategies": ["seqlora", "ewc2"]})
    with pytest.raises(ValueError, match=rf"unknown strategy 'ewc2'; {known}"):
        make_strategy("ewc2", RunConfig(strategies=("seqlora", "ewc2")))  # built in Python: checked when built
    with pytest.raises(ValueError, match="at least one strategy"):
        RunConfig(strategies=())
    with pytest.raises(ValueError, match="tasks must be >= 1, got 0"):
        RunConfig(tasks=0)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("ewc", {"weight": -1.0}, r"ewc.weight must be >= 0, got -1.0"),
        ("ewc", {"fisher_rows": 0}, r"ewc.fisher_rows must be > 0, got 0"),
        ("lwf", {"temperature": 0.0}, r"lwf.temperature must be > 0, got 0.0"),
        ("decoupled", {"contrastive_weight": -0.1}, r"decoupled.contrastive_weight must be >= 0"),
        ("cma", {"preserve_temperature": 0.0}, r"cma.preserve_temperature must be > 0"),
        ("cma", {"align_weight": -1}, r"cma.align_weight must be >= 0"),
        ("cma", {"top_k": 11}, r"cma.top_k must be in \[1, cma.experts=10\], got 11"),
        ("dgg", {"alpha": [0.2, 1.5]}, r"dgg.alpha\[1\] must be in \[0, 1\], got 1.5"),
        ("mode", {"kd_weight": -0.3}, r"mode.kd_weight must be >= 0"),
    ],
)
def test_strategy_options_are_validated_with_their_names(section: str, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_config({section: values}, "run config")


def test_decoupled_refuses_adapter_kinds_that_cannot_share_a_model() -> None:
    # The check lives in the Decoupled strategy, which is built from the run config.
    with pytest.raises(ValueError, match=r"strategy 'decoupled' .* adapter.kind is 'bottleneck'"):
        make_strategy("decoupled", RunConfig(strategies=("decoupled",), adapter=AdapterSpec(kind="bottleneck")))
    cfg = RunConfig(strategies=("seqlora",), adapter=AdapterSpec(kind="bottleneck", placement="language_only"))
    make_strategy("seqlora", cfg)


def test_unknown_strategy_via_from_dict_is_named() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        run_config({"strategies": ["nope"]}, "run config")


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "", ".hidden", "..", "-flag", "a..b", "x" * 65, "a b", "a\\b"]
)
def test_check_name_refuses_unsafe_names(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        check_name(bad, "task name")


@pytest.mark.parametrize("good", ["colour_v2", "a", "Task-3.1", "x" * 64])
def test_check_name_accepts_plain_names(good: str) -> None:
    assert check_name(good, "task name") == good


def test_check_name_refuses_trailing_newline() -> None:
    with pytest.raises(ValueError):
        check_name("colour\n", "task name")


def test_check_name_refuses_non_strings() -> None:
    with pytest.raises(ValueError):
        check_name(None, "adapter name")  # type: ignore[arg-type]


def test_run_config_hash_is_stable_and_tracks_every_field() -> None:
    a = RunConfig()
    assert a.hash() == RunConfig().hash()
    assert len(a.hash()) == 16 and int(a.hash(), 16) >= 0
    assert a.hash() == run_config({"strategies": list(a.strategies)}).hash()
    changed = [
        dataclasses.replace(a, seed=1),
        dataclasses.replace(a, strategies=("seqlora",)),
        dataclasses.replace(a, train=TrainConfig(steps=7)),
        dataclasses.replace(a, adapter=AdapterSpec(visual_rank=4)),
        dataclasses.replace(a, backbone=BackboneSpec("builtin:test")),
    ]
    hashes = {c.hash() for c in changed}
    assert a.hash() not in hashes
    assert len(hashes) == len(changed)


def test_python_api_validates_before_doing_anything(tmp_path) -> None:
    import strata

    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        strata.run(strategies=["nope"], out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown key"):
        strata.run(train={"stepz": 3})
    assert not (tmp_path / "x").exists()


def test_smoke_test_shrinks_the_run_and_keeps_everything_else() -> None:
    cfg = RunConfig(strategies=("dgg",), tasks=8, seed=3, train=TrainConfig(steps=500, lr=1e-4, batch_size=16))
    small = smoke_test(cfg)
    assert (small.backbone.source, small.tasks, small.train.steps, small.n_test) == ("builtin:test", 2, 60, 80)
    assert (small.strategies, small.seed, small.train.batch_size) == (("dgg",), 3, 16)
    assert smoke_test(dataclasses.replace(cfg, tasks=2, train=TrainConfig(steps=10))).train.steps == 10
    qwen = dataclasses.replace(cfg, backbone=BackboneSpec("builtin:tiny-qwen2vl"))
    assert smoke_test(qwen).backbone.source == "builtin:test-qwen2vl"  # the same family, test-sized


def test_a_strategy_section_that_is_not_a_mapping_and_options_of_the_wrong_class_are_named() -> None:
    with pytest.raises(ValueError, match=r"run config\.dgg must be a mapping, got int"):
        run_config({"dgg": 5}, "run config")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in run config: seqlora"):  # it has no options
        run_config({"seqlora": {}}, "run config")
    with pytest.raises(ValueError, match="options of strategy 'dgg' must be a DGGConfig, got ReplayConfig"):
        make_strategy("dgg", RunConfig(options={"dgg": ReplayConfig()}))
