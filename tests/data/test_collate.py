"""Collate: the backbone's chat template, loss on answer tokens only, left padding for generation."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest
import torch

from strata.backbone.load import load_backbone
from strata.data.benchmark import generate_task
from strata.data.collate import IGNORE, collate, decode_image, encode_table
from strata.data.schema import HISTORY
from strata.data.template import EOS, LLAVA_CHAT, LLAVA_CHAT_TEMPLATE, Chat, render_answer, render_prompt


@pytest.fixture(scope="module")
def loaded(test_spec, backbone_dir):
    return load_backbone(test_spec, backbone_dir)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    # Different prompts and answers of different lengths, so padding is exercised.
    tasks = ("colour", "relation", "count")
    parts = [generate_task(t, 0, n_train=2, n_val=0, n_test=0) for t in tasks]
    return pa.concat_tables(parts)


@pytest.fixture(scope="module")
def encoded(loaded, table):
    return encode_table(loaded[1], table, with_answers=True)


def test_labels_cover_answer_tokens_only(loaded, table, encoded) -> None:
    tok = loaded[1].tokenizer
    for i, row in enumerate(table.to_pylist()):
        ids, labels, n_prompt = encoded.input_ids[i], encoded.labels[i], encoded.prompt_lengths[i]
        answer = render_answer(LLAVA_CHAT, row["prompt"], row["answer"])
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(labels) == n_prompt + len(answer_ids)
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert labels[n_prompt:] == answer_ids == ids[n_prompt:]
        assert IGNORE not in answer_ids
        assert answer_ids[-1] == tok.eos_token_id
        assert tok.decode(answer_ids) == f" {row['answer']}{EOS}"
        assert encoded.answers[i] == row["answer"]


def test_prompt_is_the_shared_template(loaded, table, encoded) -> None:
    processor = loaded[1]
    for i, row in enumerate(table.to_pylist()):
        assert processor.chat_template == LLAVA_CHAT_TEMPLATE  # its own (the recipe saves it), or the llava default
        alone = processor(text=[render_prompt(LLAVA_CHAT, row["prompt"], has_image=True)],
                          images=[decode_image(row["image"])], return_tensors="pt")
        assert encoded.input_ids[i][: encoded.prompt_lengths[i]] == alone["input_ids"][0].tolist()
        text = processor.tokenizer.decode(encoded.input_ids[i][: encoded.prompt_lengths[i]])
        assert text.startswith("USER: <image>") and text.endswith(f"{row['prompt']} ASSISTANT:")


def test_a_multi_turn_row_renders_llava_15s_conversation(loaded) -> None:
    history = [("What colour is it?", "red"), ("And its shape?", "circle")]
    assert render_prompt(LLAVA_CHAT, "How many?", True, history) == (
        "USER: <image>\nWhat colour is it? ASSISTANT: red</s>USER: And its shape? ASSISTANT: circle</s>"
        "USER: How many? ASSISTANT:")
    assert render_answer(LLAVA_CHAT, "How many?", "two", history) == " two</s>"
    table = generate_task("count", 0, n_train=1, n_val=0, n_test=0).drop_columns("history").append_column(
        "history", pa.array([[{"question": q, "answer": a} for q, a in history]], HISTORY))
    enc = encode_table(loaded[1], table, with_answers=True)
    n = enc.prompt_lengths[0]
    text = loaded[1].tokenizer.decode(enc.input_ids[0][:n])
    assert text.count("<image>") == loaded[0].config.image_seq_length  # the image only in the first turn
    assert text.endswith(f"ASSISTANT: circle</s>USER: {table['prompt'][0]} ASSISTANT:")
    assert loaded[1].tokenizer.decode([t for t in enc.labels[0] if t != IGNORE]) == f" {table['answer'][0]}</s>"


def test_without_answers_only_prompt(loaded, table, encoded) -> None:
    bare = encode_table(loaded[1], table, with_answers=False)
    assert bare.input_ids == [ids[:n] for ids, n in zip(encoded.input_ids, encoded.prompt_lengths)]
    assert all(set(lab) == {IGNORE} for lab in bare.labels)
    assert bare.answers == table["answer"].to_pylist()  # kept for scoring


def test_image_tokens_match_image_seq_length(loaded, encoded) -> None:
    model, processor = loaded
    image_id = model.config.image_token_index
    assert image_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    for ids in encoded.input_ids:
        assert ids.count(image_id) == model.config.image_seq_length == 9  # one token per grid cell
    size = processor.image_processor.crop_size["height"]
    assert [tuple(p.shape) for p in encoded.images["pixel_values"]] == [(3, size, size)] * len(encoded)
    assert set(encoded.images) == {"pixel_values"} and encoded.token_types == {}


@pytest.mark.parametrize("left_pad", [False, True])
def test_padding_and_attention_mask(loaded, encoded, left_pad: bool) -> None:
    pad = loaded[1].tokenizer.pad_token_id
    batch = collate(encoded, pad, left_pad=left_pad)
    lengths = [len(x) for x in encoded.input_ids]
    assert len(set(lengths)) > 1  # otherwise padding is not exercised
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape == (len(encoded), width)
    for i, n in enumerate(lengths):
        row, mask, labels = batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i]
        real = slice(width - n, width) if left_pad else slice(0, n)
        pads = slice(0, width - n) if left_pad else slice(n, width)
        assert row[real].tolist() == encoded.input_ids[i]
        assert labels[real].tolist() == encoded.labels[i]
        assert torch.all(row[pads] == pad) and torch.all(labels[pads] == IGNORE)
        assert torch.all(mask[real] == 1) and torch.all(mask[pads] == 0)
        assert int(mask.sum()) == n
    assert torch.equal(batch["pixel_values"], torch.stack(encoded.images["pixel_values"]))


def test_model_loss_counts_answer_tokens_only(loaded, encoded) -> None:
    model, processor = loaded
    batch = collate(encoded.select([0, 2]), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    # Recompute CE by hand over the answer positions only (next-token shift).
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual)
    n_answer = sum(len(encoded.input_ids[i]) - encoded.prompt_lengths[i] for i in (0, 2))
    assert int(keep.sum()) == n_answer


def test_select_keeps_rows_aligned(encoded) -> None:
    sub = encoded.select([2, 0])
    assert sub.input_ids == [encoded.input_ids[2], encoded.input_ids[0]]
    assert sub.answers == [encoded.answers[2], encoded.answers[0]]
    assert sub.images["pixel_values"][0] is encoded.images["pixel_values"][2]


def test_text_only_rows_are_refused_clearly(loaded, table) -> None:
    no_image = table.set_column(table.schema.get_field_index("image"), "image",
                                pa.array([None] * table.num_rows, pa.binary()))
    with pytest.raises(ValueError, match="text-only rows"):
        encode_table(loaded[1], no_image, with_answers=True)


def test_an_answer_the_template_does_not_end_gets_the_end_of_sequence_and_a_lost_answer_is_refused() -> None:
    no_eos = Chat("{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}\n{% endfor %}",
                  {"eos_token": EOS})
    assert render_answer(no_eos, "What colour?", "red") == "assistant: red</s>"  # the model must learn to stop
    drops = Chat("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'][-1]['text'] }}{% endif %}"
                 "{% endfor %}", {"eos_token": EOS})
    with pytest.raises(ValueError, match="does not write the answer after its generation prompt"):
        render_answer(drops, "What colour?", "red")


def test_a_processor_without_a_chat_template_is_refused(loaded) -> None:
    processor = copy.copy(loaded[1])
    processor.chat_template = None
    with pytest.raises(ValueError, match="has no chat template: load it with strata.backbone.load"):
        encode_table(processor, generate_task("colour", 0, 1, 0, 0), with_answers=True)
