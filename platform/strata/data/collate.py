"""Turn schema rows into model tensors with the backbone's chat template; loss on answer tokens only.

Each row keeps its own image tensors, exactly as the processor returned them for its image:
LLaVA's `pixel_values` (3, H, W), Qwen's variable number of patch rows and their
`image_grid_thw`, Idefics3's `pixel_attention_mask`. `collate` stacks them, or concatenates them
where the model takes patch rows of the whole batch in one tensor (Qwen). A per-token image mask
the processor returns (Qwen's `mm_token_type_ids`, Gemma 3's `token_type_ids`) is kept per row and
padded with the ids.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import torch
from PIL import Image
from transformers import InternVLProcessor

from strata.data.schema import turns, with_history
from strata.data.template import Chat, render_answer, render_prompt

IGNORE = -100
_CHUNK = 512  # rows per processor call: bounds peak memory of decoded images
TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")  # per-token image masks some processors return
PATCH_ROWS = ("pixel_values", "image_grid_thw")  # concatenated across a batch when the tower takes them flat


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG bytes into an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@dataclass
class Encoded:
    """A whole table tokenized once: per-row id lists and per-row image tensors."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    images: dict[str, list[torch.Tensor]]  # processor output name -> one tensor per row
    answers: list[str]
    prompt_lengths: list[int]
    token_types: dict[str, list[list[int]]]  # e.g. Qwen's mm_token_type_ids: per row, over the prompt
    flat: bool = False  # the tower takes every image's rows (Qwen's patches, InternVL's tiles) in one tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: list[int]) -> Encoded:
        """A row subset, in the given order."""
        return Encoded(
            [self.input_ids[i] for i in idx],
            [self.labels[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.images.items()},
            [self.answers[i] for i in idx],
            [self.prompt_lengths[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.token_types.items()},
            self.flat,
        )


def _tiles(image_processor, image_sizes: torch.Tensor) -> list[int]:
    """How many of each image's tile rows are real (OneVision pads every image to the chunk's most)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return [image_size_to_num_patches(size.tolist(), image_processor.image_grid_pinpoints,
                                      image_processor.size["height"]) for size in image_sizes]


def _rows(processor, out, n: int) -> dict[str, list[torch.Tensor]]:
    """The processor's image outputs for a chunk of `n` one-image rows, split per row."""
    rows = {}
    if "image_grid_thw" in out:  # Qwen: every image's patch rows, one after another
        rows["pixel_values"] = list(torch.split(out["pixel_values"], out["image_grid_thw"].prod(-1).tolist()))
        rows["image_grid_thw"] = list(out["image_grid_thw"].split(1))
    if "image_sizes" in out and out["pixel_values"].dim() == 5:  # OneVision: each image's own tiles, no padding
        tiles = _tiles(processor.image_processor, out["image_sizes"])
        rows["pixel_values"] = [p[:k] for p, k in zip(out["pixel_values"], tiles)]
    if isinstance(processor, InternVLProcessor):  # every image's tiles, one after another
        per_tile = processor.image_seq_length  # image tokens each tile puts in the prompt
        tiles = ((out["input_ids"] == processor.image_token_id).sum(1) // per_tile).tolist()
        rows["pixel_values"] = list(torch.split(out["pixel_values"], tiles))
    for key, value in out.items():
        if key not in rows and key not in ("input_ids", "attention_mask", *TOKEN_TYPES):
            if len(value) != n:
                raise ValueError(f"the processor's {key!r} has {len(value)} entries for {n} rows; "
                                 "Strata batches one image per row")
            rows[key] = list(value)
    return rows


def encode_table(processor, table: pa.Table, with_answers: bool) -> Encoded:
    """Tokenize prompts (+answers) and preprocess images of every row of a schema table."""
    tok, chat = processor.tokenizer, Chat.of(processor)
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    images: dict[str, list[torch.Tensor]] = {}
    types: dict[str, list[list[int]]] = {}
    prompt_lengths: list[int] = []
    rows = with_history(table).select(["image", "prompt", "answer", "history"]).to_pylist()
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        if any(r["image"] is None for r in chunk):
            # Text-only rows need a vision-free forward; the built-in stream never has them.
            raise ValueError("text-only rows (null image) are not supported by the trainer yet")
        texts = [render_prompt(chat, r["prompt"], has_image=True, history=turns(r["history"])) for r in chunk]
        # One list per row: Gemma 3's processor needs them nested, and the others take them so too.
        enc = processor(text=texts, images=[[decode_image(r["image"])] for r in chunk], return_tensors="pt",
                        padding=True, add_special_tokens=False)
        for key, value in _rows(processor, enc, len(chunk)).items():
            images.setdefault(key, []).extend(value)
        mask = enc["attention_mask"].bool()
        for i, (row, prompt_ids, m) in enumerate(zip(chunk, enc["input_ids"], mask)):
            p = prompt_ids[m].tolist()
            a = tok(render_answer(chat, row["prompt"], row["answer"], turns(row["history"])),
                    add_special_tokens=False)["input_ids"] if with_answers else []
            ids.append(p + a)
            labels.append([IGNORE] * len(p) + a)
            prompt_lengths.append(len(p))
            for key in TOKEN_TYPES:
                if key in enc:
                    types.setdefault(key, []).append(enc[key][i][m].tolist())
    flat = "image_grid_thw" in images or isinstance(processor, InternVLProcessor)
    return Encoded(ids, labels, images, [r["answer"] for r in rows], prompt_lengths, types, flat)


def collate(enc: Encoded, pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad a selection into a batch; left padding is what batched generation needs."""
    width = max(len(x) for x in enc.input_ids)
    n = len(enc)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    types = {key: torch.zeros((n, width), dtype=torch.long) for key in enc.token_types}
    for i, (x, y) in enumerate(zip(enc.input_ids, enc.labels)):
        sl = slice(width - len(x), width) if left_pad else slice(0, len(x))
        input_ids[i, sl] = torch.tensor(x)
        labels[i, sl] = torch.tensor(y)
        attention[i, sl] = 1
        for key, rows in enc.token_types.items():  # answer tokens are text: type 0
            types[key][i, sl.start : sl.start + len(rows[i])] = torch.tensor(rows[i])
    images = {k: torch.cat(v) if enc.flat and k in PATCH_ROWS else _stack(v) for k, v in enc.images.items()}
    return {"input_ids": input_ids, "attention_mask": attention, **images, **types, "labels": labels}


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-row tensors; rows with fewer leading entries (OneVision's tiles) are zero-padded, and
    the model reads only each image's real ones (from `image_sizes`)."""
    if all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    longest = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros(longest - len(r), *r.shape[1:])]) for r in rows])
