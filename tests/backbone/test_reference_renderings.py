"""Strata's rendering of a conversation, checked against each family's documented rendering.

Each family's offline processor (tests/family_models.py's tiny checkpoint; for LLaVA the built-in backbone's
processor) is given the chat template its published checkpoint ships (tests/chat_templates.py), loaded the
way training and serving load a checkpoint, and a two-turn conversation is rendered with render_prompt and
its history, the call training, evaluation and serving make: a user turn with one image and a question, the
assistant's answer, then a text-only user turn, up to the generation prompt. The rendering must equal the
checked-in reference (tests/backbone/renderings/<family>.txt) exactly, image placeholders as the template
writes them (before the processor expands them into image tokens). render_answer must then give exactly
the answer and the family's end of turn.

Where each reference comes from:

- llava: transformers docs, docs/source/en/model_doc/llava.md, "Formatting Prompts with Chat Templates":
  the two-turn example with llava-hf/llava-1.5-7b-hf and the multi-turn format the page gives,
  "USER: <image>\\n<prompt1> ASSISTANT: <answer1></s>USER: <prompt2> ASSISTANT:". The page prints that
  example with a stray "<" before "What’s" ("USER: <image>\\n<What’s shown..."), which no template writes;
  the reference is the page's format filled with the example, without that typo.
- llava_onevision: transformers docs, docs/source/en/model_doc/llava_onevision.md, use the same stop-sign
  conversation, but the output printed under it belongs to another conversation and an older template. The
  reference is derived by hand from the published template (llava-hf/llava-onevision-qwen2-0.5b-ov-hf), which
  renders "<|im_start|>user <image>\\n{question}<|im_end|><|im_start|>assistant\\n" as vLLM's test for that
  checkpoint prompts it.
- qwen2_vl, qwen2_5_vl: transformers docs, docs/source/en/model_doc/qwen2_vl.md and qwen2_5_vl.md,
  "Multiple Image Inputs", the default (no vision ids) expected output. That conversation has three user
  turns; the reference is that exact string with its middle exchange (the second user turn and its answer)
  left out by hand, so the first image turn, its answer and the last, text-only turn are the docs' text.
- qwen3_vl: the docs (qwen3_vl.md and the Qwen3-VL model cards) show single-turn code and no rendering; the
  reference is derived by hand from the published Qwen3-VL Instruct template (no default system turn), for
  the Qwen2-VL docs' conversation.
- idefics3: transformers tests/models/idefics3/test_processing_idefics3.py (test_apply_chat_template) gives
  HuggingFaceM4/Idefics3-8B-Llama3's rendering of a two-turn conversation. Its first user turn has its text
  before two images; Strata asks one image before the question, so that turn is derived by hand from the
  published template (an image-first turn opens "User:" without a space); the answer and the second turn
  are the test's text.
- smolvlm: the same conversation, derived by hand from HuggingFaceTB/SmolVLM-Instruct's template (the
  model card and transformers' smolvlm.md show single-turn code only).
- gemma3: Google's Gemma docs, "Chat with Gemma: basic and multi-turn conversations"
  (ai.google.dev/gemma/docs/capabilities/text/chat), multi-turn prompt; derived by hand with the "<bos>" and
  "<start_of_image>" that google/gemma-3-4b-it's template writes.
- internvl: transformers docs, docs/source/en/model_doc/internvl.md, show only decoded outputs ("user\\n\\n
  Write a haiku for this image\\nassistant\\nSilky lake, ..."); the reference is derived by hand from
  OpenGVLab/InternVL3-1B-hf's template with that example's question and answer, then the page's
  "Describe this image".

llava-1.5-7b-hf's published template disagrees with LLaVA's docs (an answered turn ends with a space, not
"</s>"): Strata renders what the checkpoint's template says, so that case is a strict xfail with the exact
difference (XFAIL below). That template and LLaVA-OneVision's ("assistant \\n" after an answered turn,
"assistant\\n" as the generation prompt) also used to break the answer boundary; `render_answer` now finds
the answer where its text starts and ends it with the end of sequence where the template does not, which is
what the documented turns show.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from chat_templates import PUBLISHED, PUBLISHED_SIZES, QWEN3_VL_SHA256
from family_models import save_checkpoint
from PIL import Image

from strata.backbone.families.llava import LLAVA
from strata.backbone.load import checkpoint_family, load_processor
from strata.backbone.tiny import RECIPES, build_processor
from strata.data.template import Chat, render_answer, render_prompt

RENDERINGS = Path(__file__).parent / "renderings"

STOP_SIGN = ("What’s shown in this image?", "This image shows a red stop sign.",
             "Describe the image in more details.")
QWEN = ("Hello, how are you?", "I'm doing well, thank you for asking. How can I assist you today?",
        "It was a trip to the mountains. Can you see the details in the images and video?")
IDEFICS = ("What do these images show?",
           ("The first image shows the statue of Liberty in New York. The second image picture depicts Idefix, "
            "the dog of Obelix in Asterix and Obelix."),
           "And who is that?")
# (first question, with the image; its answer; second question, text only)
CONVERSATIONS = {
    "llava": STOP_SIGN,
    "llava_onevision": STOP_SIGN,
    "qwen2_vl": QWEN,
    "qwen2_5_vl": QWEN,
    "qwen3_vl": QWEN,
    "idefics3": IDEFICS,
    "smolvlm": IDEFICS,
    "gemma3": ("What is the speed of light?",
               "The speed of light in a vacuum is approximately 299,792,458 meters per second.",
               "How long does it take light to reach Earth from the Sun?"),
    "internvl": ("Write a haiku for this image", "Silky lake,  \nWooden pier,  \nNature's peace.",
                 "Describe this image"),
}
# What follows the generation prompt in the family's documented turns: the answer, then the end of turn.
ANSWERS = {
    "llava": " {}</s>",  # "ASSISTANT: <answer1></s>USER:"
    "llava_onevision": "{}<|im_end|>",
    "qwen2_vl": "{}<|im_end|>",
    "qwen2_5_vl": "{}<|im_end|>",
    "qwen3_vl": "{}<|im_end|>",
    "idefics3": " {}<end_of_utterance>",  # "Assistant: <answer><end_of_utterance>\n"
    "smolvlm": " {}<end_of_utterance>",
    "gemma3": "{}<end_of_turn>",
    "internvl": "{}<|im_end|>",
}

LLAVA_TEMPLATE = ("llava-hf/llava-1.5-7b-hf's published template ends an answer with a space and no '</s>' "
                  "(each text is written as text + ' '): it renders '... ASSISTANT: This image shows a red stop "
                  "sign. USER: Describe the image in more details. ASSISTANT:' where the docs show '... ASSISTANT: "
                  "This image shows a red stop sign.</s>USER: Describe the image in more details. ASSISTANT:'")
XFAIL = {
    ("prompt", "llava"): pytest.mark.xfail(strict=True, raises=AssertionError, reason=LLAVA_TEMPLATE),
}


def cases(kind: str) -> list:
    return [pytest.param(f, marks=XFAIL.get((kind, f), ()), id=f) for f in PUBLISHED]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """family -> its offline processor, loaded as a checkpoint carrying the published chat template."""
    built = {}

    def processor(family: str):
        if family not in built:
            path = tmp_path_factory.mktemp(family)
            if family == "llava":  # the built-in backbone's processor: family_models has no LLaVA checkpoint
                build_processor(RECIPES["builtin:test"], list(CONVERSATIONS["llava"])).save_pretrained(path)
            else:
                save_checkpoint(family, path)
            (path / "chat_template.jinja").write_text(PUBLISHED[family], encoding="utf-8")
            loaded = load_processor(path, LLAVA if family == "llava" else checkpoint_family(path))
            assert loaded.chat_template == PUBLISHED[family]  # the checkpoint's own template, byte for byte
            built[family] = loaded
        return built[family]

    return processor


def reference(family: str) -> str:
    with open(RENDERINGS / f"{family}.txt", encoding="utf-8", newline="") as f:  # exactly, newlines included
        return f.read()


@pytest.mark.parametrize("family", cases("prompt"))
def test_the_platform_renders_the_documented_conversation(family: str, offline) -> None:
    processor = offline(family)
    first, answer, second = CONVERSATIONS[family]
    prompt = render_prompt(Chat.of(processor), second, has_image=True, history=[(first, answer)])
    assert prompt == reference(family)
    # The template's placeholder is the one the family's processor expands into image tokens.
    enc = processor(text=[prompt], images=[[Image.new("RGB", (48, 48), (200, 30, 30))]], return_tensors="pt",
                    add_special_tokens=False)
    assert (enc["input_ids"] == processor.image_token_id).sum() > 0


@pytest.mark.parametrize("family", cases("answer"))
def test_the_answer_is_the_documented_turn(family: str, offline) -> None:
    chat = Chat.of(offline(family))
    first, answer, _ = CONVERSATIONS[family]
    expected = ANSWERS[family].format(answer)
    assert render_answer(chat, first, answer) == expected
    # Training's prompt and answer for the first turn are where the documented conversation begins;
    # OneVision's template writes an answered turn's role with a space before its newline.
    head = render_prompt(chat, first, has_image=True)
    if family == "llava_onevision":
        head = head.removesuffix("assistant\n") + "assistant \n"
    assert reference(family).startswith(head + expected)


@pytest.mark.parametrize("family", sorted(PUBLISHED_SIZES))
def test_the_templates_are_the_published_files(family: str) -> None:
    kind, size, newline = PUBLISHED_SIZES[family]
    template = PUBLISHED[family]
    text = json.dumps({"chat_template": template}, indent=2) + "\n" * newline if kind == "json" else template
    assert len(text.encode()) == size


def test_the_qwen3_vl_template_is_the_published_one() -> None:
    assert hashlib.sha256(PUBLISHED["qwen3_vl"].encode()).hexdigest() == QWEN3_VL_SHA256
