"""What a registry version says about itself, and the checks that it fits the stream's backbone.

The checks run at registration, so an adapter for another backbone fails when it is pushed, not
when a serving replica first loads it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    import torch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


class IncompatibleAdapter(ValueError):
    """An adapter that does not fit the backbone of the stream it is pushed to."""


@dataclass(frozen=True)
class BackboneInfo:
    """The backbone an adapter is for: where it came from, its hashes, and its module shapes."""

    source: str
    fingerprint: str  # config and weights together; what must match
    config_sha256: str
    weights_sha256: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)  # module -> weight shape

    def card(self) -> dict:
        """The card's backbone entry."""
        return {"source": self.source, "fingerprint": self.fingerprint,
                "config_sha256": self.config_sha256, "weights_sha256": self.weights_sha256}


def backbone_info(source: str, path: Path, model: torch.nn.Module) -> BackboneInfo:
    """A backbone's hashes and its modules' weight shapes (from the bare, unwrapped model)."""
    import torch  # here, so the registry CLI starts without torch and PEFT

    from strata.backbone.load import backbone_hashes, fingerprint

    config, weights = backbone_hashes(path)
    shapes = {name: tuple(m.weight.shape) if isinstance(getattr(m, "weight", None), torch.Tensor) else ()
              for name, m in model.named_modules()}
    return BackboneInfo(source, fingerprint(path), config, weights, shapes)


def check_compatible(ref, src: Path, backbone: BackboneInfo) -> None:
    """Refuse a PEFT adapter whose target modules or LoRA shapes do not exist in `backbone`."""
    config_path = src / PEFT_CONFIG
    if not config_path.exists():
        return  # a Strata side-file adapter: the stream's backbone fingerprint is what guards it
    targets = json.loads(config_path.read_text()).get("target_modules") or []
    names = list(backbone.shapes)
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise IncompatibleAdapter(f"{ref}: target_modules pattern {targets!r} matches no module of backbone "
                                f"{backbone.source}")
    else:
        for target in targets:
            if not any(n == target or n.endswith(f".{target}") for n in names):
                raise IncompatibleAdapter(f"{ref}: target module {target!r} does not exist in backbone {backbone.source}")
    weights = src / PEFT_WEIGHTS
    if weights.exists():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                check_lora_shape(ref, key, tuple(f.get_slice(key).get_shape()), backbone)


def check_lora_shape(ref, key: str, shape: tuple[int, ...], backbone: BackboneInfo) -> None:
    """A LoRA A (r, in) or B (out, r) matrix must fit the Linear it adapts."""
    m = LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
    if m is None:
        return
    module, side = m.groups()
    base = backbone.shapes.get(module)
    if base is None:
        raise IncompatibleAdapter(f"{ref}: {key} adapts module {module!r}, which backbone {backbone.source} does not have")
    if len(base) == 2 and ((side == "A" and shape[1] != base[1]) or (side == "B" and shape[0] != base[0])):
        raise IncompatibleAdapter(f"{ref}: {key} has shape {list(shape)}, but {module} of backbone {backbone.source} "
                            f"has weight shape {list(base)} (out, in)")
