"""Strata-kind adapter layers (no PEFT equivalent): module surgery and safetensors side files.

Every Strata layer wraps one frozen backbone module as `self.base`; its own parameters (everything
not under `base.`) are the adapter. A saved adapter is one safetensors file whose metadata holds
the JSON config needed to rebuild the layers before the weights are loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from strata.atomic import replace_dir

SIDE_FILE = "strata_adapter.safetensors"


class StrataLayer(torch.nn.Module):
    """Marker base: a frozen `base` module plus trainable adapter parameters around it."""

    base: torch.nn.Module


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def wrap(model: torch.nn.Module, pattern: str, factory: Callable[[str, torch.nn.Module], StrataLayer]) -> list[str]:
    """Wrap every module whose full name matches `pattern` (full match); returns the names wrapped."""
    names = [n for n, m in model.named_modules() if re.fullmatch(pattern, n) and not isinstance(m, StrataLayer)]
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches {pattern!r}")
    for name in names:
        replace_module(model, name, factory(name, model.get_submodule(name)))
    return names


def layers(model: torch.nn.Module) -> dict[str, StrataLayer]:
    """Every Strata layer in the model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StrataLayer)}


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter's own parameters (not the wrapped base modules'), by full name."""
    out = {}
    for lname, layer in layers(model).items():
        for pname, p in layer.named_parameters():
            if not pname.startswith("base."):
                out[f"{lname}.{pname}"] = p
    return out


def save_side(model: torch.nn.Module, dest: Path, config: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter weights (plus `extra` tensors) and `config` to directory `dest`, atomically."""
    tensors = {k: p.detach().contiguous().cpu() for k, p in adapter_parameters(model).items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        save_file(tensors, str(tmp / SIDE_FILE), metadata={"strata_adapter": json.dumps(config)})
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_side(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and every tensor of a saved side file in directory `src`."""
    path = Path(src) / SIDE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{src} holds no Strata adapter ({SIDE_FILE} missing)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "strata_adapter" not in meta:
            raise ValueError(f"{path} has no 'strata_adapter' config in its metadata")
        return json.loads(meta["strata_adapter"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_side_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], src: Path | str = "") -> None:
    """Copy saved adapter weights into the (already rebuilt) Strata layers; names must match."""
    params = adapter_parameters(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"adapter {src} lacks {len(missing)} weight(s), e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"adapter {src}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name])


def float_reference(base: torch.nn.Module) -> torch.Tensor:
    """A tensor whose device and dtype new adapter weights should take: the base layer's first
    floating-point parameter, or float32 on its device when its weights are 4-/8-bit integers."""
    params = list(base.parameters())
    for p in params:
        if p.is_floating_point():
            return p
    return torch.empty(0, device=params[0].device if params else "cpu", dtype=torch.float32)
