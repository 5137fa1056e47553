"""How the training loop steps its model: plain, under DDP, or as a DeepSpeed ZeRO engine.

The wrapper is chosen once per task (`make_engine`); the loop only calls `forward`, `backward`,
`grads`, `step`, `zero_grad` and `whole`, so it has no DeepSpeed branches.
"""

from __future__ import annotations

import contextlib

import torch

from strata.config import TrainConfig
from strata.grads import Grads
from strata.train import zero


class Engine:
    """One process, or DDP across processes: torch's backward and the client AdamW + scheduler."""

    resumable = True  # the optimizer state is whole on every rank, so a checkpoint can hold it

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                 sched, cfg: TrainConfig, device: torch.device, distributed: bool) -> None:
        self.params, self.opt, self.sched, self.cfg, self.device = params, opt, sched, cfg, device
        self.module = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    def forward(self, batch: dict, **kwargs):
        """The wrapped model's forward on a batch."""
        return self.module(**batch, **kwargs)

    def autocast(self):
        """bfloat16 autocast for forward and the strategy's loss terms (adapter weights stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate (DDP all-reduces the gradients)."""
        loss.backward()

    def grads(self) -> Grads:
        """The trainable gradients as this rank holds them."""
        return Grads(self.params)

    def step(self) -> None:
        """The optimizer and scheduler step."""
        self.opt.step()
        self.sched.step()

    def zero_grad(self) -> None:
        """Drop the gradients before the next step."""
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.sched.get_last_lr()[0]

    def whole(self):
        """A context in which every rank holds the whole trainable parameters (for saving)."""
        return contextlib.nullcontext()


class ZeroEngine(Engine):
    """A DeepSpeed ZeRO engine (train/zero.py): partitioned optimizer state and gradients."""

    resumable = False  # the optimizer state is partitioned: a restarted group restarts the task

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                 sched, cfg: TrainConfig, device: torch.device, per_rank: int) -> None:
        self.params, self.opt, self.sched, self.cfg, self.device = params, opt, sched, cfg, device
        self.module = zero.initialize(model, opt, sched, cfg, per_rank)

    def forward(self, batch: dict, **kwargs):
        """The engine's forward; under bf16 DeepSpeed cast the whole module, so the images follow."""
        if self.cfg.bf16:
            batch = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
        return self.module(**batch, **kwargs)

    def autocast(self):
        """No autocast: DeepSpeed runs the module in its own precision."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward (it partitions and averages the gradients)."""
        self.module.backward(loss)

    def grads(self) -> Grads:
        """This rank's ZeRO fragments of the trainable gradients."""
        return Grads(self.params, zero.fragments(self.params))

    def step(self) -> None:
        """The optimizer and scheduler step; DeepSpeed clears the gradients itself."""
        self.module.step()

    def zero_grad(self) -> None:
        """Nothing: DeepSpeed's step already cleared them."""

    def whole(self):
        """Stage 3 partitions the parameters: gather them for saving."""
        return zero.gathered(self.params, self.cfg.zero_stage)


def make_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched,
                cfg: TrainConfig, device: torch.device, distributed: bool, per_rank: int) -> Engine:
    """The wrapper this task trains under: ZeRO when the config names a stage, else plain or DDP."""
    if cfg.zero_stage is not None:
        return ZeroEngine(model, params, opt, sched, cfg, device, per_rank)
    return Engine(model, params, opt, sched, cfg, device, distributed)
