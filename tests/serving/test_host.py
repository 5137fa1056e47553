"""AdapterHost: registry versions served from one backbone, promotion and rollback live, LRU, `auto`."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace

import pytest
import torch
from lora_helper import offline, served_registry

from strata.data.benchmark import generate_task
from strata.registry import Ref, RegistryError
from strata.serving.host import AdapterHost, Request, UnknownAdapter
from strata.serving.openai import Limits, parse_chat


@pytest.fixture(scope="module")
def rows():
    """Test rows of two built-in tasks, as they arrive from a client."""
    return {t: generate_task(t, 0, n_train=0, n_val=0, n_test=4).to_pylist() for t in ("colour", "shape")}


@pytest.fixture(scope="module")
def registry(test_spec, backbone_dir, tmp_path_factory):
    """default/seqlora v1 (production) and v2 (candidate); default/colour and default/shape with prototypes."""
    return served_registry(tmp_path_factory.mktemp("host"), test_spec, backbone_dir)


def request(row: dict, model: str, max_tokens: int = 8) -> Request:
    return Request(model, row["prompt"], (row["image"],), max_tokens=max_tokens)


def test_answers_match_offline_peft_and_follow_promotion_and_rollback(registry, rows, test_spec, backbone_dir, tmp_path):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    row = rows["colour"][0]
    first = host.complete([request(row, "default/seqlora")])[0]
    assert first.model == "default/seqlora@v1"
    assert first.tokens == offline(registry, Ref("default", "seqlora", 1), row, test_spec, backbone_dir, tmp_path)
    registry.promote(Ref("default", "seqlora", 2))
    second = host.complete([request(row, "seqlora")])[0]  # bare adapter: the default stream
    assert second.model == "default/seqlora@v2"
    assert second.tokens == offline(registry, Ref("default", "seqlora", 2), row, test_spec, backbone_dir, tmp_path)
    registry.rollback("default", "seqlora")
    assert host.complete([request(row, "default/seqlora")])[0].model == "default/seqlora@v1"
    assert host.complete([request(row, "default/seqlora@v2")])[0].tokens == second.tokens  # pinned version


def test_a_multi_turn_request_is_answered_as_its_dataset_row_is_rendered(registry, rows, test_spec, backbone_dir,
                                                                          tmp_path):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    row = {**rows["colour"][0], "history": [{"question": "What shape is it?", "answer": "circle"}]}
    request = Request("default/seqlora", row["prompt"], (row["image"],), max_tokens=8, history=[("What shape is it?",
                                                                                              "circle")])
    done = host.complete([request])[0]
    assert done.tokens == offline(registry, Ref("default", "seqlora", 1), row, test_spec, backbone_dir, tmp_path)
    single = host.complete([Request("default/seqlora", row["prompt"], (row["image"],), max_tokens=8)])[0]
    assert done.prompt_tokens > single.prompt_tokens  # the earlier turn is in the prompt


def test_a_mixed_batch_larger_than_the_lru_matches_one_by_one(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=2)
    models = ["default/seqlora@v1", "default/seqlora@v2", "default/colour", "default/shape"] * 2
    batch = [request(rows["colour"][i % 4], m, max_tokens=3 + i % 3) for i, m in enumerate(models)]
    together = host.complete(batch)
    alone = [host.complete([r])[0] for r in batch]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert all(len(c.tokens) <= r.max_tokens for c, r in zip(together, batch))
    assert sum(host.stats.evictions.values()) > 0 and len(host.resident) == 2


def test_auto_routes_with_the_decoupled_prototypes(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec)
    got = host.complete([request(r, "default/auto") for t in ("colour", "shape") for r in rows[t]])
    assert [c.model for c in got] == ["default/colour@v1"] * 4 + ["default/shape@v1"] * 4
    assert [c.route.task for c in got] == ["colour"] * 4 + ["shape"] * 4
    assert all(c.route.distance > 0 for c in got)
    assert sum(host.stats.low_confidence.values()) == sum(c.route.low_confidence for c in got)
    assert host.complete([request(rows["colour"][0], "default/colour")])[0].route is None  # not routed


def test_unknown_and_invalid_ids_are_refused(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=1)
    row = rows["colour"][0]
    for bad, error, message in [("default/nope", UnknownAdapter, "no adapter default/nope"),
                                ("default/seqlora@v9", UnknownAdapter, "no version v9 of default/seqlora"),
                                ("../../etc/passwd", RegistryError, "invalid adapter id"),
                                ("other/seqlora", UnknownAdapter, "no adapter other/seqlora")]:
        with pytest.raises(error, match=message):
            host.complete([request(row, bad)])
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        AdapterHost(registry.uri, test_spec, capacity=0)


def test_sampling_rows_and_greedy_rows_share_a_call(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec)
    row = rows["colour"][0]
    greedy = request(row, "default/colour", max_tokens=5)
    sampled = Request("default/colour", row["prompt"], (row["image"],), max_tokens=5, temperature=1.5)
    torch.manual_seed(0)
    out = host.complete([sampled, greedy, sampled])
    assert out[1].tokens == host.complete([greedy])[0].tokens  # greedy rows are not disturbed by sampled ones
    assert all(len(c.tokens) <= 5 and c.finish_reason in ("stop", "length") for c in out)


def test_chat_messages_become_earlier_turns_the_question_and_its_image() -> None:
    png = "data:image/png;base64," + base64.b64encode(generate_task("colour", 0, 0, 0, 1)["image"][0].as_py()).decode()
    body = {"model": "default/colour", "messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "Shape?"}]},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "Colour?"}]}
    request, stream = parse_chat(body, Limits())
    assert (request.history, request.prompt, stream) == ((("Shape?", "circle"),), "Answer in one word. Colour?", None)
    assert request.images == (generate_task("colour", 0, 0, 0, 1)["image"][0].as_py(),)
    assert request.image_turns == (1, 0)  # the image opens the first turn, as a dataset row's does


def test_streamed_tokens_are_the_answer_and_a_cancelled_row_stops_while_the_rest_go_on(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    models = ["default/seqlora", "default/colour", "default/shape"]
    reqs = [Request(m, rows["colour"][i]["prompt"], (rows["colour"][i]["image"],), max_tokens=12, ignore_eos=True)
            for i, m in enumerate(models)]
    plain = host.complete(reqs)
    assert all(len(c.tokens) == 12 and c.finish_reason == "length" for c in plain)  # no early end of sequence
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    streamed = host.complete(reqs, on_token=lambda i, t: seen[i].append(t), cancelled=lambda i: i == 1 and len(seen[1]) >= 3)
    assert [seen[0], seen[2]] == [plain[0].tokens, plain[2].tokens]  # same greedy tokens, one at a time
    assert [c.tokens for c in streamed[::2]] == [plain[0].tokens, plain[2].tokens]
    assert len(seen[1]) == 3 and streamed[1].finish_reason == "cancelled" and streamed[1].tokens == plain[1].tokens[:3]
    assert host.stats.tokens == 36 + 12 + 3 + 12


def test_a_batch_ends_when_every_row_is_cancelled(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    reqs = [Request("default/seqlora", r["prompt"], (r["image"],), max_tokens=200, ignore_eos=True)
            for r in rows["shape"][:2]]
    counted: list[int] = []
    out = host.complete(reqs, on_token=lambda i, t: counted.append(i), cancelled=lambda i: len(counted) >= 4)
    assert len(counted) == 4 and all(c.finish_reason == "cancelled" for c in out)  # not 400 tokens


def test_text_only_questions_and_plain_prompts_are_answered_beside_image_rows(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    row = rows["colour"][0]
    reqs = [Request("default/colour", row["prompt"], (row["image"],), max_tokens=6),
            Request("default/seqlora", "Say a colour.", max_tokens=6),
            Request("default/shape", "red green", raw=True, max_tokens=6)]
    together = host.complete(reqs)
    assert [c.tokens for c in together] == [host.complete([r])[0].tokens for r in reqs]
    assert together[2].prompt_tokens == len(host.processor.tokenizer("red green")["input_ids"])  # no chat template


def test_text_deltas_add_up_to_the_answer_and_wait_at_most_three_tokens_for_a_character(test_spec, backbone_dir):
    from strata.backbone.load import load_backbone
    from strata.serving.stream import Detokenizer

    tok = load_backbone(test_spec, backbone_dir)[1].tokenizer
    for text in ("a red circle and 3 squares", "é über ☃ smile 😀 done"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        d = Detokenizer(tok)
        deltas = [d.add(t) for t in ids]
        assert "".join(deltas) + d.rest(tok.decode(ids).strip()) == tok.decode(ids).strip()
    garbage = Detokenizer(tok)  # 0xFE is never valid UTF-8 (an untrained model emits it): sent at once
    assert all(garbage.add(tok.convert_tokens_to_ids("þ")) == "\ufffd" for _ in range(4))
    split = Detokenizer(tok)  # 😀's four bytes as four byte tokens: nothing until the last
    assert [split.add(tok.convert_tokens_to_ids(c)) for c in "ðŁĺĢ"] == ["", "", "", "😀"]


def test_byte_fallback_tokens_hold_only_a_character_that_can_still_complete():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from strata.serving.stream import Detokenizer

    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "<0xFE>": 3, "\u2581caf": 4}
    spm = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>")
    d = Detokenizer(tok)
    assert [d.add(t) for t in (4, 1, 2, 4, 3)] == ["caf", "", "é", " caf", "\ufffd"]


def test_a_paused_batch_goes_on_with_its_own_tokens_as_if_never_paused(registry, rows, test_spec):
    host = AdapterHost(registry.uri, test_spec, capacity=4)
    reqs = [Request(m, r["prompt"], (r["image"],), max_tokens=10, ignore_eos=True)
            for m, r in zip(["default/seqlora", "default/colour", "default/auto"], rows["colour"])]
    whole = host.complete(reqs)
    first = host.complete(reqs, pause=lambda generated: generated >= 3)
    assert [c.finish_reason for c in first] == ["paused"] * 3 and all(len(c.tokens) == 3 for c in first)
    assert first[2].route is not None  # `auto` was routed once, and goes on under that exact version
    joined = Request("default/shape", rows["shape"][0]["prompt"], (rows["shape"][0]["image"],), max_tokens=10)
    again = host.complete([replace(r, model=c.model, continued=tuple(c.tokens)) for r, c in zip(reqs, first)]
                          + [joined])
    assert [(c.model, c.tokens, c.text, c.finish_reason) for c in again[:3]] == \
        [(c.model, c.tokens, c.text, c.finish_reason) for c in whole]
    assert [c.prompt_tokens for c in again[:3]] == [c.prompt_tokens for c in whole]
    assert again[3].tokens == host.complete([joined])[0].tokens  # the request that joined is answered as alone


def test_every_malformed_completion_or_chat_option_is_refused_by_field() -> None:
    from strata.serving.openai import ApiError, parse_completion

    png = "data:image/png;base64," + base64.b64encode(generate_task("colour", 0, 0, 0, 1)["image"][0].as_py()).decode()
    image = {"type": "image_url", "image_url": {"url": png}}
    chat = {"model": "default/colour", "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}]}
    cases = [
        (parse_completion, {"model": "m", "prompt": ""}, "prompt"),
        (parse_completion, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        (parse_completion, {"model": "m", "prompt": "a", "echo": True}, "prompt"),
        (parse_chat, {**chat, "stream_options": {"include_usage": True}}, "stream_options"),
        (parse_chat, {**chat, "ignore_eos": "yes"}, "ignore_eos"),
        (parse_chat, {**chat, "presence_penalty": 0.5}, "presence_penalty"),
        (parse_chat, {**chat, "messages": [{"role": "user", "content": [image] * 3 + [{"type": "text", "text": "?"}]}]},
         "messages"),
        (parse_chat, {**chat, "messages": [{"role": "assistant", "content": [image]}, *chat["messages"]]}, "messages[0]"),
    ]
    for parse, body, field in cases:
        with pytest.raises(ApiError) as e:
            parse(body, Limits(max_images=2))
        assert (e.value.status, e.value.param) == (400, field), (body, e.value.message)
    request, streaming = parse_completion({"model": "m", "prompt": ["once"], "stream": True,
                                           "stream_options": {"include_usage": True}}, Limits())
    assert request.raw and request.prompt == "once" and streaming.include_usage


def test_a_tap_hands_over_every_token_that_came_and_then_the_end() -> None:
    import threading

    from strata.serving.stream import Tap

    async def main() -> list:
        tap = Tap(asyncio.get_running_loop())
        worker = threading.Thread(target=lambda: ([tap.put(t) for t in (1, 2, 3)], tap.close()))
        worker.start()
        worker.join()
        await asyncio.sleep(0)  # the thread's hand-offs land on this loop
        return [await tap.drain(), await tap.drain(), await tap.drain()]

    assert asyncio.run(main()) == [[1, 2, 3], None, None]
