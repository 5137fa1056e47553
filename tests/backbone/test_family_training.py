"""Families beside LLaVA on Strata's data path: tiny random Qwen2-VL, Qwen2.5-VL, Idefics3 and Gemma 3 checkpoints, saved
as a hub checkpoint is laid out, then rendered with their own chat templates, batched, trained,
decoded, pooled for the router, and reloaded with plain PEFT."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from family_models import save_checkpoint
from peft import PeftModel
from PIL import Image
from reporting import Collector
from transformers import AutoModelForImageTextToText

from strata.backbone.features import FEATURE_PARTS, pooled_features
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, BackboneSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import IGNORE, collate, encode_table
from strata.data.schema import HISTORY
from strata.generation import generate
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.train.loop import train_task

QWEN = ("<|im_start|>assistant\n", "<|im_end|>")
FAMILIES = {"llava_onevision": QWEN, "internvl": QWEN, "qwen2_vl": QWEN, "qwen2_5_vl": QWEN, "qwen3_vl": QWEN, "idefics3": ("Assistant:", "<end_of_utterance>"),
            "smolvlm": ("Assistant:", "<end_of_utterance>"),
            "gemma3": ("<start_of_turn>model\n", "<end_of_turn>")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param)
    save_checkpoint(request.param, path)
    return request.param, path


def rows(split: str, n: int = 24) -> pa.Table:
    table = generate_task("colour", 0, n_train=n, n_val=0, n_test=n)
    return table.filter(pc.equal(table["split"], split))


def test_the_answer_boundary_follows_the_familys_own_template(checkpoint) -> None:
    model_type, path = checkpoint
    _, processor = load_backbone(BackboneSpec(str(path)), path)
    generation_prompt, eos = FAMILIES[model_type]
    table = rows("train", 4)
    earlier = [{"question": "What shape is it?", "answer": "circle"}]
    table = table.drop_columns("history").append_column("history", pa.array([[], earlier, [], earlier], HISTORY))  # two multi-turn rows
    enc, bare = encode_table(processor, table, with_answers=True), encode_table(processor, table, with_answers=False)
    tok = processor.tokenizer
    for i, answer in enumerate(table["answer"].to_pylist()):
        n = enc.prompt_lengths[i]
        assert tok.decode(enc.input_ids[i][:n]).endswith(generation_prompt)
        assert enc.labels[i][:n] == [IGNORE] * n
        assert tok.decode(enc.labels[i][n:]).strip() == f"{answer}{eos}"  # the answer and its end, nothing else
        assert bare.input_ids[i] == enc.input_ids[i][:n]  # evaluation and serving prompt exactly as training did
        whole = tok(tok.decode(enc.input_ids[i]), add_special_tokens=False)["input_ids"]
        assert whole == enc.input_ids[i]  # tokenizing the rendered text in one piece gives the same ids
        prompt = tok.decode(enc.input_ids[i][:n])
        assert prompt.count(generation_prompt) == 1 + i % 2  # an earlier turn is the template's own turn
        if i % 2:
            assert f"circle{eos}" in prompt and prompt.index("shape") < prompt.index(table["prompt"][i].as_py())


def test_it_trains_decodes_routes_and_reloads_with_plain_peft(checkpoint, tmp_path: Path) -> None:
    _, path = checkpoint
    model, processor = load_backbone(BackboneSpec(str(path)), path)
    seqlora = make_strategy("seqlora", RunConfig(strategies=("seqlora",), adapter=AdapterSpec(visual_rank=4, text_rank=4)))
    report = Collector(tmp_path / "kept")
    cfg = TrainConfig(steps=30, batch_size=8, lr=5e-3, checkpoint_every=0, report_every=1)
    train_task(model, processor, seqlora, TaskContext(0, "colour", (), {}, str(tmp_path / "state")), rows("train"),
               cfg, report)
    losses = [m["loss"] for m, _ in report.reports]
    assert losses[-1] < losses[0] - 0.5, losses
    test = encode_table(processor, rows("test", 8), with_answers=False)
    answers = generate(model, processor, test, 4)
    assert all(a.finish_reason in ("stop", "length") for a in answers) and any(a.tokens for a in answers)
    assert pooled_features(model, processor, test).shape == (len(test), FEATURE_PARTS * model.config.text_config.hidden_size)
    # The saved adapter is plain PEFT: it loads onto the family's own model class and gives the same logits.
    adapter = report.reports[-1][1] / "adapter"
    fresh = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), adapter).eval()
    batch = collate(test, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)


def one_colour(sizes: tuple[tuple[int, int], ...], rgb: tuple[int, int, int], answer: str) -> pa.Table:
    """Rows asking the colour of plain pictures of the given sizes."""
    pictures = []
    for size in sizes:
        buffer = io.BytesIO()
        Image.new("RGB", size, rgb).save(buffer, format="PNG")
        pictures.append(buffer.getvalue())
    return pa.table({"image": pictures, "prompt": ["What colour is it?"] * len(sizes), "answer": [answer] * len(sizes)})


def test_qwen_batches_images_of_different_sizes(tmp_path: Path) -> None:
    save_checkpoint("qwen2_vl", tmp_path)
    model, processor = load_backbone(BackboneSpec(str(tmp_path)), tmp_path)
    enc = encode_table(processor, one_colour(((48, 48), (64, 32), (32, 64)), (200, 30, 30), "red"), with_answers=True)
    patches = [len(p) for p in enc.images["pixel_values"]]
    assert len(set(patches)) > 1  # each image keeps its own number of patch rows
    batch = collate(enc.select([2, 0, 1]), processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == sum(patches) and batch["image_grid_thw"].shape == (3, 3)
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert torch.equal(batch["mm_token_type_ids"].sum(1), image_tokens)
    assert image_tokens.tolist() == [p // 4 for p in (patches[2], patches[0], patches[1])]  # 2x2 patches merge into one
    with torch.no_grad():
        alone = model(**collate(enc.select([0]), processor.tokenizer.pad_token_id)).loss
        assert torch.isfinite(model(**batch).loss) and torch.isfinite(alone)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llava_onevision", "internvl"])
def test_tiled_images_of_different_tile_counts_batch_as_they_run_alone(model_type: str, tmp_path: Path) -> None:
    save_checkpoint(model_type, tmp_path)
    model, processor = load_backbone(BackboneSpec(str(tmp_path)), tmp_path)
    enc = encode_table(processor, one_colour(((48, 48), (100, 40), (40, 100)), (30, 30, 200), "blue"),
                       with_answers=True)
    tiles = [len(p) for p in enc.images["pixel_values"]]
    assert tiles[1] == tiles[2] > tiles[0]  # each image keeps its own tiles, no padding
    batch = collate(enc, processor.tokenizer.pad_token_id)
    if model_type == "internvl":  # every image's tiles in one tensor
        assert batch["pixel_values"].shape[0] == sum(tiles)
    else:  # padded to the most tiles; image_sizes says which are real
        assert batch["pixel_values"].shape[:2] == (3, max(tiles))
    together = model(**batch).logits
    for i in range(3):
        alone = model(**collate(enc.select([i]), processor.tokenizer.pad_token_id)).logits[0]
        torch.testing.assert_close(together[i, : len(alone)], alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl", "llava_onevision", "internvl"])
def test_a_mixed_adapter_batch_on_qwen_matches_peft_row_by_row(model_type: str, tmp_path: Path) -> None:
    """Serving's gathered LoRA on a tower that takes all images' patch rows in one tensor."""
    from strata.adapters.lora import add_adapter
    from strata.serving.mixed_lora import MixedLoRA

    save_checkpoint(model_type, tmp_path)
    model, processor = load_backbone(BackboneSpec(str(tmp_path)), tmp_path)
    torch.manual_seed(0)
    for name in ("a", "b"):
        model = add_adapter(model, name, AdapterSpec(visual_rank=4, text_rank=2))
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.normal_(0, 0.5)  # PEFT starts B at zero: give each adapter a real, distinct update
    enc = encode_table(processor, rows("test", 5), with_answers=False)
    adapters = ["a", None, "b", "a", "b"]
    tok = processor.tokenizer
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    batch = collate(enc, tok.pad_token_id, left_pad=True)
    batch.pop("labels")
    patches = [len(p) for p in enc.images["pixel_values"]]
    with MixedLoRA(model).select(adapters, patches) as mixed:
        together = mixed.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        logits = mixed(**batch).logits[:, -1]
    for i, name in enumerate(adapters):
        row = collate(enc.select([i]), tok.pad_token_id, left_pad=True)
        row.pop("labels")
        if name is None:
            with model.disable_adapter():
                alone, last = model.generate(**row, **kw), model(**row).logits[0, -1]
        else:
            model.set_adapter(name)
            alone, last = model.generate(**row, **kw), model(**row).logits[0, -1]
        torch.testing.assert_close(logits[i], last, atol=1e-4, rtol=1e-4)
        assert together[i].tolist() == alone[0, row["input_ids"].shape[1]:].tolist(), i
    assert not torch.allclose(logits[0], logits[2], atol=1e-3)  # the adapters really differ


def test_qlora_quantizes_the_lm_only_and_trains(checkpoint, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    from strata.backbone.families import family_of

    _, path = checkpoint
    model, processor = load_backbone(BackboneSpec(str(path), quantization="4bit"), path)
    family = family_of(model.config)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 21 and not any(family.is_vision(n) for n in quantized)  # 3 LM layers x 7 linears
    report = Collector()
    seqlora = make_strategy("seqlora", RunConfig(strategies=("seqlora",), adapter=AdapterSpec(visual_rank=4, text_rank=4)))
    train_task(model, processor, seqlora, TaskContext(0, "colour", (), {}, str(tmp_path)), rows("train"),
               TrainConfig(steps=20, batch_size=8, lr=5e-3, checkpoint_every=0, report_every=1), report)
    losses = [m["loss"] for m, _ in report.reports]
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.integration
def test_strata_run_learns_a_stream_on_a_qwen_checkpoint(tmp_path: Path) -> None:
    """The whole pipeline (registry, gate, Decoupled's router) on a family other than LLaVA."""
    import json

    from typer.testing import CliRunner

    from strata import cli
    from strata.backbone.load import fingerprint

    save_checkpoint("qwen2_vl", tmp_path / "qwen")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.app, ["run", "--backbone", str(tmp_path / "qwen"), "--tasks", "2", "--steps", "10",
                                          "--test-rows", "16", "--strategy", "seqlora", "--strategy", "decoupled",
                                          "--executor", "local", "--gate", "report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decoupled"]["router_accuracy"] >= 50.0
    assert all(len(summary[s]["accuracy_matrix"]) == 2 for s in ("seqlora", "decoupled"))
    cards = [json.loads(c.read_text()) for c in (out / "registry").rglob("card.json")]
    assert len(cards) == 4  # 2 strategies x 2 tasks, each pinned to this backbone
    assert {c["backbone"]["fingerprint"] for c in cards} == {fingerprint(tmp_path / "qwen")}


def test_a_checkpoint_without_a_chat_template_is_refused_unless_its_family_has_one(tmp_path: Path) -> None:
    save_checkpoint("gemma3", tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template, and the gemma3 family has no default"):
        load_backbone(BackboneSpec(str(tmp_path)), tmp_path)
