"""Every built-in strategy runs a two-task stream end to end (training, evaluation, gate, registry) on
each family Strata trains, as it does on the built-in LLaVA (tests/test_devices.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_models import save_checkpoint
from peft import PeftModel
from transformers import AutoModelForImageTextToText

import strata
from strata.adapters.merge import merge_adapter
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.data.schema import write_table
from strata.registry import Ref, Registry
from strata.serving.host import AdapterHost, Request
from strata.strategies import builtin
from strata.strategies.cma import CMAConfig
from strata.strategies.mode import MoDEConfig


@pytest.mark.parametrize("model_type", ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "internvl"])
def test_every_strategy_runs_a_stream_on_the_family(model_type: str, tmp_path: Path) -> None:
    save_checkpoint(model_type, tmp_path / "model")
    # MoDE distils on reference rows; a checkpoint that is not built in brings its own.
    reference = write_table(generate_task("count", 1, 16, 0, 0), tmp_path / "reference.parquet")
    cfg = RunConfig(
        strategies=tuple(sorted(builtin())), tasks=2, out=str(tmp_path / "run"),
        backbone=BackboneSpec(str(tmp_path / "model")), adapter=AdapterSpec(visual_rank=2, text_rank=2),
        train=TrainConfig(steps=2, batch_size=2, executor="local", checkpoint_every=0),
        gate=GateConfig(mode="report"), n_train=16, n_val=4, n_test=4,
        options={"mode": MoDEConfig(experts=2, rank=2, reference=str(reference), reference_rows=8, kd_batch=2),
                 "cma": CMAConfig(memory=8, memory_batch=2)})
    results = strata.run(cfg)
    assert set(results) == set(builtin())
    assert all(len(r["accuracy_matrix"]) == 2 for r in results.values())
    # SeqLoRA's registered adapter is plain PEFT on the family's own model class.
    registry = Registry(str(tmp_path / "run" / "registry"))
    ref = Ref("default", "seqlora", registry.versions("default", "seqlora")[-1])
    adapter = registry.fetch(ref, tmp_path / "fetched")
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / "model"), str(adapter))
    # `adapters merge` folds it into the family's model; the merged checkpoint loads and answers alike.
    merged = merge_adapter(cfg.backbone, tmp_path / "model", adapter, tmp_path / "merged")
    model, processor = load_backbone(BackboneSpec(str(merged)), merged)
    batch = collate(encode_table(processor, generate_task("shape", 0, 4, 0, 0), with_answers=False),
                    processor.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, peft.eval()(**batch).logits, rtol=1e-4, atol=1e-4)
    # Served from the same registry: `default/auto` routes each row to a Decoupled task adapter.
    host = AdapterHost(registry.uri, cfg.backbone, capacity=4)
    rows = generate_task("colour", 0, 0, 0, 2).to_pylist()
    done = host.complete([Request("default/auto", r["prompt"], (r["image"],), max_tokens=3) for r in rows])
    assert all(c.route is not None and c.model.startswith(f"default/{c.route.task}@v") for c in done)
