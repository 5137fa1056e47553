"""Mixed-adapter LoRA: every row of a batch runs with its own adapter in one gathered matmul per layer.

PEFT's `adapter_names` path loops over the distinct adapters of a batch in every layer, with a
masked sub-batch forward each. Here each LoRA layer keeps its adapters' A and B stacked (ranks
zero-padded to the largest), and a forward gathers one (A, B, scale) per row and does two batched
matmuls: the cost no longer grows with the number of distinct adapters in the batch. The base
layer runs once for the whole batch, with PEFT's adapters disabled; a forward hook adds the delta.
The last slot of every stack is zeros: rows that ask for no adapter get the bare backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass
class Stack:
    """One layer's adapters side by side: A (N+1, r, in), B (N+1, out, r), scale (N+1,)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor


class MixedLoRA:
    """Per-row adapter selection over all LoRA adapters a PeftModel holds."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.layers: list[LoraLinear] = []
        self.tuned: list[BaseTunerLayer] = []  # every PEFT layer: their own adapters are off during a mixed batch
        self.seen: list[str] | None = None  # peft_config's adapters when the stacks were built
        self.names: list[str] = []
        self.stacks: dict[torch.nn.Module, Stack] = {}
        self.rows: torch.Tensor | None = None  # the current batch's slot per row
        self.patch_rows: list[int] | None = None  # the current batch's patch rows per image, where the tower takes them flat

    def refresh(self) -> None:
        """Re-find the LoRA layers and re-stack them after adapters were loaded or deleted."""
        self.seen = list(self.model.peft_config)
        self.tuned = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        self.layers = [m for m in self.tuned if isinstance(m, LoraLinear)]
        self.names = [n for n in self.model.peft_config if n in self._lora_names()]
        self.stacks = {layer: self._stack(layer) for layer in self.layers}

    def _lora_names(self) -> set[str]:
        return {n for layer in self.layers for n in layer.lora_A}

    def _stack(self, layer) -> Stack:
        base = layer.get_base_layer()
        out_f, in_f = base.weight.shape
        present = [n for n in self.names if n in layer.lora_A]
        for n in present:
            if n in getattr(layer, "lora_variant", {}) or layer.use_dora.get(n, False):
                raise ValueError(f"adapter {n!r} is not plain LoRA (DoRA or another variant); "
                                 "it cannot join a mixed batch")
        r = max((layer.lora_A[n].weight.shape[0] for n in present), default=1)
        slots = len(self.names) + 1
        A = torch.zeros(slots, r, in_f)
        B = torch.zeros(slots, out_f, r)
        scale = torch.zeros(slots)
        for i, n in enumerate(self.names):
            if n in layer.lora_A:
                a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
                A[i, : a.shape[0]] = a.detach().float()
                B[i, :, : b.shape[1]] = b.detach().float()
                scale[i] = layer.scaling[n]
        return Stack(A, B, scale)

    def slots(self, adapters: list[str | None]) -> torch.Tensor:
        """Slot index per row; None is the bare backbone."""
        unknown = [a for a in adapters if a is not None and a not in self.names]
        if unknown:
            raise KeyError(f"adapters not loaded: {sorted(set(unknown))}")
        bare = len(self.names)
        return torch.tensor([bare if a is None else self.names.index(a) for a in adapters])

    @contextlib.contextmanager
    def select(self, adapters: list[str | None], patch_rows: list[int] | None = None) -> Iterator[PeftModel]:
        """Run the block with row i of every batch using `adapters[i]`.

        `patch_rows[i]` is how many patch rows row i's image has, for towers that take the patch
        rows of every image in one (rows, dim) tensor (Qwen's); None for batch-shaped towers.
        """
        if list(self.model.peft_config) != self.seen:
            self.refresh()
        self.rows, self.patch_rows = self.slots(adapters), patch_rows
        hooks = [layer.register_forward_hook(self._add_delta) for layer in self.layers]
        # PEFT's own `disable_adapter()` walks the whole model and its parameters twice (about 60 ms a
        # batch on the width-512 backbone, more than a decode step); the layers are known, so flip them.
        was = [layer._disable_adapters for layer in self.tuned]
        try:
            for layer in self.tuned:
                layer._disable_adapters = True
            yield self.model
        finally:
            for layer, off in zip(self.tuned, was):
                layer._disable_adapters = off
            for h in hooks:
                h.remove()
            self.rows = self.patch_rows = None

    def _slots_for(self, n: int) -> torch.Tensor:
        """The slot of each of the `n` leading rows a layer sees: one per batch row, or one per patch row."""
        if n == len(self.rows):
            return self.rows
        for merge in (1, 4):  # Qwen's tower before its 2x2 patch merge, and the merger's MLP after it
            counts = [p // merge for p in self.patch_rows or []]
            if counts and sum(counts) == n:
                return self.rows.repeat_interleave(torch.tensor(counts))
        raise RuntimeError(f"a batch of {n} rows reached a LoRA layer, but {len(self.rows)} adapters were selected "
                           f"(patch rows per image: {self.patch_rows})")

    def _add_delta(self, layer, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        rows = self._slots_for(x.shape[0])
        s = self.stacks[layer]
        A, B = s.A.to(x.device, x.dtype)[rows], s.B.to(x.device, x.dtype)[rows]  # (N, r, in), (N, out, r)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, tokens, in)
        delta = torch.bmm(torch.bmm(flat, A.transpose(1, 2)), B.transpose(1, 2))  # (N, tokens, out)
        delta = delta * s.scale.to(x.device, x.dtype)[rows].view(-1, 1, 1)
        return output + delta.reshape(*x.shape[:-1], -1).to(output.dtype)
