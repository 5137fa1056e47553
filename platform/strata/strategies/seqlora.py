"""SeqLoRA: one adapter fine-tuned on every task in turn. The baseline that forgets."""

from __future__ import annotations

from dataclasses import dataclass

from strata.strategies.base import Strategy


@dataclass
class SeqLoRA(Strategy):
    """Sequential fine-tuning of one shared LoRA adapter: every hook is the default."""

    name = "seqlora"
