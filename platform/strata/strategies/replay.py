"""Replay: a per-task reservoir of raw rows, mixed into the batches of every later task."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from strata.data.replay import ReplayBuffer
from strata.strategies.base import Strategy, TaskContext


@dataclass
class Replay(Strategy):
    """One shared adapter; earlier tasks' reservoir rows are added to the current task's rows."""

    per_task: int = 100  # rows kept per task; more rows forget less and cost more storage
    name = "replay"

    def buffer(self, ctx: TaskContext) -> ReplayBuffer:
        """The buffer stored next to this strategy's adapters."""
        return ReplayBuffer(f"{ctx.state_dir}/buffer")

    def training_table(self, ctx: TaskContext, current: pa.Table) -> pa.Table:
        """Current rows plus every stored reservoir (purged tasks contribute nothing)."""
        stored = self.buffer(ctx).rows(exclude=ctx.name)
        return current if stored is None else pa.concat_tables([current, stored])

    def after_task(self, ctx: TaskContext, train: pa.Table, model, processor) -> None:
        """Reservoir-sample this task's own train rows into the buffer."""
        self.buffer(ctx).add(ctx.name, train, self.per_task, seed=ctx.index)
