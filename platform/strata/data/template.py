"""Chat rendering, shared by training, evaluation and serving: the backbone's own chat template.

Every consumer renders a row's conversation (its earlier turns, then its prompt) with
`render_prompt` and, for training, appends `render_answer`. Both come from one rendering of the conversation by the processor's chat template
(`processor.chat_template`; `strata.backbone.load` gives a processor saved without one its
family's default, LLaVA-1.5's turns for the llava family), so evaluation and serving see exactly
what training saw. The loss covers only the answer tokens, so the boundary between the two must be
exact: the answer is what the template writes after the generation prompt, up to and including the
end of sequence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers.utils.chat_template_utils import render_jinja_template

IMAGE_TOKEN = "<image>"  # LLaVA's image placeholder (the built-in backbone's tokenizer has it)
EOS = "</s>"  # LLaVA's end of sequence
# LLaVA-1.5's conversation: "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- else -%}"
    "{{- ' ' -}}{%- for c in m['content'] -%}{%- if c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class Chat:
    """A backbone's chat template with the special tokens it may write (bos_token, eos_token, ...)."""

    template: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def eos(self) -> str:
        """The end of an answer: the tokenizer's end of sequence."""
        return self.tokens["eos_token"]

    @classmethod
    def of(cls, processor) -> Chat:
        """The processor's chat template; a processor without one cannot render a conversation."""
        template = getattr(processor, "chat_template", None)
        if not template:
            raise ValueError(f"{type(processor).__name__} has no chat template: load it with "
                             "strata.backbone.load, which gives it its family's default, or save one with the model")
        tok = processor.tokenizer
        named = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(template, {k: v for k, v in named.items() if isinstance(v, str)})


LLAVA_CHAT = Chat(LLAVA_CHAT_TEMPLATE, {"eos_token": EOS})


Turns = Sequence[tuple[str, str]]  # earlier (question, answer) turns of a conversation, oldest first


def _messages(prompt: str, images: Sequence[int], history: Turns) -> list[dict]:
    """The conversation as chat messages; `images[t]` images open user turn t, before its text."""
    messages = []
    for t, (question, answer) in enumerate([*history, (prompt, None)]):
        parts = [{"type": "image"}] * (images[t] if t < len(images) else 0)
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question.strip()}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
    return messages


def _render(chat: Chat, messages: list[dict], add_generation_prompt: bool) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=chat.template,
                                        add_generation_prompt=add_generation_prompt, **chat.tokens)
    return rendered[0]


def render_prompt(chat: Chat, prompt: str, has_image: bool, history: Turns = (),
                  images: Sequence[int] | None = None) -> str:
    """A conversation (earlier turns, then `prompt`) as the model's input, up to the answer.

    A dataset row's one image belongs to its first turn; `images` (one count per user turn) places
    a served conversation's images where they were sent.
    """
    return _render(chat, _messages(prompt, (int(has_image),) if images is None else images, history),
                   add_generation_prompt=True)


def render_answer(chat: Chat, prompt: str, answer: str, history: Turns = ()) -> str:
    """The target continuation of `render_prompt`: the answer as the template writes it, through its end.

    Some published templates do not write an answered turn as their generation prompt continued:
    LLaVA-OneVision's writes "assistant \\n" after a turn where it prompts "assistant\\n", and
    llava-1.5-7b-hf's ends an answer with a space instead of "</s>". The answer then starts where its
    text does, and an answer the template does not end with the end of sequence gets one, so that
    the model learns to stop.
    """
    messages = _messages(prompt, (1,), history)
    head = _render(chat, messages, add_generation_prompt=True)
    text = answer.strip()
    whole = _render(chat, [*messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                    add_generation_prompt=False)
    common = len(os.path.commonprefix([head, whole]))
    start = len(head) if whole.startswith(head) else whole.find(text, common)
    if start < 0 or text not in whole[start:]:
        raise ValueError("the chat template does not write the answer after its generation prompt; Strata cannot "
                         "tell the answer tokens apart for the loss")
    tail = whole[start:]
    after = tail.index(text) + len(text)
    if chat.eos in tail[after:]:
        return tail[: tail.index(chat.eos, after) + len(chat.eos)]
    return tail[:after] + chat.eos
