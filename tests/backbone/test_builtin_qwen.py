"""The second built-in family: `builtin:test-qwen2vl`, a tiny Qwen2-VL built from the same recipe as the
built-in LLaVA (its tokenizer, chat template and processor are Qwen's), loads as a qwen2-vl model,
renders Qwen's turns, gives one LM token per grid cell, and learns a task through an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
from reporting import Collector

from strata.backbone.families import family_of
from strata.backbone.load import load_backbone
from strata.backbone.tiny import RECIPES, ensure_builtin
from strata.config import BUILTIN_BACKBONES, AdapterSpec, BackboneSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import encode_table
from strata.generation import generate
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.train.loop import train_task


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return ensure_builtin("builtin:test-qwen2vl")


def test_every_recipe_is_a_known_builtin_backbone() -> None:
    assert set(RECIPES) == set(BUILTIN_BACKBONES)


def test_it_is_a_qwen2_vl_with_qwens_turns_and_one_token_per_grid_cell(qwen_dir: Path) -> None:
    model, processor = load_backbone(BackboneSpec("builtin:test-qwen2vl"), qwen_dir)
    assert model.config.model_type == "qwen2_vl" and family_of(model.config).name == "qwen2-vl"
    assert json.loads((qwen_dir / "strata_recipe.json").read_text())["recipe"]["family"] == "qwen2_vl"
    table = generate_task("colour", 0, n_train=2, n_val=0, n_test=0)
    enc = encode_table(processor, table, with_answers=True)
    text = processor.tokenizer.decode(enc.input_ids[0])
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("<|im_end|>")
    assert text.count("<|image_pad|>") == 9  # 48x48 pixels, 8-pixel patches merged 2x2: the 3x3 grid
    tokens = processor.tokenizer.tokenize(" yes no colour shape")
    assert len(tokens) == 4  # ordinary words stay whole


def test_an_adapter_on_it_trains_and_answers_with_a_task_word(qwen_dir: Path, tmp_path: Path) -> None:
    model, processor = load_backbone(BackboneSpec("builtin:test-qwen2vl"), qwen_dir)
    table = generate_task("colour", 0, n_train=128, n_val=0, n_test=16)
    train = table.filter(pc.equal(table["split"], "train"))
    strategy = make_strategy("seqlora", RunConfig(adapter=AdapterSpec(visual_rank=4, text_rank=8)))
    report = Collector()
    train_task(model, processor, strategy, TaskContext(0, "colour", (), {}, str(tmp_path / "state")), train,
               TrainConfig(steps=60, batch_size=16, lr=3e-3, checkpoint_every=0, report_every=20), report)
    losses = [m["loss"] for m, _ in report.reports]
    assert losses[-1] < 0.5 * losses[0], losses
    test = encode_table(processor, table.filter(pc.equal(table["split"], "test")), with_answers=False)
    answers = {a.text for a in generate(model, processor, test, 4)}
    assert answers <= set(table["answer"].to_pylist()), answers  # colour words, whole, as trained
