"""A small trained-looking LoRA adapter on the test backbone, for registry and stream tests."""

from __future__ import annotations

from pathlib import Path

import torch

from strata.adapters.lora import add_adapter, save_adapter
from strata.config import AdapterSpec


def trained_adapter(backbone, dest: Path, seed: int, ranks: tuple[int, int] = (2, 4)) -> tuple[Path, torch.nn.Module]:
    """A LoRA adapter with non-zero B matrices (so it changes the output), saved in PEFT format."""
    model, _ = backbone
    peft_model = add_adapter(model, "shared", AdapterSpec(visual_rank=ranks[0], text_rank=ranks[1]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return save_adapter(peft_model, "shared", dest), peft_model
