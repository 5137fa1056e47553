"""BitFit: train only a bias delta on each selected linear layer; the base weights and biases stay frozen.

out = base(x) + delta, with delta zero-initialised. Keeping the delta apart (not unfreezing the
bias in place) means the backbone is never written, the adapter is a tiny side file, and
merge-for-deploy is simply bias += delta.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from strata.adapters import custom


class BiasDelta(custom.StrataLayer):
    """A frozen linear (`base`) whose bias is shifted by a trainable `delta`."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if getattr(base, "bias", None) is None:
            raise ValueError(f"BitFit needs a linear layer with a bias; this {type(base).__name__} has none")
        self.base = base
        self.delta = nn.Parameter(torch.zeros_like(base.bias))  # (out_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output with the trained bias shift."""
        return self.base(x) + self.delta


def attach(model: nn.Module, names: list[str]) -> list[str]:
    """Wrap every linear named in `names` with a zero bias delta; returns the names wrapped."""
    return custom.wrap(model, "|".join(re.escape(n) for n in sorted(names)), lambda _, linear: BiasDelta(linear))


@torch.no_grad()
def merge_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Add saved deltas (`<linear name>.delta`) into the biases of a plain (unwrapped) model."""
    for key, delta in tensors.items():
        if not key.endswith(".delta"):
            raise ValueError(f"unexpected tensor {key!r} in a BitFit adapter (expected '<linear>.delta')")
        linear = model.get_submodule(key.removesuffix(".delta"))
        if getattr(linear, "bias", None) is None or linear.bias.shape != delta.shape:
            raise ValueError(f"BitFit delta {key!r} of shape {tuple(delta.shape)} does not fit the model's bias")
        linear.bias.add_(delta.to(linear.bias))
    return model
