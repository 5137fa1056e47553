"""Backbone families: where each supported VLM architecture keeps its parts (docs/ARCHITECTURE.md,
"Backbone families").

A family is one small description, one module of this package: regexes over `named_modules()`
names for its vision layers, projector and LM layers, how many vision layers feed the LM, and the
top-level parts that stay in full precision under QLoRA. Placement, quantization and
`strata backbone inspect` read these descriptions; no other module names a family's modules.
Names are matched with any prefix, because a PEFT wrapper or a `ForConditionalGeneration` class
puts its own in front.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

# The linear layers of a Llama-style decoder layer (Llama, Qwen2, Gemma 3 and the rest here).
LM_LINEARS = r"(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The linear layers of a CLIP or SigLIP encoder layer.
CLIP_LINEARS = r"(self_attn|mlp)\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def feature_layer_depth(config: Any) -> int:
    """Vision layers that feed the LM when the config names the layer it reads (`vision_feature_layer`;
    LLaVA reads -2, so the last layer is dead)."""
    n = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    return max(n + 1 + layer if layer < 0 else layer for layer in layers)


def every_layer(config: Any) -> int:
    """Vision layers that feed the LM when the tower's last layer is read: all of them."""
    vision = config.vision_config
    return getattr(vision, "depth", None) or vision.num_hidden_layers


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts, as regexes over module names (without any prefix)."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values this description covers
    vision_layers: str  # the vision tower's list of layers, e.g. vision_tower.encoder.layers
    vision_linears: str  # the linear layers inside one vision layer, relative to it
    text_layers: str  # the LM's list of decoder layers
    projector: str | None  # the projector's linear layers; None: it has none to adapt
    projector_block: str  # the projector module, which a bottleneck adapter follows
    vision_parts: tuple[str, ...]  # the model's top-level vision-side modules: tower(s) and projector
    depth: Callable[[Any], int] = every_layer  # vision layers that feed the LM
    text_linears: str = LM_LINEARS
    chat_template: str | None = None  # for a processor saved without one
    # How to load the processor from a directory; None: transformers' AutoProcessor.
    load_processor: Callable[[Any], Any] | None = None
    refused_kinds: dict[str, str] = field(default_factory=dict)  # adapter kind -> why it cannot work here
    note: str = ""  # what users of this family should know (shown by `strata backbone inspect`)

    def vision_block(self, layers: tuple[int, ...]) -> str:
        """Regex (any prefix) of the vision layers with these indices."""
        return rf"(.*\.)?{self.vision_layers}\.({'|'.join(map(str, layers))})"

    def text_block(self, layers: tuple[int, ...]) -> str:
        """Regex (any prefix) of the LM layers with these indices."""
        return rf"(.*\.)?{self.text_layers}\.({'|'.join(map(str, layers))})"

    def is_vision(self, name: str) -> bool:
        """Whether module `name` sits on the vision side (a tower or the projector)."""
        return any(re.search(rf"(^|\.){re.escape(part)}(\.|$)", name) for part in self.vision_parts)

    def lm_layer_index(self, name: str) -> int | None:
        """The layer index if `name` is one of the LM's decoder layers, else None."""
        m = re.fullmatch(rf"(.*\.)?{self.text_layers}\.(\d+)", name)
        return int(m.group(m.lastindex)) if m else None

    def quantization_skip(self) -> tuple[str, ...]:
        """Module names kept in full precision under QLoRA: the output head and the vision side.

        transformers 5 matches them against full module names from the start, so they carry the
        "model." prefix that every `...ForConditionalGeneration` puts in front of its parts.
        """
        return ("lm_head", *(f"model.{part}" for part in self.vision_parts))


class UnsupportedBackbone(ValueError):
    """A model whose architecture no family describes."""


_BY_TYPE: dict[str, Family] = {}
_MODULES = ("llava", "llava_onevision", "qwen2_vl", "qwen3_vl", "idefics3", "gemma3", "internvl")


def register(family: Family) -> Family:
    """Make `family` the description of its model types."""
    for model_type in family.model_types:
        _BY_TYPE[model_type] = family
    return family


def _load() -> None:
    for module in _MODULES:  # a no-op once imported; importing one family directly must not hide the rest
        import_module(f"{__name__}.{module}")


def families() -> list[Family]:
    """Every supported family, in a stable order."""
    _load()
    return list(dict.fromkeys(_BY_TYPE.values()))


def supported_types() -> list[str]:
    """Every supported `config.model_type`, sorted."""
    _load()
    return sorted(_BY_TYPE)


def family_of(config: Any) -> Family:
    """The family of a model config (or of a model: its `.config`); refuses an unsupported one."""
    config = getattr(config, "config", config)
    _load()
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_TYPE:
        raise UnsupportedBackbone(f"unsupported backbone architecture {model_type!r} "
                                  f"({type(config).__name__}); supported model types: {', '.join(supported_types())}")
    return _BY_TYPE[model_type]
