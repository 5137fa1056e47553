"""Image-token and text-token pooling of LM hidden states: the task router's features and the
alignment losses (Decoupled's InfoNCE, CMA's joint representation) all pool the same way."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from strata.data.collate import Encoded, collate

FEATURE_PARTS = 3  # pooled_features: image, text in context, text alone


def modality_masks(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) masks of the image-token positions and of the real (non-padding) text positions."""
    image = batch["input_ids"] == model.config.image_token_id
    return image, batch["attention_mask"].bool() & ~image


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) states over the positions where the (B, L) mask is true: (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _question_states(model: torch.nn.Module, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """Mean last-layer LM state of each row's kept text tokens, run through the LM alone: (B, H).

    Without its image the prompt's states depend on the words only, so two tasks that draw the
    same kind of picture (one object for `colour` and for a one-object `count` row) still part.
    """
    ids, pad = batch["input_ids"], torch.zeros_like(batch["input_ids"])
    lengths = keep.sum(1)
    width = int(lengths.max().clamp(min=1))
    text_ids, mask = pad[:, :width].clone(), torch.zeros_like(pad[:, :width])
    for i, row in enumerate(ids):
        n = int(lengths[i])
        text_ids[i, :n], mask[i, :n] = row[keep[i]], 1
    hidden = model.get_decoder()(input_ids=text_ids, attention_mask=mask).last_hidden_state
    return masked_mean(hidden, mask.bool())


@torch.no_grad()
def pooled_features(model: torch.nn.Module, processor, enc: Encoded, batch_size: int = 256) -> torch.Tensor:
    """(N, 3H): three L2-normalised means of last-layer LM states, concatenated.

    1. over the image tokens;
    2. over the prompt's text tokens in context (they attend to the image before them);
    3. over the same text tokens run through the LM without the image: the image comes first in the
       template, so in a causal LM no state in context sees the question before the image does.
    Adapters are disabled so the features never depend on what was trained since. Answer tokens
    (labelled rows) are left out: in a causal model the prompt's states do not see them, so rows
    encoded with or without answers route alike, as at serving time.
    """
    tok = processor.tokenizer
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    chunks = []
    device = next(model.parameters()).device
    with off:
        for start in range(0, len(enc), batch_size):
            batch = collate(enc.select(list(range(start, min(start + batch_size, len(enc))))), tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            answer = batch.pop("labels") != -100
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
            is_image, is_text = modality_masks(model, batch)
            is_text &= ~answer
            parts = (masked_mean(hidden, is_image), masked_mean(hidden, is_text),
                     _question_states(model, batch, is_text))
            chunks.append(torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1))
    return torch.cat(chunks).cpu()  # routers are kept and compared on the CPU
