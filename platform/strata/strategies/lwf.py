"""LwF: learning without forgetting; the previous task's model teaches on the current task's inputs.

The teacher is the shared adapter as the previous task left it, i.e. the state loaded in
`before_task`; it is run with swapped-in parameters, so no second model is kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from strata.config import check_positive
from strata.hooks import Strategy, TaskContext
from strata.losses import forward_with, kd_loss, snapshot, target_mask
from strata.strategies import register


@dataclass(frozen=True)
class LwFConfig:
    """Learning without forgetting: KD from the previous task's model on the current inputs."""

    weight: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_positive(self, "lwf", at_least_zero=("weight",), above_zero=("temperature",))


@register("lwf", LwFConfig)
@dataclass
class LwF(Strategy):
    """One shared adapter trained with CE + weight · KL(previous model ‖ current model)."""

    opts: LwFConfig = field(default_factory=LwFConfig)

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
