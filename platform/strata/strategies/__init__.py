"""Continual-learning strategies, one file each; this table is how names map to classes."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from strata.config import STRATEGIES

if TYPE_CHECKING:
    from strata.config import RunConfig
    from strata.strategies.base import Strategy

__all__ = ["STRATEGIES", "make_strategy"]


_CLASSES = {  # name -> (module under strata.strategies, class)
    "seqlora": ("seqlora", "SeqLoRA"),
    "replay": ("replay", "Replay"),
    "decoupled": ("decoupled", "Decoupled"),
    "multitask": ("multitask", "MultiTask"),
    "ewc": ("ewc", "EWC"),
    "lwf": ("lwf", "LwF"),
    "dgg": ("dgg", "DGG"),
    "mode": ("mode", "MoDE"),
    "cma": ("cma", "CMA"),
}


def make_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build a strategy from its name and the run config."""
    if name not in _CLASSES:
        raise ValueError(f"unknown strategy {name!r}; known: {list(STRATEGIES)}")
    options = {
        "replay": {"per_task": cfg.replay_per_task},
        "decoupled": {"opts": cfg.decoupled},
        "ewc": {"opts": cfg.ewc},
        "lwf": {"opts": cfg.lwf},
        "dgg": {"per_task": cfg.replay_per_task, "opts": cfg.dgg},
        "mode": {"opts": cfg.mode},
        "cma": {"opts": cfg.cma},
    }
    module, cls = _CLASSES[name]
    return getattr(import_module(f"strata.strategies.{module}"), cls)(adapter=cfg.adapter, **options.get(name, {}))
