"""Adapters on a LLaVA backbone, every kind behind one API: add, load, save, trainable parameters.

PEFT kinds (lora, dora, prefix) live in PEFT and save in its own format, so plain
`PeftModel.from_pretrained` loads them. For LoRA/DoRA both sides of one task (vision tower +
projector, and the LM) live in ONE named adapter with per-side and per-layer ranks
(`rank_pattern`), so PEFT's per-sample `adapter_names` can pick it in mixed batches.

Strata kinds (bottleneck, bitfit) are `StrataLayer`s saved as one safetensors side file with the
config that rebuilds them. They have no named switching: such an adapter is the model's only one.
Which layers an adapter covers is decided in `placement.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model

from strata.adapters import bitfit, bottleneck, custom
from strata.adapters.placement import check, pattern, select, used_vision_layers
from strata.atomic import replace_dir
from strata.config import MULTI_ADAPTER_KINDS, AdapterSpec, check_name

__all__ = [
    "MULTI_ADAPTER_KINDS", "PEFT_KINDS", "STRATA_KINDS", "adapter_kind", "adapter_kinds", "add_adapter",
    "load_adapter", "lora_config", "named_adapter_parameters", "prefix_config", "save_adapter",
    "trainable_parameters", "used_vision_layers", "visual_targets",
]

PEFT_KINDS = ("lora", "dora", "prefix")
STRATA_KINDS = ("bottleneck", "bitfit")
STRATA_ATTR = "strata_adapter"  # model attribute holding the side config of its Strata-kind adapter
SIDE_VERSION = 1  # bump when the side-file config of bottleneck/bitfit changes shape


def visual_targets(config) -> str:
    """Regex of the vision-tower layers that reach the LM, plus the projector."""
    return pattern(AdapterSpec(visual_rank=1, text_rank=0), config)


def lora_config(spec: AdapterSpec, model: torch.nn.Module) -> LoraConfig:
    """A PEFT LoraConfig (DoRA when spec.kind is 'dora') for the modules `spec` places on `model`, with
    per-side and per-layer ranks; alpha = alpha_ratio * rank everywhere."""
    if spec.kind not in ("lora", "dora"):
        raise ValueError(f"lora_config builds LoRA/DoRA configs, not {spec.kind!r}")
    ranks = select(spec, model)
    main_rank = Counter(ranks.values()).most_common(1)[0][0]
    # Exact names, not the user's regexes: PEFT saves rank_pattern with sorted keys, which would lose
    # the first-match-wins order of overlapping regexes; exact names never overlap.
    rank_pattern = {re.escape(name): r for name, r in ranks.items() if r != main_rank}
    return LoraConfig(
        r=main_rank,
        lora_alpha=spec.alpha_ratio * main_rank,
        lora_dropout=spec.dropout,
        target_modules=pattern(spec, model.config),
        rank_pattern=rank_pattern,
        alpha_pattern={key: spec.alpha_ratio * r for key, r in rank_pattern.items()},
        use_dora=spec.kind == "dora",
    )


def prefix_config(spec: AdapterSpec) -> PrefixTuningConfig:
    """A PEFT prefix-tuning config on the LM: text_rank virtual tokens in every attention layer."""
    # PEFT reads the layer count, width and (GQA) key/value heads from the LLaVA text_config itself.
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.text_rank)


def adapter_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Adapter name -> kind for every adapter the model holds ('strata' for Strata layers of a strategy)."""
    if isinstance(model, PeftModel):
        return {n: _peft_kind(c.to_dict()) for n, c in model.peft_config.items()}
    held = getattr(model, STRATA_ATTR, None)
    if held is not None:
        return {held["name"]: held["kind"]}
    return {"(strategy layers)": "strata"} if custom.layers(model) else {}


def _peft_kind(config: dict) -> str:
    peft_type = str(config.get("peft_type", "")).rsplit(".", 1)[-1].upper()
    if peft_type == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    if peft_type == "PREFIX_TUNING":
        return "prefix"
    raise ValueError(f"unsupported PEFT adapter type {peft_type!r}; Strata handles {PEFT_KINDS}")


def adapter_kind(path: Path | str) -> str:
    """The kind of the adapter saved in directory `path` (PEFT format or a Strata side file)."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return _peft_kind(json.loads((path / "adapter_config.json").read_text()))
    if (path / custom.SIDE_FILE).exists():
        return custom.read_side(path)[0].get("kind", "unknown")
    raise ValueError(f"{path} holds no adapter (neither adapter_config.json nor {custom.SIDE_FILE})")


def _refuse_second(model: torch.nn.Module, kind: str) -> None:
    # Only LoRA/DoRA switch between named adapters; every other kind must be the model's only adapter.
    held = adapter_kinds(model)
    if held and not (kind in MULTI_ADAPTER_KINDS and set(held.values()) <= set(MULTI_ADAPTER_KINDS)):
        raise ValueError(f"the model already holds adapter(s) {held}; only {MULTI_ADAPTER_KINDS} adapters can "
                         f"share a model, so a {kind!r} adapter needs a fresh backbone")


def add_adapter(model: torch.nn.Module, name: str, spec: AdapterSpec) -> torch.nn.Module:
    """Add a new trainable adapter `name` of kind spec.kind (wrapping the backbone in PEFT for PEFT kinds)."""
    check_name(name, "adapter name")
    _refuse_second(model, spec.kind)
    check(spec, model)
    if spec.kind in STRATA_KINDS:
        ranks = select(spec, model)
        if spec.kind == "bottleneck":
            bottleneck.attach(model, ranks, spec.dropout)
        else:
            bitfit.attach(model, list(ranks))
        setattr(model, STRATA_ATTR, {"kind": spec.kind, "name": name, "version": SIDE_VERSION,
                                     "dropout": spec.dropout, "modules": ranks, "spec": dataclasses.asdict(spec)})
        return model
    config = prefix_config(spec) if spec.kind == "prefix" else lora_config(spec, model)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    model.set_adapter(name)
    return model


def load_adapter(model: torch.nn.Module, path: Path, name: str, trainable: bool = False) -> torch.nn.Module:
    """Load a saved adapter (PEFT format or Strata side file) under `name`; only a trainable one gets gradients."""
    check_name(name, "adapter name")
    path = Path(path)
    kind = adapter_kind(path)
    _refuse_second(model, kind)
    if kind in STRATA_KINDS:
        config, tensors = custom.read_side(path)
        if config.get("version") != SIDE_VERSION:
            raise ValueError(f"{path}: {kind} side file version {config.get('version')!r}, expected {SIDE_VERSION}")
        if kind == "bottleneck":
            bottleneck.attach(model, config["modules"], config["dropout"])
        else:
            bitfit.attach(model, list(config["modules"]))
        custom.load_side_state(model, tensors, path)
        for p in custom.adapter_parameters(model).values():
            p.requires_grad_(trainable)
        setattr(model, STRATA_ATTR, {**config, "name": name})
        return model
    if kind not in PEFT_KINDS:
        raise ValueError(f"{path} holds a {kind!r} side file of a strategy, not an adapter; load it with that "
                         f"strategy (load_adapter handles {PEFT_KINDS + STRATA_KINDS})")
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    else:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    if trainable:
        model.set_adapter(name)
    else:  # PEFT leaves a prompt encoder loaded with is_trainable=False requiring grad; freeze it explicitly
        for pname, p in model.named_parameters():
            if f".{name}." in pname:
                p.requires_grad_(False)
    return model


def save_adapter(model: torch.nn.Module, name: str, dest: Path) -> Path:
    """Write adapter `name` to `dest` (PEFT format, or a Strata side file), atomically (temp dir, then rename)."""
    held = getattr(model, STRATA_ATTR, None)
    if held is not None:
        if held["name"] != name:
            raise ValueError(f"the model holds Strata adapter {held['name']!r}, not {name!r}")
        return custom.save_side(model, dest, held)
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        raise ValueError(f"the model holds no adapter {name!r} (it has {sorted(adapter_kinds(model))})")
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


def named_adapter_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter `name` of any kind, trainable or not, by full parameter name."""
    held = getattr(model, STRATA_ATTR, None)
    if held is not None and held["name"] == name:
        return custom.adapter_parameters(model)
    # PEFT puts the adapter name in every parameter it owns (lora_A.<name>.weight, prompt_encoder.<name>...).
    return {n: p for n, p in model.named_parameters() if f".{name}." in n}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer should see."""
    return [p for p in model.parameters() if p.requires_grad]
