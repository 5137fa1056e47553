"""MultiTask: joint training on every task seen so far. The upper bound, not a continual method."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from strata.data.schema import read_table
from strata.hooks import Strategy, TaskContext
from strata.strategies import register


@register("multitask")
@dataclass
class MultiTask(Strategy):
    """One shared adapter trained on the union of every task so far: the upper bound."""

    def training_table(self, ctx: TaskContext, current: pa.Table) -> pa.Table:
        """All earlier tasks' train rows plus the current ones."""
        earlier = [read_table(ctx.train_paths[t]) for t in ctx.seen]
        return pa.concat_tables([*earlier, current])
