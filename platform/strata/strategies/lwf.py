"""LwF: learning without forgetting; the previous task's model teaches on the current task's inputs.

The teacher is the shared adapter as the previous task left it, i.e. the state loaded in
`before_task`; it is run with swapped-in parameters, so no second model is kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from strata.config import LwFConfig
from strata.strategies.base import Strategy, TaskContext
from strata.strategies.distill import forward_with, kd_loss, snapshot, target_mask


@dataclass
class LwF(Strategy):
    """One shared adapter trained with CE + weight · KL(previous model ‖ current model)."""

    opts: LwFConfig = field(default_factory=LwFConfig)
    name = "lwf"

    def __post_init__(self) -> None:
        self.teacher: dict[str, torch.Tensor] | None = None  # worker side: previous adapter, by name

    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        """Load the previous shared adapter trainable and keep a frozen copy of it as the teacher."""
        model = super().before_task(backbone, processor, ctx)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.teacher = snapshot(trainable) if ctx.index > 0 else None  # task 0 has no previous model
        return model

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """KD on the answer positions from the previous model (None on the first task)."""
        if self.teacher is None:
            return None
        teacher = forward_with(model, self.teacher, batch)
        kd = kd_loss(outputs.logits, teacher.logits, target_mask(batch["labels"]), self.opts.temperature)
        return self.opts.weight * kd
