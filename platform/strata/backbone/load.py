"""Load a frozen LLaVA-style backbone and its processor from a spec."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from strata.backbone.tiny import ensure_builtin
from strata.config import BackboneSpec


def resolve(spec: BackboneSpec, progress: Callable[[int, float], None] | None = None) -> Path:
    """The local directory holding the backbone (built-in ones are built and cached on demand)."""
    if spec.source.startswith("builtin:"):
        return ensure_builtin(spec.source, progress)
    return Path(spec.source)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every parameter explicitly, projector and bridges included."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_backbone(spec: BackboneSpec, path: Path | None = None):
    """Return (frozen model, processor). `path` skips resolving when the caller already has it."""
    path = path or resolve(spec)
    if spec.quantization is not None:
        raise NotImplementedError("quantized backbones arrive with the QLoRA work (issue 5)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return freeze(model), processor


def fingerprint(path: Path) -> str:
    """A content hash of the backbone's config and weight files, for lineage."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.suffix in (".json", ".safetensors") and f.name != "strata_recipe.json":
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
