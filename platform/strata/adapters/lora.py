"""LoRA adapters on a LLaVA backbone: a visual side (vision tower + projector) and a text side (LM).

Both sides of one task live in ONE named PEFT adapter with per-side ranks (`rank_pattern`), so
it saves in PEFT's own format and PEFT's per-sample `adapter_names` can pick it in mixed batches.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from strata.atomic import replace_dir
from strata.config import AdapterSpec, check_name

_VISUAL_PROJ = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
_PROJECTOR = r"multi_modal_projector\.linear_[12]"
TEXT = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_VISUAL_MODULES = r".*(vision_tower|multi_modal_projector)\..*"


def used_vision_layers(config) -> int:
    """How many vision-tower layers feed the LM; LLaVA reads layer -2, so the last one is dead."""
    n = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    return max(n + 1 + layer if layer < 0 else layer for layer in layers)


def visual_targets(config) -> str:
    """Regex of the vision-tower layers that reach the LM, plus the projector."""
    layers = "|".join(str(i) for i in range(used_vision_layers(config)))
    return rf"vision_tower\.encoder\.layers\.({layers})\..*\.{_VISUAL_PROJ}|{_PROJECTOR}"


def lora_config(spec: AdapterSpec, model_config) -> LoraConfig:
    """A PEFT LoraConfig covering the sides whose rank is non-zero (no LoRA on unused layers)."""
    sides = [s for s, r in ((visual_targets(model_config), spec.visual_rank), (TEXT, spec.text_rank)) if r > 0]
    main_rank = spec.text_rank or spec.visual_rank
    rank_pattern, alpha_pattern = {}, {}
    if spec.visual_rank and spec.text_rank and spec.visual_rank != spec.text_rank:
        rank_pattern[_VISUAL_MODULES] = spec.visual_rank
        alpha_pattern[_VISUAL_MODULES] = spec.alpha_ratio * spec.visual_rank
    return LoraConfig(
        r=main_rank,
        lora_alpha=spec.alpha_ratio * main_rank,
        lora_dropout=spec.dropout,
        target_modules=rf".*({'|'.join(sides)})",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def add_adapter(model: torch.nn.Module, name: str, spec: AdapterSpec) -> PeftModel:
    """Add a new trainable adapter `name` (wrapping the backbone in PEFT on first use)."""
    check_name(name, "adapter name")
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora_config(spec, model.config))
    else:
        model = get_peft_model(model, lora_config(spec, model.config), adapter_name=name)
    model.set_adapter(name)
    return model


def load_adapter(model: torch.nn.Module, path: Path, name: str, trainable: bool = False) -> PeftModel:
    """Load a saved PEFT adapter under `name`; only a trainable one gets gradients."""
    check_name(name, "adapter name")
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    else:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    if trainable:
        model.set_adapter(name)
    return model


def save_adapter(model: PeftModel, name: str, dest: Path) -> Path:
    """Write adapter `name` to `dest` in PEFT format, atomically (temp dir, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[name])
        # PEFT nests non-default adapters one level down; flatten so the dir loads directly.
        src = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp
        replace_dir(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer should see."""
    return [p for p in model.parameters() if p.requires_grad]
