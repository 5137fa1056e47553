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
from strata.data.template import Chat, Turns, render_answer, render_prompt

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
    images: dict[str, list[torch.Tensor | None]]  # processor output name -> one tensor per row (None: no image)
    answers: list[str]
    prompt_lengths: list[int]
    token_types: dict[str, list[list[int]]]  # e.g. Qwen's mm_token_type_ids: per row, over the prompt
    flat: bool = False  # the tower takes every image's rows (Qwen's patches, InternVL's tiles) in one tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def extend(self, i: int, tokens: list[int]) -> None:
        """Append already generated tokens to row i's prompt (text tokens: no image, no loss)."""
        self.input_ids[i] = self.input_ids[i] + tokens
        self.labels[i] = self.labels[i] + [IGNORE] * len(tokens)
        self.prompt_lengths[i] += len(tokens)
        for rows in self.token_types.values():
            rows[i] = rows[i] + [0] * len(tokens)

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


@dataclass(frozen=True)
class Conversation:
    """One row to encode: its question, images, earlier turns, and (for training) its answer."""

    prompt: str
    images: tuple[bytes, ...] = ()
    history: Turns = ()
    image_turns: tuple[int, ...] | None = None  # images per user turn; None: all of them in the first
    answer: str = ""
    raw: bool = False  # a plain completion prompt: tokenized as it is, without the chat template


def _rows(processor, out, n: int, k: int) -> dict[str, list[torch.Tensor]]:
    """The processor's image outputs for a chunk of `n` rows of `k` images each, split per row."""
    rows = {}
    if "image_grid_thw" in out:  # Qwen: every image's patch rows, one after another; a row's are concatenated
        per_image = torch.split(out["pixel_values"], out["image_grid_thw"].prod(-1).tolist())
        rows["pixel_values"] = [torch.cat(per_image[i * k : (i + 1) * k]) for i in range(n)]
        rows["image_grid_thw"] = list(out["image_grid_thw"].split(k))
    if "image_sizes" in out and out["pixel_values"].dim() == 5:  # OneVision: each image's own tiles, no padding
        tiles = _tiles(processor.image_processor, out["image_sizes"])
        rows["pixel_values"] = [p[:t] for p, t in zip(out["pixel_values"], tiles)]
    if isinstance(processor, InternVLProcessor):  # every image's tiles, one after another
        per_tile = processor.image_seq_length  # image tokens each tile puts in the prompt
        tiles = ((out["input_ids"] == processor.image_token_id).sum(1) // per_tile).tolist()
        rows["pixel_values"] = list(torch.split(out["pixel_values"], tiles))
    for key, value in out.items():
        if key not in rows and key not in ("input_ids", "attention_mask", *TOKEN_TYPES):
            if len(value) != n or k != 1:
                raise ValueError(f"the processor's {key!r} has {len(value)} entries for {n} rows of {k} images; "
                                 "Strata batches one image per row for this family")
            rows[key] = list(value)
    return rows


def several_images(processor) -> bool:
    """Whether Strata batches rows of several images for this processor (towers that take images flat)."""
    return isinstance(processor, InternVLProcessor) or "image_grid_thw" in getattr(
        processor.image_processor, "model_input_names", ())


def encode_table(processor, table: pa.Table, with_answers: bool) -> Encoded:
    """Tokenize prompts (+answers) and preprocess images of every row of a schema table."""
    rows = with_history(table).select(["image", "prompt", "answer", "history"]).to_pylist()
    if any(r["image"] is None for r in rows):
        # Text-only rows need a vision-free forward; the built-in stream never has them.
        raise ValueError("text-only rows (null image) are not supported by the trainer yet")
    convs = [Conversation(r["prompt"], (r["image"],), turns(r["history"]), answer=r["answer"]) for r in rows]
    return encode_conversations(processor, convs, with_answers)


def encode_conversations(processor, convs: list[Conversation], with_answers: bool = False) -> Encoded:
    """Tokenize conversations (+answers) with the chat template and preprocess their images.

    Rows may carry no image or several; rows without one have no entry (None) in `images`.
    """
    tok, chat = processor.tokenizer, Chat.of(processor)
    n = len(convs)
    ids: list[list[int]] = [[] for _ in range(n)]
    labels: list[list[int]] = [[] for _ in range(n)]
    prompt_lengths = [0] * n
    images: dict[str, list[torch.Tensor | None]] = {}
    types: dict[str, list[list[int]]] = {}
    for start in range(0, n, _CHUNK):
        chunk = range(start, min(start + _CHUNK, n))
        for group in _groups(convs, chunk):
            _encode_group(processor, tok, chat, convs, group, with_answers, ids, labels, prompt_lengths, images, types)
    for key, rows in types.items():  # rows of a group without that key (text-only, raw): all text
        types[key] = [t if t is not None else [0] * prompt_lengths[i] for i, t in enumerate(rows)]
    flat = "image_grid_thw" in images or isinstance(processor, InternVLProcessor)
    return Encoded(ids, labels, images, [c.answer for c in convs], prompt_lengths, types, flat)


def _groups(convs: list[Conversation], rows: range) -> list[list[int]]:
    """Rows that one processor call can take together: the same number of images, chat or raw."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i in rows:
        groups.setdefault((len(convs[i].images), convs[i].raw), []).append(i)
    return list(groups.values())


def _encode_group(processor, tok, chat: Chat, convs: list[Conversation], group: list[int], with_answers: bool,
                  ids, labels, prompt_lengths, images, types) -> None:
    k = len(convs[group[0]].images)
    if convs[group[0]].raw:
        texts = [convs[i].prompt for i in group]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    else:
        if k > 1 and not several_images(processor):
            raise ValueError(f"a row has {k} images, but Strata batches one image per row for this family "
                             f"({type(processor).__name__})")
        texts = [render_prompt(chat, convs[i].prompt, has_image=k > 0, history=convs[i].history,
                               images=convs[i].image_turns or (k,)) for i in group]
        # One list per row: Gemma 3's processor needs them nested, and the others take them so too.
        pictures = [[decode_image(b) for b in convs[i].images] for i in group] if k else None
        enc = processor(text=texts, images=pictures, return_tensors="pt", padding=True, add_special_tokens=False)
    for key, value in (_rows(processor, enc, len(group), k) if k else {}).items():
        per_row = images.setdefault(key, [None] * len(convs))
        for i, v in zip(group, value):
            per_row[i] = v
    mask = enc["attention_mask"].bool()
    for j, i in enumerate(group):
        c = convs[i]
        p = enc["input_ids"][j][mask[j]].tolist()
        a = tok(render_answer(chat, c.prompt, c.answer, c.history), add_special_tokens=False)["input_ids"] \
            if with_answers else []
        ids[i], labels[i], prompt_lengths[i] = p + a, [IGNORE] * len(p) + a, len(p)
        for key in TOKEN_TYPES:
            if key in enc:
                types.setdefault(key, [None] * len(convs))[i] = enc[key][j][mask[j]].tolist()


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
    images = {}
    for key, rows in enc.images.items():  # text-only rows have no image tensors
        present = [r for r in rows if r is not None]
        if present:
            images[key] = torch.cat(present) if enc.flat and key in PATCH_ROWS else _stack(present)
    return {"input_ids": input_ids, "attention_mask": attention, **images, **types, "labels": labels}


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-row tensors; rows with fewer leading entries (OneVision's tiles) are zero-padded, and
    the model reads only each image's real ones (from `image_sizes`)."""
    if all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    longest = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros(longest - len(r), *r.shape[1:])]) for r in rows])
