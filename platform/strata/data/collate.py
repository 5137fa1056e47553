"""Turn schema rows into model tensors with the shared chat template; loss on answer tokens only."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import torch
from PIL import Image

from strata.data.template import render_answer, render_prompt

IGNORE = -100
_CHUNK = 512  # rows per processor call: bounds peak memory of decoded images


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG bytes into an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@dataclass
class Encoded:
    """A whole table tokenized once: per-row id lists and one stacked pixel tensor."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    pixel_values: torch.Tensor  # (N, 3, H, W)
    answers: list[str]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: list[int]) -> Encoded:
        """A row subset, in the given order."""
        return Encoded(
            [self.input_ids[i] for i in idx],
            [self.labels[i] for i in idx],
            self.pixel_values[idx],
            [self.answers[i] for i in idx],
            [self.prompt_lengths[i] for i in idx],
        )


def encode_table(processor, table: pa.Table, with_answers: bool) -> Encoded:
    """Tokenize prompts (+answers) and preprocess images of every row of a schema table."""
    tok = processor.tokenizer
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    prompt_lengths: list[int] = []
    rows = table.select(["image", "prompt", "answer"]).to_pylist()
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        if any(r["image"] is None for r in chunk):
            # Text-only rows need a vision-free forward; the built-in stream never has them.
            raise ValueError("text-only rows (null image) are not supported by the trainer yet")
        images = [decode_image(r["image"]) for r in chunk]
        texts = [render_prompt(r["prompt"], has_image=True) for r in chunk]
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        pixels.append(enc["pixel_values"])
        mask = enc["attention_mask"].bool()
        for row, prompt_ids, m in zip(chunk, enc["input_ids"], mask):
            p = prompt_ids[m].tolist()
            a = tok(render_answer(row["answer"]), add_special_tokens=False)["input_ids"] if with_answers else []
            ids.append(p + a)
            labels.append([IGNORE] * len(p) + a)
            prompt_lengths.append(len(p))
    return Encoded(ids, labels, torch.cat(pixels), [r["answer"] for r in rows], prompt_lengths)


def collate(enc: Encoded, pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad a selection into a batch; left padding is what batched generation needs."""
    width = max(len(x) for x in enc.input_ids)
    n = len(enc)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(enc.input_ids, enc.labels)):
        sl = slice(width - len(x), width) if left_pad else slice(0, len(x))
        input_ids[i, sl] = torch.tensor(x)
        labels[i, sl] = torch.tensor(y)
        attention[i, sl] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": enc.pixel_values,
        "labels": labels,
    }
