"""Replay: a per-task reservoir of raw rows, mixed into the batches of every later task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from strata.data.replay import ReplayBuffer
from strata.hooks import Strategy, TaskContext
from strata.strategies import register

BUFFER = "buffer"  # the reservoir's folder in the strategy's state directory


@dataclass(frozen=True)
class ReplayConfig:
    """Options of Replay."""

    per_task: int = 100  # rows kept per task; more rows forget less and cost more storage

    def __post_init__(self) -> None:
        if self.per_task < 1:
            raise ValueError(f"replay.per_task must be >= 1, got {self.per_task}")


@register("replay", ReplayConfig, aliases={"replay_per_task": "per_task"})
@dataclass
class Replay(Strategy):
    """One shared adapter; earlier tasks' reservoir rows join the current task's rows."""

    opts: ReplayConfig = field(default_factory=ReplayConfig)

    def buffer(self, ctx: TaskContext) -> ReplayBuffer:
        """The buffer stored next to this strategy's adapters."""
        return ReplayBuffer(Path(ctx.state_dir) / BUFFER)

    def training_table(self, ctx: TaskContext, current: pa.Table) -> pa.Table:
        """Current rows plus every stored reservoir (purged tasks contribute nothing)."""
        stored = self.buffer(ctx).rows(exclude=ctx.name)
        return current if stored is None else pa.concat_tables([current, stored])

    def after_task(self, ctx: TaskContext, train: pa.Table) -> None:
        """Reservoir-sample this task's own train rows into the buffer."""
        self.buffer(ctx).add(ctx.name, train, self.opts.per_task, seed=ctx.index)

    def state_records(self, ctx: TaskContext) -> dict[str, Path]:
        """The adapter, and every task's reservoir file."""
        files = sorted((Path(ctx.state_dir) / BUFFER).glob("*.parquet"))
        return super().state_records(ctx) | {f"{BUFFER}/{f.stem}": f for f in files}
