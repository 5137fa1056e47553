"""Image-token and text-token pooling of LM hidden states: the task router's features and the
alignment losses (Decoupled's InfoNCE, CMA's joint representation) all pool the same way."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from strata.data.collate import Encoded, collate


def modality_masks(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) masks of the image-token positions and of the real (non-padding) text positions."""
    image = batch["input_ids"] == model.config.image_token_id
    return image, batch["attention_mask"].bool() & ~image


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) states over the positions where the (B, L) mask is true: (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@torch.no_grad()
def pooled_features(model: torch.nn.Module, processor, enc: Encoded, batch_size: int = 256) -> torch.Tensor:
    """(N, 2H): mean last-layer state over image tokens ++ over prompt text tokens, each L2-normalised.

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
            image, text = masked_mean(hidden, is_image), masked_mean(hidden, is_text)
            chunks.append(torch.cat([F.normalize(image, dim=-1), F.normalize(text, dim=-1)], dim=-1))
    return torch.cat(chunks).cpu()  # routers are kept and compared on the CPU
