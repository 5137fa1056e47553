"""SeqLoRA: one adapter fine-tuned on every task in turn. The baseline that forgets."""

from __future__ import annotations

from dataclasses import dataclass

from strata.hooks import Strategy
from strata.strategies import register


@register("seqlora")
@dataclass
class SeqLoRA(Strategy):
    """Sequential fine-tuning of one shared adapter: the baseline that forgets."""
