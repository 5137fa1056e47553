"""The trainable gradients as this rank holds them, between backward and the optimizer step.

In one process and under DDP every rank holds every gradient in full (`p.grad`). Under DeepSpeed
ZeRO each rank holds only its fragment of the averaged gradients, in the optimizer's flat
buffers, and `p.grad` is None. `Grads` hides that difference from DGG and from clipping: values
and θ come as this rank's fragments, a norm sums squares locally and all-reduces them when the
fragments are partitioned (each element lives on exactly one rank, so nothing counts twice), and
edits are written back where the optimizer reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Fragment:
    """One parameter's local piece: its gradient, θ, where it sits in the flat tensor, and a writer."""

    grad: torch.Tensor
    theta: torch.Tensor
    start: int
    numel: int
    write: Callable[[torch.Tensor], None]


class Grads:
    """Whole gradients (`fragments` None) or ZeRO fragments, one entry per trainable parameter."""

    def __init__(self, params: list[torch.nn.Parameter], fragments: list[Fragment | None] | None = None) -> None:
        self.params = params
        self.fragments = fragments
        self.partitioned = fragments is not None

    def values(self) -> list[torch.Tensor | None]:
        """This rank's gradient of every parameter (None where it has none)."""
        if not self.partitioned:
            return [p.grad for p in self.params]
        return [f.grad if f else None for f in self.fragments]

    def thetas(self) -> list[torch.Tensor | None]:
        """This rank's current values of every parameter, matching `values()`."""
        if not self.partitioned:
            return [p.detach() for p in self.params]
        return [f.theta if f else None for f in self.fragments]

    def local(self, full: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """This rank's slice of full-shaped tensors (one per parameter), matching `values()`."""
        if not self.partitioned:
            return full
        return [t.reshape(-1)[f.start : f.start + f.numel].to(f.theta) if f else None
                for t, f in zip(full, self.fragments)]

    def norm(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """The global L2 norm of tensors laid out like `values()` (all-reduced across ZeRO ranks)."""
        squares = torch.zeros((), dtype=torch.float64)
        for t in tensors:
            if t is not None:
                squares = squares + t.detach().double().pow(2).sum().cpu()
        if self.partitioned and dist.is_initialized():
            dist.all_reduce(squares)
        return squares.sqrt().float()

    def add(self, deltas: list[torch.Tensor | None]) -> None:
        """grad += delta for every parameter, where the optimizer will read it."""
        with torch.no_grad():
            for i, delta in enumerate(deltas):
                if delta is None:
                    continue
                if not self.partitioned:
                    p = self.params[i]
                    p.grad = delta.to(p.dtype).clone() if p.grad is None else p.grad.add_(delta.to(p.grad.dtype))
                else:
                    f = self.fragments[i]
                    new = f.grad.float() + delta.float()
                    f.write(new)
                    f.grad = new  # ZeRO-3's local grad is a copy: keep reading what was written

    def clip(self, max_norm: float) -> float:
        """Scale every gradient so the global norm is at most `max_norm`; returns the norm before."""
        total = self.norm(self.values())
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            values = self.values()
            self.add([None if v is None else v.float() * (coef - 1.0) for v in values])
        return float(total)
