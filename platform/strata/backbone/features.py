"""Pooled embeddings from the frozen backbone, used by the task router."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from strata.data.collate import Encoded, collate


@torch.no_grad()
def pooled_features(model: torch.nn.Module, processor, enc: Encoded, batch_size: int = 256) -> torch.Tensor:
    """(N, 2H): mean last-layer state over image tokens ++ over text tokens, each L2-normalised.

    Adapters are disabled so the features never depend on what was trained since.
    """
    tok = processor.tokenizer
    image_id = model.config.image_token_index
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    chunks = []
    with off:
        for start in range(0, len(enc), batch_size):
            batch = collate(enc.select(list(range(start, min(start + batch_size, len(enc))))), tok.pad_token_id)
            batch.pop("labels")
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
            is_image = (batch["input_ids"] == image_id).unsqueeze(-1)
            is_text = batch["attention_mask"].bool().unsqueeze(-1) & ~is_image
            image = (hidden * is_image).sum(1) / is_image.sum(1).clamp(min=1)
            text = (hidden * is_text).sum(1) / is_text.sum(1).clamp(min=1)
            chunks.append(torch.cat([F.normalize(image, dim=-1), F.normalize(text, dim=-1)], dim=-1))
    return torch.cat(chunks)
