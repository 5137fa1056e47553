"""Cross-modality MoE adapters (CMA, arXiv:2511.06723): top-k gated bottleneck experts after the last LM blocks.

In a LLaVA model image and text tokens meet in the language model, so each of the last B decoder
blocks is wrapped: h ← h + Σ_{e ∈ topk} g_e(h)·E_e(h), with per-token gating (logits = h W_g, top-k,
softmax over the k chosen). Experts are zero-initialised bottleneck MLPs, so a fresh adapter is the
identity. Each expert is its own module so it can be frozen on its own (requires_grad=False keeps it
out of the optimizer). The last wrapped block also owns the small joint-representation heads
(per-modality projections + fusion) that the CMA alignment and preservation losses use.

Usage counting: a block sees no padding mask (only the 4-D attention mask), so in training mode each
layer keeps its last top-k choices and `record_usage` counts them over the positions the caller
names (CMA: the text tokens). Freezing an expert also pins its gate row (`CrossModalMoE.gate_weight`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from strata.adapters import custom
from strata.backbone.families import family_of
from strata.backbone.features import masked_mean

KIND = "cma"
VERSION = 1  # bump when the side-file config changes shape


class Expert(nn.Module):
    """A bottleneck MLP D → hidden → D whose up-projection starts at zero (output 0 at init)."""

    def __init__(self, dim: int, hidden: int, ref: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden, device=ref.device, dtype=ref.dtype)
        self.up = nn.Linear(hidden, dim, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D)."""
        return self.up(F.gelu(self.down(x)))


class JointHead(nn.Module):
    """Pooled image / text states → per-modality projections z_v, z_t → fusion of both → z_joint."""

    def __init__(self, dim: int, width: int, ref: torch.Tensor) -> None:
        super().__init__()
        self.proj_v = nn.Linear(dim, width, device=ref.device, dtype=ref.dtype)
        self.proj_t = nn.Linear(dim, width, device=ref.device, dtype=ref.dtype)
        self.fusion = nn.Linear(2 * width, width, device=ref.device, dtype=ref.dtype)

    def forward(self, hidden: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden (B, L, D), image/text (B, L) bool masks -> z_v, z_t, z_joint, each (B, width)."""
        z_v = self.proj_v(masked_mean(hidden, image))
        z_t = self.proj_t(masked_mean(hidden, text))
        return z_v, z_t, self.fusion(torch.cat([z_v, z_t], dim=-1))


class CrossModalMoE(custom.StrataLayer):
    """A frozen decoder block (`base`) followed by a residual top-k mixture of bottleneck experts."""

    def __init__(self, base: nn.Module, dim: int, experts: int, top_k: int, hidden: int, joint: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
        ref = custom.float_reference(base)
        self.base = base
        self.top_k = top_k
        self.gate = nn.Linear(dim, experts, bias=False, device=ref.device, dtype=ref.dtype)
        self.experts = nn.ModuleList(Expert(dim, hidden, ref) for _ in range(experts))
        self.joint = JointHead(dim, hidden, ref) if joint else None
        # Top-k selections per expert over the task so far (saved with the adapter, not a weight).
        self.register_buffer("counts", torch.zeros(experts, dtype=torch.float64, device=ref.device), persistent=False)
        self.last_choice: torch.Tensor | None = None  # (B, L, k) expert ids of the last training forward
        # The frozen experts' ids and gate rows as they were at freezing: buffers, so they follow .to().
        self.register_buffer("frozen_ids", None, persistent=False)
        self.register_buffer("pinned", None, persistent=False)

    def freeze(self, mask: list[bool]) -> None:
        """Freeze the marked experts and pin their gate rows, so old tasks' tokens keep their routes."""
        for expert, is_frozen in zip(self.experts, mask):
            if is_frozen:
                expert.requires_grad_(False)
        ids = [e for e, is_frozen in enumerate(mask) if is_frozen]
        self.frozen_ids = torch.tensor(ids, device=self.gate.weight.device) if ids else None
        self.pinned = self.gate.weight.detach()[ids].clone() if ids else None

    def gate_weight(self) -> torch.Tensor:
        """The gate's weight with the pinned rows in place (out of place, so they get no gradient).

        The gate trains as a whole and AdamW's weight decay moves rows whose gradient is zero, so the
        parameter's frozen rows may drift; these pinned values are the ones used and saved.
        """
        weight = self.gate.weight
        return weight if self.pinned is None else weight.index_put((self.frozen_ids,), self.pinned)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token gate: (N, D) -> weights (N, k) (softmax over the k chosen) and expert ids (N, k)."""
        top, idx = F.linear(h, self.gate_weight()).topk(self.top_k, dim=-1)
        return top.softmax(dim=-1), idx

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The block's output plus the gated sum of its top-k experts (the block returns a tensor)."""
        h = self.base(*args, **kwargs)  # (B, L, D)
        flat = h.reshape(-1, h.shape[-1])  # (N, D)
        weights, idx = self.route(flat)  # (N, k), (N, k)
        if self.training:
            self.last_choice = idx.detach().reshape(*h.shape[:-1], self.top_k)
        mixed = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)  # tokens that chose expert e, and in which slot
            # No skip when no token chose e: the empty call still puts e in the graph, so under DDP
            # (no find_unused_parameters) every trainable expert gets a (zero) gradient each step.
            mixed.index_add_(0, token, weights[token, slot, None] * expert(flat[token]))
        return h + mixed.reshape(h.shape)


def attach(model: nn.Module, blocks: int | None, experts: int, top_k: int, hidden: int) -> list[str]:
    """Wrap the last `blocks` decoder blocks of the LM (None: all); returns the wrapped names, in depth order."""
    family = family_of(model.config)
    found = sorted((i, n) for n in dict(model.named_modules()) if (i := family.lm_layer_index(n)) is not None)
    if not found:
        raise ValueError(f"{type(model).__name__} has no LM decoder layers ({family.text_layers}.N) to adapt")
    blocks = len(found) if blocks is None else blocks
    if not 1 <= blocks <= len(found):
        raise ValueError(f"cma blocks must be in [1, {len(found)}] (the LM's layer count), got {blocks}")
    names = [n for _, n in found[-blocks:]]
    return _wrap(model, names, experts, top_k, hidden)


def _wrap(model: nn.Module, names: list[str], experts: int, top_k: int, hidden: int) -> list[str]:
    if moe_layers(model):
        raise ValueError("the model already holds CMA layers; attach them to a fresh backbone")
    dim = model.config.get_text_config().hidden_size
    for name in names:
        block = model.get_submodule(name)
        custom.replace_module(model, name, CrossModalMoE(block, dim, experts, top_k, hidden, joint=name == names[-1]))
    return names


def moe_layers(model: nn.Module) -> dict[str, CrossModalMoE]:
    """Every CMA layer in the model, by module name, in depth order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CrossModalMoE)}


def joint_head(model: nn.Module) -> tuple[str, JointHead]:
    """The joint-representation heads (module name, module); they live on the last CMA layer."""
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, JointHead)]
    if len(heads) != 1:
        raise ValueError(f"expected one CMA joint head in the model, found {len(heads)}")
    return heads[0]


@torch.no_grad()
def record_usage(model: nn.Module, mask: torch.Tensor) -> None:
    """Add the last training forward's top-k choices at the (B, L) mask's positions to each layer's counts."""
    real = mask.bool()  # (B, L)
    for name, layer in moe_layers(model).items():
        if layer.last_choice is None:
            raise ValueError(f"CMA layer {name} has no recorded choices: run a training-mode forward first")
        chosen = layer.last_choice[real]  # (N_real, k)
        layer.counts += torch.bincount(chosen.flatten(), minlength=len(layer.experts)).to(layer.counts)
        layer.last_choice = None  # each forward is counted once


def shares(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the top-k selections, summing to 1 (uniform when nothing was counted)."""
    counts = counts.double()
    total = counts.sum()
    return counts / total if total > 0 else torch.full_like(counts, 1.0 / len(counts))


def entropy(p: torch.Tensor) -> float:
    """Entropy (nats) of a distribution; log(E) means perfectly even use, 0 one expert only."""
    p = p[p > 0]
    return float(-(p * p.log()).sum()) if len(p) else 0.0


def freeze_experts(model: nn.Module, masks: dict[str, list[bool]]) -> int:
    """Freeze every expert marked in `masks` and pin its gate row (call before the optimizer is built)."""
    layers = moe_layers(model)
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"freeze masks name layers the model lacks: {unknown} (it has {sorted(layers)})")
    for name, mask in masks.items():
        if len(mask) != len(layers[name].experts):
            raise ValueError(f"freeze mask of {name} has {len(mask)} entries, the layer has "
                             f"{len(layers[name].experts)} experts")
        layers[name].freeze(mask)
    return sum(sum(mask) for mask in masks.values())


def side_config(model: nn.Module) -> dict:
    """The JSON config that rebuilds the model's CMA layers."""
    layers = moe_layers(model)
    first = next(iter(layers.values()))
    return {"kind": KIND, "version": VERSION, "layers": list(layers), "experts": len(first.experts),
            "top_k": first.top_k, "hidden": first.experts[0].down.out_features}


def save(model: nn.Module, dest: Path) -> Path:
    """Write all CMA weights, the joint heads and each layer's usage counts to `dest`, atomically."""
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.gate.weight.copy_(layer.gate_weight())  # the rows the layer used, not drifted ones
    counts = {f"{name}.counts": layer.counts for name, layer in moe_layers(model).items()}
    return custom.save_side(model, dest, side_config(model), counts)


def read_counts(src: Path) -> dict[str, torch.Tensor]:
    """Per-layer usage counts stored in a saved CMA adapter."""
    config, tensors = custom.read_side(src)
    _check_config(config, src)
    return {name: tensors[f"{name}.counts"] for name in config["layers"]}


def load(model: nn.Module, src: Path, trainable: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the CMA layers saved in `src` on a fresh backbone and load their weights; returns (model, config)."""
    config, tensors = custom.read_side(src)
    _check_config(config, src)
    _wrap(model, config["layers"], config["experts"], config["top_k"], config["hidden"])
    custom.load_side_state(model, tensors, src)
    for p in custom.adapter_parameters(model).values():
        p.requires_grad_(trainable)
    return model, config


def _check_config(config: dict, src: Path) -> None:
    if config.get("kind") != KIND or config.get("version") != VERSION:
        raise ValueError(f"{src} holds a {config.get('kind')!r} adapter (version {config.get('version')!r}), "
                         f"not a CMA adapter of version {VERSION}")
