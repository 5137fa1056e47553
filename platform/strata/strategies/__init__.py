"""Continual-learning strategies, one file each; this table is how names map to classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strata.config import STRATEGIES

if TYPE_CHECKING:
    from strata.config import RunConfig
    from strata.strategies.base import Strategy

__all__ = ["STRATEGIES", "make_strategy"]


def make_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build a strategy from its name and the run config."""
    from strata.strategies.decoupled import Decoupled
    from strata.strategies.multitask import MultiTask
    from strata.strategies.replay import Replay
    from strata.strategies.seqlora import SeqLoRA

    if name == "seqlora":
        return SeqLoRA(lora=cfg.lora)
    if name == "replay":
        return Replay(lora=cfg.lora, per_task=cfg.replay_per_task)
    if name == "decoupled":
        return Decoupled(lora=cfg.lora)
    if name == "multitask":
        return MultiTask(lora=cfg.lora)
    raise ValueError(f"unknown strategy {name!r}; known: {list(STRATEGIES)}")
