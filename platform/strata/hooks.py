"""The hook protocol every continual-learning strategy plugs into (docs/ARCHITECTURE.md lists
where each hook is called).

Driver-side hooks run in the process that orchestrates the stream; worker-side hooks run inside
the training loop on every Ray Train worker. The optimizer step, DDP and reporting stay in the
loop, never in a strategy. A strategy overrides only the hooks it needs.

A strategy object is its configuration (the dataclass fields) plus, on a worker, whatever
`before_task` stores on it for the task at hand (a teacher snapshot, θ*, a reference set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from strata.adapters.lora import add_adapter, load_adapter, save_adapter
from strata.config import AdapterSpec
from strata.digest import file_sha256, tree_sha256
from strata.grads import Grads
from strata.routing import Routed


@dataclass(frozen=True)
class TaskContext:
    """Where a task sits in the stream, and where the strategy keeps its state."""

    index: int  # 0-based position in the stream
    name: str
    seen: tuple[str, ...]  # tasks learned before this one, in order
    train_paths: dict[str, str]  # task -> Parquet path of its train rows, for every task so far
    state_dir: str  # the strategy's own persistent directory
    seed: int = 0  # the run's seed; strategies derive their own random streams from it

    @property
    def adapters_dir(self) -> Path:
        """Where the strategy's adapters live, one directory per adapter name."""
        return Path(self.state_dir) / "adapters"


@dataclass
class Strategy:
    """Base strategy: the defaults describe plain sequential fine-tuning of one shared adapter."""

    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    name = "base"
    shared = True  # one adapter evolves across tasks (False: one adapter per task)
    needs_hidden_states = False  # the loop asks the model for hidden states (for `loss`)

    # ---- driver side -----------------------------------------------------------------------
    def training_table(self, ctx: TaskContext, current: pa.Table) -> pa.Table:
        """The rows this task trains on (replay and multitask mix in earlier data)."""
        return current

    def after_task(self, ctx: TaskContext, train: pa.Table) -> None:
        """Update strategy state once the task's adapter (and what `finish_task` wrote) is installed.

        `train` is the task's own train rows. Work that needs the trained model belongs in `finish_task`.
        """

    def state_records(self, ctx: TaskContext) -> dict[str, Path]:
        """The state files (or directories) that define this strategy after task `ctx`, by record name.

        The coordinator keeps each one's path and content hash with the promoted task; the task's
        adapter is its optimum θ*, which DGG and LwF pull toward on the next task.
        """
        return {"optimum": ctx.adapters_dir / self.adapter_name(ctx)}

    def adapter_name(self, ctx: TaskContext) -> str:
        """The adapter this task trains (and that its checkpoint holds)."""
        return "shared" if self.shared else ctx.name

    def eval_adapters(self, ctx: TaskContext) -> list[str]:
        """Adapter names to load for evaluation after task `ctx`."""
        return ["shared"] if self.shared else [*ctx.seen, ctx.name]

    def load_eval(self, backbone: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        """The backbone with every adapter needed to evaluate after task `ctx`, frozen."""
        model = backbone
        for name in self.eval_adapters(ctx):
            model = load_adapter(model, ctx.adapters_dir / name, name)
        return model

    def route(self, ctx: TaskContext, model, processor, enc, task: str) -> list[Routed]:
        """The adapter each row of `enc` runs with at inference (shared: always the one adapter)."""
        return [Routed(self.adapter_name(ctx))] * len(enc)

    # ---- worker side -----------------------------------------------------------------------
    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        """Wrap the frozen backbone with this task's trainable adapter."""
        name = self.adapter_name(ctx)
        previous = ctx.adapters_dir / name
        if self.shared and previous.exists():
            return load_adapter(backbone, previous, name, trainable=True)
        return add_adapter(backbone, name, self.adapter)

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """Extra loss terms (KD, EWC, ...) added to the task loss; None adds nothing."""
        return None

    def after_backward(self, model: torch.nn.Module, grads: Grads, step: int) -> None:
        """Edit the trainable gradients after backward, before clipping and the step (DGG).

        `grads` holds this rank's gradients: whole tensors, or ZeRO fragments (strata/grads.py).
        """

    def train_state(self) -> dict[str, torch.Tensor]:
        """Per-task worker state a resumed worker needs besides the weights (random streams, counters)."""
        return {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `train_state` returned, after `before_task` on a restarted worker."""

    def finish_task(self, model: torch.nn.Module, processor, ctx: TaskContext, train: pa.Table, dest: Path) -> None:
        """After the last step, with the trained model (eval mode): write per-task state files into `dest`.

        They travel back with the adapter and are installed into `ctx.state_dir` under the same
        names (EWC's Fisher, Decoupled's prototypes). `train` is the task's own train rows.
        """

    def metrics(self) -> dict[str, float]:
        """Strategy-specific numbers to report with the loss (expert use, injection rate, ...)."""
        return {}

    def version_files(self, ctx: TaskContext, scratch: Path) -> dict[str, Path]:
        """Side files a registry version of this task's adapter carries (router, freeze masks), by name."""
        return {}

    def save(self, model: torch.nn.Module, ctx: TaskContext, dest: Path) -> Path:
        """Write this task's trained adapter (and any side files) to `dest`, atomically."""
        return save_adapter(model, self.adapter_name(ctx), dest)


def record(path: Path, root: Path) -> dict[str, str]:
    """A state record the coordinator keeps: the path under `root` and the content hash."""
    digest = tree_sha256(path) if path.is_dir() else file_sha256(path)
    return {"path": str(path.relative_to(root)), "sha256": digest}
