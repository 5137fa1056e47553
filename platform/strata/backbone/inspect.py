"""`strata backbone inspect`: what Strata sees in a backbone, read from its config alone.

The model is built on the meta device, so no weight is read and nothing is allocated: a 70B
checkpoint inspects as fast as the built-in one. An adapter is attached to that empty model the
way training attaches it, so the targets and the trainable share are the ones a run would get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

from strata.adapters.lora import add_adapter
from strata.adapters.placement import select
from strata.backbone.families import Family, family_of

REMOTE_CODE_NOTE = ("Strata does not run code shipped inside a checkpoint (trust_remote_code). Use a checkpoint "
                    "that transformers' own classes load: for InternVL, the `-hf` conversions "
                    "(e.g. OpenGVLab/InternVL3-1B-hf); for Qwen, LLaVA, Idefics3, SmolVLM and Gemma 3, the "
                    "official checkpoints already do")


@dataclass(frozen=True)
class Inspection:
    """What `inspect_backbone` found."""

    source: str
    family: Family
    model_class: str
    parts: dict[str, int]  # part -> parameters
    modules: dict[str, int]  # part -> linear layers
    targets: dict[str, list[str]]  # side -> module names the adapter attaches to
    trainable: int
    total: int
    quantized_linears: int  # LM linear layers QLoRA turns into 4-bit ones

    @property
    def trainable_pct(self) -> float:
        """Trainable parameters as a percentage of the whole model with its adapter."""
        return 100.0 * self.trainable / self.total


def read_config(path: Path | str) -> PretrainedConfig:
    """The model config of a local directory (or a hub id), refusing checkpoints that need remote code."""
    config_file = Path(path) / "config.json"
    if config_file.is_file() and "auto_map" in json.loads(config_file.read_text()):
        raise ValueError(f"{path}: this checkpoint's architecture is defined by code inside it. {REMOTE_CODE_NOTE}")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ValueError(f"{path}: needs trust_remote_code. {REMOTE_CODE_NOTE}") from None
        raise


def part_of(family: Family, name: str) -> str:
    """Which part a parameter or module belongs to: projector, vision tower or language model."""
    if f"{family.projector_block}." in f"{name}." and family.is_vision(name):
        return "projector"
    return "vision tower" if family.is_vision(name) else "language model"


def inspect_backbone(source: str, path: Path, spec) -> Inspection:
    """Inspect the model at `path` (named `source` in the report) with the adapter of `spec` attached."""
    config = read_config(path)
    family = family_of(config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    model.requires_grad_(False)
    parts: dict[str, int] = {"vision tower": 0, "projector": 0, "language model": 0}
    for name, p in model.named_parameters():
        parts[part_of(family, name)] += p.numel()
    modules = dict.fromkeys(parts, 0)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            modules[part_of(family, name)] += 1
    names = select(spec, model)
    targets = {"vision": [n for n in names if family.is_vision(n)], "language": [n for n in names if not family.is_vision(n)]}
    quantized = sum(isinstance(m, torch.nn.Linear) and not any(n.startswith(s) for s in family.quantization_skip())
                    for n, m in model.named_modules())
    wrapped = add_adapter(model, "inspect", spec)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    return Inspection(source, family, type(model).__name__, parts, modules, targets, trainable, total, quantized)
