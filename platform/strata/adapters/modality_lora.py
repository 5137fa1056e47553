"""Modality-routed LoRA (MoDE, arXiv:2512.03125): a T-MoE for text tokens and a V-Adapter for image tokens.

In every LM linear, out = base(x) + Δ, chosen per token:
  text token:  Δ_t = Σ_j g_j(x) · B_j A_j x · s,  g(x) = softmax(x W_g)   (ϕ: router + n experts)
  image token: Δ_v = B_v A_v x · s                                          (ψ: one LoRA)
with s = alpha_ratio and every B zero-initialised, so a fresh adapter is the backbone. The coupled
baseline (modality-coupled MoE-LoRA) sends every token through the T-MoE and has no ψ.

The token type is read from the image-token positions of `input_ids` by a forward pre-hook on the
top model, which writes the (B, L) mask into a `ModalityContext` shared by all layers. Under
KV-cached generation later steps feed only the new (text) tokens, and the mask follows them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from strata.adapters import custom
from strata.backbone.families import family_of
from strata.config import AdapterSpec

KIND = "mode"  # the side file's kind
VERSION = 1  # bump when the side-file layout changes
CONTEXT_ATTR = "strata_modality"  # model attribute holding the shared ModalityContext


@dataclass(frozen=True)
class ModalityLoRAConfig:
    """Shapes of the modality-routed layers; saved in the side file so they can be rebuilt."""

    experts: int = 4  # LoRA experts in each T-MoE
    rank: int = 8  # rank of every expert and of the V-Adapter
    alpha_ratio: float = 2.0  # scaling s = alpha / rank = alpha_ratio
    dropout: float = 0.0  # on the adapter input only
    coupled: bool = False  # True: no V-Adapter, every token goes through the T-MoE

    def __post_init__(self) -> None:
        if self.experts < 1 or self.rank < 1:
            raise ValueError(f"experts and rank must be >= 1, got {self.experts}, {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_options(cls, opts, spec: AdapterSpec) -> ModalityLoRAConfig:
        """The layer config of a MoDE run: expert shapes from MoDE's `opts`, scaling and dropout from `spec`."""
        return cls(opts.experts, opts.rank, spec.alpha_ratio, spec.dropout, opts.coupled)


@dataclass
class ModalityContext:
    """State every layer of one model reads: the image mask of the current forward, and switches."""

    image_token_id: int
    image_mask: torch.Tensor | None = None  # (B, L) bool, True at image-token positions
    attention_mask: torch.Tensor | None = None  # (B, L_total) of the current forward, for router stats
    disabled: bool = False  # every Δ is skipped: the model is the frozen backbone (KD teacher)
    detach_text: bool = False  # Δ_t is detached: same forward value, no gradient into ϕ
    config: ModalityLoRAConfig | None = None
    hook: torch.utils.hooks.RemovableHandle | None = None


def _lora_a(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    # LoRA's A init: kaiming-uniform with a=sqrt(5) is U(-1/sqrt(d_in), 1/sqrt(d_in)), here per expert.
    bound = 1.0 / math.sqrt(shape[-1])
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype).uniform_(-bound, bound))


class TextMoE(nn.Module):
    """n LoRA experts mixed per token by a soft router: Σ_j softmax(x W_g)_j · B_j A_j x."""

    def __init__(self, d_in: int, d_out: int, experts: int, rank: int, like: torch.Tensor) -> None:
        super().__init__()
        self.router = nn.Linear(d_in, experts, bias=False, device=like.device, dtype=like.dtype)  # W_g
        self.lora_a = _lora_a((experts, rank, d_in), like)  # (E, r, d_in)
        self.lora_b = nn.Parameter(torch.zeros(experts, d_out, rank, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ before scaling (B, L, d_out), routing weights (B, L, E))."""
        gates = torch.softmax(self.router(x), dim=-1)  # (B, L, E)
        h = torch.einsum("bld,erd->bler", x, self.lora_a)  # (B, L, E, r)
        return torch.einsum("bler,eor->blo", h * gates.unsqueeze(-1), self.lora_b), gates


class VisualLoRA(nn.Module):
    """One LoRA: B A x."""

    def __init__(self, d_in: int, d_out: int, rank: int, like: torch.Tensor) -> None:
        super().__init__()
        self.lora_a = _lora_a((rank, d_in), like)  # (r, d_in)
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Δ before scaling, (B, L, d_out)."""
        return x @ self.lora_a.T @ self.lora_b.T


class ModalityLoRA(custom.StrataLayer):
    """A frozen linear (`base`) plus a T-MoE (`text`, ϕ) and, unless coupled, a V-Adapter (`visual`, ψ)."""

    def __init__(self, base: nn.Linear, ctx: ModalityContext, cfg: ModalityLoRAConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"modality-routed LoRA wraps nn.Linear layers, not {type(base).__name__}")
        self.base = base
        self.ctx = ctx  # a plain object, not a submodule: shared by every layer of the model
        self.scaling = cfg.alpha_ratio
        self.dropout = nn.Dropout(cfg.dropout)
        like = custom.float_reference(base)  # never the 4-bit weight's integer dtype
        self.text = TextMoE(base.in_features, base.out_features, cfg.experts, cfg.rank, like)
        self.visual = None if cfg.coupled else VisualLoRA(base.in_features, base.out_features, cfg.rank, like)
        self.reset_stats(cfg.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus Δ_t at text tokens and Δ_v at image tokens (Δ_t everywhere when coupled)."""
        out = self.base(x)  # (B, L, d_out)
        ctx = self.ctx
        if ctx.disabled:
            return out
        image = ctx.image_mask
        if image is None or image.shape != x.shape[:-1]:
            got = None if image is None else tuple(image.shape)
            raise RuntimeError(f"modality mask {got} does not fit the layer input {tuple(x.shape[:-1])}: "
                               "call the top model with input_ids so its pre-hook can set the mask")
        h = self.dropout(x)
        delta_t, gates = self.text(h)
        self._record(gates, image)
        if ctx.detach_text:
            delta_t = delta_t.detach()  # the value stays; only the gradient path into ϕ is cut
        if self.visual is None:
            return out + delta_t * self.scaling
        # torch.where sends exactly zero gradient to the branch it does not pick, so the routing is exact.
        delta = torch.where(image.unsqueeze(-1), self.visual(h), delta_t)
        return out + delta * self.scaling

    def reset_stats(self, experts: int) -> None:
        """Zero the routing statistics (kept on the adapter's device: no host sync per forward)."""
        like = self.text.router.weight
        self.gate_sum = torch.zeros(experts, device=like.device)  # routing weights summed over served tokens
        self.entropy_sum = torch.zeros((), device=like.device)
        self.tokens = torch.zeros((), device=like.device)

    @torch.no_grad()
    def _record(self, gates: torch.Tensor, image: torch.Tensor) -> None:
        """Accumulate routing statistics over attended tokens the T-MoE serves."""
        served = torch.ones_like(image) if self.visual is None else ~image  # (B, L)
        mask = self.ctx.attention_mask
        if mask is not None and mask.shape[0] == image.shape[0] and mask.shape[1] >= image.shape[1]:
            served = served & mask[:, -image.shape[1]:].bool()  # cached generation: the last L columns
        g = gates.float() * served.unsqueeze(-1)  # (B, L, E), zero where not served
        self.gate_sum += g.sum((0, 1))
        self.entropy_sum += -(g * g.clamp_min(1e-12).log()).sum()
        self.tokens += served.sum()


def _routing_hook(ctx: ModalityContext):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a model with modality-routed LoRA needs input_ids in every forward (the image-token "
                             "positions decide which adapter a token uses); inputs_embeds alone cannot be routed")
        ctx.image_mask = input_ids == ctx.image_token_id  # (B, L)
        ctx.attention_mask = kwargs.get("attention_mask")
    return hook


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def context(model: nn.Module) -> ModalityContext:
    """The shared routing context of a model with modality-routed layers attached."""
    ctx = getattr(_unwrap(model), CONTEXT_ATTR, None)
    if ctx is None:
        raise ValueError(f"{type(model).__name__} has no modality-routed LoRA attached (call attach first)")
    return ctx


def attach(model: nn.Module, cfg: ModalityLoRAConfig) -> nn.Module:
    """Wrap every LM linear in a ModalityLoRA and register the routing pre-hook; a second call with the
    same config is a no-op, with a different one an error."""
    existing = getattr(model, CONTEXT_ATTR, None)
    if existing is not None:
        if existing.config != cfg:
            raise ValueError(f"the model already holds modality-routed LoRA {existing.config}; "
                             f"load a fresh backbone for {cfg}")
        return model
    if custom.layers(model):
        raise ValueError("the model already holds other Strata adapter layers; modality-routed LoRA needs a "
                         "fresh backbone")
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise ValueError(f"{type(model).__name__}.config has no image_token_id: MoDE needs a LLaVA-style model")
    ctx = ModalityContext(int(image_token_id), config=cfg)
    family = family_of(model.config)
    every_lm_linear = rf"(.*\.)?{family.text_layers}\.\d+\.{family.text_linears}"
    custom.wrap(model, every_lm_linear, lambda name, base: ModalityLoRA(base, ctx, cfg))
    ctx.hook = model.register_forward_pre_hook(_routing_hook(ctx), with_kwargs=True)
    setattr(model, CONTEXT_ATTR, ctx)
    return model


def _group(model: nn.Module, part: str) -> dict[str, nn.Parameter]:
    out = {}
    for lname, layer in custom.layers(_unwrap(model)).items():
        sub = getattr(layer, part, None) if isinstance(layer, ModalityLoRA) else None
        if sub is not None:
            out.update({f"{lname}.{part}.{pname}": p for pname, p in sub.named_parameters()})
    return out


def phi(model: nn.Module) -> dict[str, nn.Parameter]:
    """ϕ: the T-MoE parameters (routers and experts) of every layer, by full name."""
    return _group(model, "text")


def psi(model: nn.Module) -> dict[str, nn.Parameter]:
    """ψ: the V-Adapter parameters of every layer, by full name (empty for the coupled baseline)."""
    return _group(model, "visual")


@contextlib.contextmanager
def _flag_on(model: nn.Module, flag: str) -> Iterator[None]:
    ctx = context(model)
    before = getattr(ctx, flag)
    setattr(ctx, flag, True)
    try:
        yield
    finally:
        setattr(ctx, flag, before)


def adapters_disabled(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run the model as its frozen backbone (the KD teacher) inside this block."""
    return _flag_on(model, "disabled")


def text_detached(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Stop the gradient through ϕ inside this block; forward values are unchanged."""
    return _flag_on(model, "detach_text")


def router_stats(model: nn.Module, reset: bool = True) -> dict[str, object]:
    """Mean routing weight per expert and mean per-token router entropy (nats) since the last reset,
    over every layer and every attended token the T-MoE served."""
    mods = [m for m in custom.layers(_unwrap(model)).values() if isinstance(m, ModalityLoRA)]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no modality-routed LoRA attached")
    tokens = int(sum(m.tokens.item() for m in mods))
    weights = sum(m.gate_sum.cpu() for m in mods) / max(tokens, 1)
    entropy = sum(m.entropy_sum.item() for m in mods) / max(tokens, 1)
    if reset:
        for m in mods:
            m.reset_stats(len(m.gate_sum))
    return {"expert_weight": [float(w) for w in weights], "entropy": entropy, "tokens": tokens}


def save(model: nn.Module, dest: Path) -> Path:
    """Write ϕ and ψ with the config that rebuilds the layers, as a Strata side file (atomically)."""
    cfg = context(model).config
    return custom.save_side(_unwrap(model), dest, {"kind": KIND, "version": VERSION, **dataclasses.asdict(cfg)})


def read_config(src: Path) -> tuple[ModalityLoRAConfig, dict[str, torch.Tensor]]:
    """The layer config and tensors of a saved modality-routed adapter."""
    config, tensors = custom.read_side(src)
    if config.get("kind") != KIND or config.get("version") != VERSION:
        raise ValueError(f"{src} holds a {config.get('kind')!r} v{config.get('version')} side file, "
                         f"not a {KIND!r} v{VERSION} adapter")
    fields = {f.name for f in dataclasses.fields(ModalityLoRAConfig)}
    return ModalityLoRAConfig(**{k: v for k, v in config.items() if k in fields}), tensors


def load(model: nn.Module, src: Path, trainable: bool = False) -> nn.Module:
    """Attach the saved layers to `model` (a fresh backbone, or one already holding the same config)
    and copy their weights in; only a trainable load gets gradients."""
    cfg, tensors = read_config(src)
    attach(model, cfg)
    custom.load_side_state(model, tensors, src)
    for p in {**phi(model), **psi(model)}.values():
        p.requires_grad_(trainable)
    return model
