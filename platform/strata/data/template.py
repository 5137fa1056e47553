"""The one chat template, shared by training, evaluation and serving.

Every consumer renders a row with `render_prompt` and (for training) appends `render_answer`;
the loss covers only the answer tokens, so the boundary between the two must be exact.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
USER = "USER:"
ASSISTANT = "ASSISTANT:"
EOS = "</s>"


def render_prompt(prompt: str, has_image: bool) -> str:
    """Wrap one instruction (with any earlier turns already inside it) as the model's prompt."""
    image = f"{IMAGE_TOKEN}\n" if has_image else ""
    return f"{USER} {image}{prompt.strip()} {ASSISTANT}"


def render_answer(answer: str) -> str:
    """The target continuation: a leading space, the answer, then end-of-sequence."""
    return f" {answer.strip()}{EOS}"


def join_turns(history: list[tuple[str, str]], question: str) -> str:
    """Fold earlier (question, answer) turns and the current question into one prompt string.

    The outer USER:/ASSISTANT: of the last turn is added by `render_prompt`, so the result reads
    as one multi-turn conversation once rendered.
    """
    parts = []
    for q, a in history:
        parts.append(f"{q.strip()} {ASSISTANT} {a.strip()}{EOS}{USER}")
    parts.append(question.strip())
    return " ".join(parts)
