"""Where an adapter sits: which layers of which tower, which kinds fit which placements, per-layer ranks.

A vision-language model has two towers joined by a projector: the vision tower (only the layers
that feed the LM count, see `used_vision_layers`) and the language model. Where each part sits in a
given architecture comes from its family's description (strata/backbone/families/). A placement picks layer indices within
EACH tower, counting from 0 at the input end, with n the tower's layer count:

    all, vision_only, language_only   every layer: 0 .. n-1
    top_half                          the last ceil(n/2) layers: n//2 .. n-1 (top = closest to the output)
    bottom_half                       the first ceil(n/2) layers: 0 .. ceil(n/2)-1
    every_other                       the even layers: 0, 2, 4, ...

With an odd n the middle layer belongs to both halves, so neither half is ever empty. The projector
is the output end of the vision side: all, vision_only and top_half adapt it; bottom_half and
every_other leave it frozen. vision_only drops the LM, language_only drops the vision side and the
projector, and a side whose rank is 0 is left out whatever the placement says.

Per-layer (adaptive) rank: `AdapterSpec.layer_ranks` maps a regex to a rank (LoRA/DoRA rank,
bottleneck width). A regex is matched the way PEFT matches `rank_pattern` keys, against the end of
the module name (`(.*\\.)?(regex)$`); the first matching key in the user's order wins, and a key
that matches none of the adapter's modules is an error. `select` resolves the keys to one rank per
module, and PEFT receives those exact names (it saves rank_pattern with sorted keys, which would
otherwise reorder overlapping regexes).
"""

from __future__ import annotations

import re

import torch

from strata.backbone.families import family_of
from strata.config import PLACEMENTS, AdapterSpec

# Which placements each kind supports (the same on every family; see WHY for the limits).
COMPATIBLE: dict[str, tuple[str, ...]] = {
    "lora": PLACEMENTS,
    "dora": PLACEMENTS,
    "bottleneck": PLACEMENTS,
    "prefix": ("language_only",),
    "bitfit": ("vision_only",),
}
WHY: dict[str, str] = {  # why a kind is limited; quoted in the error and in the published table
    "prefix": "prefix tuning prepends virtual keys/values to every attention layer of the LM, so it has no "
              "vision side and no per-layer choice; use language_only",
    "bitfit": "Llama linear layers have no biases, so BitFit on the LM would train nothing; use vision_only "
              "(the CLIP tower and the projector have biases)",
}
PER_LAYER_RANK = ("lora", "dora", "bottleneck")  # kinds for which layer_ranks means something


def used_vision_layers(config) -> int:
    """How many vision-tower layers feed the LM (LLaVA reads layer -2, so its last one is dead)."""
    return family_of(config).depth(config)


def tower_layers(placement: str, n: int) -> tuple[int, ...]:
    """Indices (0 = input end) that `placement` picks in a tower of `n` layers (see the module doc)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "top_half":
        return tuple(range(n // 2, n))
    if placement == "bottom_half":
        return tuple(range((n + 1) // 2))
    if placement == "every_other":
        return tuple(range(0, n, 2))
    return tuple(range(n))


def layer_plan(spec: AdapterSpec, config) -> tuple[tuple[int, ...], bool, tuple[int, ...]]:
    """(vision layer indices, projector adapted?, LM layer indices) for `spec` on a model `config`."""
    check_kind(spec)
    family = family_of(config)
    if spec.kind in family.refused_kinds:
        raise ValueError(f"adapter kind {spec.kind!r} does not work on the {family.name} family: "
                         f"{family.refused_kinds[spec.kind]}")
    vision_side = spec.visual_rank > 0 and spec.placement != "language_only"
    text_side = spec.text_rank > 0 and spec.placement != "vision_only"
    vision = tower_layers(spec.placement, family.depth(config)) if vision_side else ()
    projector = vision_side and spec.placement in ("all", "vision_only", "top_half")
    text = tower_layers(spec.placement, config.text_config.num_hidden_layers) if text_side else ()
    if not (vision or projector or text):
        raise ValueError(f"placement {spec.placement!r} with visual_rank={spec.visual_rank}, "
                         f"text_rank={spec.text_rank} selects no layer: give the placed side a rank > 0")
    return vision, projector, text


def pattern(spec: AdapterSpec, config) -> str:
    """Regex (full match, any prefix) of the module names the adapter of `spec` attaches to."""
    vision, projector, text = layer_plan(spec, config)
    family = family_of(config)  # a projector without linears (Gemma 3) takes a bottleneck but no LoRA
    vision_block, text_block = family.vision_block(vision), family.text_block(text)
    if spec.kind == "prefix":  # PEFT puts virtual keys/values into every LM attention layer
        sides = [rf"{text_block}\.self_attn"]
    elif spec.kind == "bottleneck":  # an adapter after each selected block's MLP (the projector is one)
        sides = [rf"{vision_block}\.mlp"] * bool(vision)
        sides += [rf"(.*\.)?{re.escape(family.projector_block)}"] * projector
        sides += [rf"{text_block}\.mlp"] * bool(text)
    else:  # lora, dora and bitfit act on linear layers
        sides = [rf"{vision_block}\.{family.vision_linears}"] * bool(vision)
        sides += [rf"(.*\.)?{family.projector}"] * (projector and family.projector is not None)
        sides += [rf"{text_block}\.{family.text_linears}"] * bool(text)
    return "|".join(f"({s})" for s in sides)


def rank_key(patterns: list[str], name: str) -> str | None:
    """The first key of `patterns` matching module `name` the way PEFT's rank_pattern does, or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # PEFT prefixes names with base_model.model.; ranks and side files use the backbone's own names.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def select(spec: AdapterSpec, model: torch.nn.Module) -> dict[str, int]:
    """Module name -> rank (bottleneck width, prefix length; 0 for BitFit) of every module the adapter
    of `spec` attaches to on `model`, named as in the backbone's `named_modules()`."""
    model = _unwrap(model)
    check_static(spec, getattr(model, "config", None))
    regex = re.compile(pattern(spec, model.config))
    names = [n for n, _ in model.named_modules() if regex.fullmatch(n)]
    if spec.kind == "bitfit":  # BitFit trains bias deltas, so it can only use linears that have a bias
        names = [n for n in names if getattr(model.get_submodule(n), "bias", None) is not None]
        if not names:
            raise ValueError(f"BitFit with placement {spec.placement!r}: none of the selected linear layers of "
                             f"{type(model).__name__} has a bias, so there is nothing to train")
        return dict.fromkeys(names, 0)
    family = family_of(model.config)
    if not names:
        raise ValueError(f"placement {spec.placement!r} matches no module of {type(model).__name__}, whose "
                         f"config says family {family.name!r}: its module names differ from that description")
    ranks = {}
    for name in names:
        key = rank_key(list(spec.layer_ranks), name)
        visual = family.is_vision(name)
        ranks[name] = spec.layer_ranks[key] if key is not None else spec.visual_rank if visual else spec.text_rank
    for key in spec.layer_ranks:
        if not any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            raise ValueError(f"adapter.layer_ranks key {key!r} matches none of the {len(names)} modules this "
                             f"adapter attaches to (matched against the end of names such as {names[0]!r})")
    return ranks


def check_kind(spec: AdapterSpec) -> None:
    """Refuse a kind/placement pair outside the published compatibility table."""
    allowed = COMPATIBLE[spec.kind]
    if spec.placement not in allowed:
        raise ValueError(f"adapter kind {spec.kind!r} does not support placement {spec.placement!r} "
                         f"(supported: {', '.join(allowed)}): {WHY.get(spec.kind, '')}")
    if spec.layer_ranks and spec.kind not in PER_LAYER_RANK:
        raise ValueError(f"adapter kind {spec.kind!r} has no per-layer rank; drop adapter.layer_ranks "
                         f"(only {', '.join(PER_LAYER_RANK)} use it)")


def check_static(spec: AdapterSpec, config) -> None:
    """What can be refused from the model config alone: the table, and a placement that selects nothing."""
    check_kind(spec)
    layer_plan(spec, config)


def check(spec: AdapterSpec, model_or_config) -> None:
    """Refuse `spec` with a clear ValueError if it cannot work; a model (not just its config) is also
    checked module by module: BitFit needs biases, and every layer_ranks key must match a module."""
    if isinstance(model_or_config, torch.nn.Module):
        select(spec, model_or_config)
    else:
        check_static(spec, model_or_config)


def compatibility_markdown() -> str:
    """The compatibility table (kinds x placements) as markdown, for the README."""
    lines = ["| kind | " + " | ".join(PLACEMENTS) + " |", "|---|" + "---|" * len(PLACEMENTS)]
    for kind, allowed in COMPATIBLE.items():
        lines.append(f"| {kind} | " + " | ".join("yes" if p in allowed else "no" for p in PLACEMENTS) + " |")
    notes = [f"- **{kind}**: {why}." for kind, why in WHY.items()]
    return "\n".join(lines + [""] + notes) + "\n"
