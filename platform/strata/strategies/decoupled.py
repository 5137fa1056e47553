"""Decoupled per-task adapters: each task trains its own visual+text LoRA; a router picks one.

The router is nearest-prototype over the frozen backbone's pooled image+text features
(strata/routing.py), so adding a task never changes an earlier task's adapter; only routing
mistakes can cost old tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from strata.backbone.features import masked_mean, modality_masks, pooled_features
from strata.config import MULTI_ADAPTER_KINDS, check_positive
from strata.data.collate import encode_table
from strata.hooks import Strategy, TaskContext
from strata.losses import info_nce
from strata.routing import ROUTER_FILE, PrototypeRouter, Routed
from strata.strategies import register


@dataclass(frozen=True)
class DecoupledConfig:
    """Options of the Decoupled strategy."""

    routing: str = "auto"  # "auto" (prototype router) or "name" (the caller names the task)
    contrastive: bool = False  # add a symmetric InfoNCE between pooled image and text states
    contrastive_weight: float = 0.1
    tau: float = 0.07

    def __post_init__(self) -> None:
        if self.routing not in ("auto", "name"):
            raise ValueError(f"decoupled.routing must be 'auto' or 'name', got {self.routing!r}")
        check_positive(self, "decoupled", at_least_zero=("contrastive_weight",), above_zero=("tau",))


@register("decoupled", DecoupledConfig)
@dataclass
class Decoupled(Strategy):
    """One adapter per task, picked by the task's name or by a prototype router (`auto`)."""

    opts: DecoupledConfig = field(default_factory=DecoupledConfig)
    prototype_rows: int = 256  # train rows whose features estimate a task's prototype
    shared = False

    def __post_init__(self) -> None:
        if self.adapter.kind not in MULTI_ADAPTER_KINDS:
            raise ValueError(f"strategy 'decoupled' keeps one adapter per task on one model, which only "
                             f"{MULTI_ADAPTER_KINDS} support; adapter.kind is {self.adapter.kind!r}")
        # The loop returns hidden states only when asked; the alignment term is what needs them.
        self.needs_hidden_states = self.opts.contrastive

    def finish_task(self, model: torch.nn.Module, processor, ctx: TaskContext, train: pa.Table, dest: Path) -> None:
        """The router with this task's prototype added, from a sample of its train rows."""
        enc = encode_table(processor, train.slice(0, self.prototype_rows), with_answers=False)
        PrototypeRouter.load(ctx.state_dir).add(ctx.name, pooled_features(model, processor, enc)).save(dest)

    def state_records(self, ctx: TaskContext) -> dict[str, Path]:
        """This task's adapter, and the router over every task so far."""
        return super().state_records(ctx) | {"router": Path(ctx.state_dir) / ROUTER_FILE}

    def version_files(self, ctx: TaskContext, scratch: Path) -> dict[str, Path]:
        """This task's prototype, so any set of registered versions can rebuild a router."""
        return {ROUTER_FILE: PrototypeRouter.load(ctx.state_dir).only(ctx.name).save(scratch)}

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """Weighted InfoNCE between each row's pooled image and text states (None when off)."""
        if not self.opts.contrastive:
            return None
        hidden = outputs.hidden_states[-1]  # (B, L, D), the LM's last layer
        image, text = modality_masks(model, batch)
        return self.opts.contrastive_weight * info_nce(masked_mean(hidden, image), masked_mean(hidden, text),
                                                       self.opts.tau)

    def route(self, ctx: TaskContext, model, processor, enc, task: str) -> list[Routed]:
        """Per-row adapter: the named task's own adapter, or the nearest prototype's (with its distance)."""
        router = PrototypeRouter.load(ctx.state_dir)
        if self.opts.routing == "name" and task in router.names:
            return [Routed(task)] * len(enc)
        return router.assign(pooled_features(model, processor, enc))
