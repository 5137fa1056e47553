"""Bottleneck adapters (Houlsby/Pfeiffer style): a small residual MLP after each selected block's MLP.

h = mlp(x);  out = h + up(act(down(h)))  with `up` zero-initialised, so a fresh adapter is the
identity and training starts from the backbone's own outputs. Works on both towers and on the
projector (itself an MLP). The width is the side's rank, or the layer's `layer_ranks` entry.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from strata.adapters import custom


class Bottleneck(custom.StrataLayer):
    """A frozen block (`base`) followed by a zero-initialised residual bottleneck of width `width`."""

    def __init__(self, base: nn.Module, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        dim = output_width(base)
        ref = custom.float_reference(base)
        self.down = nn.Linear(dim, width, device=ref.device, dtype=ref.dtype)
        self.up = nn.Linear(width, dim, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.up.weight)  # identity at init: the backbone's behaviour is the starting point
        nn.init.zeros_(self.up.bias)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The block's output plus the bottleneck's residual correction."""
        h = self.base(*args, **kwargs)  # (B, T, dim)
        return h + self.up(self.dropout(self.act(self.down(h))))


def output_width(block: nn.Module) -> int:
    """A block's output width: the out_features of its last linear (fc2, down_proj, linear_2), or of
    a bare projection matrix applied as `x @ W` (Gemma 3's projector holds one and no linear)."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    matrices = [p for name, p in block.named_parameters(recurse=False) if p.dim() == 2]
    if len(matrices) != 1:
        raise ValueError(f"{type(block).__name__} has no linear layer and no single projection matrix to read "
                         "its output width from")
    return matrices[0].shape[-1]


def attach(model: nn.Module, widths: dict[str, int], dropout: float = 0.0) -> list[str]:
    """Wrap every block named in `widths` (module name -> bottleneck width); returns the names."""
    names = sorted(widths)
    pattern = "|".join(re.escape(n) for n in names)  # exact names, nothing else
    return custom.wrap(model, pattern, lambda name, block: Bottleneck(block, widths[name], dropout))
