"""DGG, dynamic gradient guidance: pull the shared adapter back toward θ* at random steps.

After "Multimodal Continual Instruction Tuning with Dynamic Gradient Guidance" (CVPR 2026).

Forgetting is read as the missing gradient of the earlier tasks. The displacement θ − θ*, where
θ* is the adapter as task t−1 left it, stands in for that gradient. With probability α per
optimizer step it is added to every trainable gradient, rescaled to the current gradient's norm
when it is the larger of the two. Replay rows (on by default) add a real, sparse old-task gradient.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from strata.adapters.lora import trainable_parameters
from strata.atomic import write_text
from strata.config import check_unit
from strata.grads import Grads
from strata.hooks import TaskContext
from strata.strategies import register
from strata.strategies.replay import Replay

Norm = Callable[[list[torch.Tensor | None]], torch.Tensor]
STEPS = "dgg_steps"  # per-task step figures in the state dir: dgg_steps/<task>.json


def global_norm(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """One L2 norm over all the tensors together (sqrt of the sum of squares); None counts as zero."""
    squares = [t.detach().float().pow(2).sum() for t in tensors if t is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def guidance(theta: list[torch.Tensor | None], anchor: list[torch.Tensor | None], grads: list[torch.Tensor | None],
             scaling: bool = True, norm: Norm = global_norm) -> tuple[list[torch.Tensor | None], float, float]:
    """ĝ for every trainable tensor, with ‖θ − θ*‖ and ‖∇L‖ (both global over all tensors).

    ĝ = (θ − θ*)·‖∇L‖/‖θ − θ*‖ when ‖θ − θ*‖ > ‖∇L‖ (and scaling is on), else θ − θ*. Under ZeRO
    the lists hold this rank's fragments and `norm` all-reduces the sums of squares.
    """
    if not len(theta) == len(anchor) == len(grads):
        raise ValueError(f"theta, anchor and grads must line up: {len(theta)}, {len(anchor)}, {len(grads)} tensors")
    d = [None if p is None else p.detach().float() - a.float() for p, a in zip(theta, anchor)]
    d_norm, g_norm = norm(d), norm(grads)
    scale = (g_norm / d_norm).item() if scaling and d_norm > g_norm else 1.0
    return [None if x is None else x * scale for x in d], d_norm.item(), g_norm.item()


def draw_seed(seed: int, task_index: int) -> int:
    """A generator seed that only depends on (run seed, task), so every DDP rank draws alike."""
    digest = hashlib.sha256(f"dgg:{seed}:{task_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class DGGConfig:
    """Options of DGG; `bernoulli`, `scaling` and `replay` switch off the parts the paper ablates."""

    per_task: int = 100  # replay rows kept per task (the run-config key `replay_per_task` sets it too)
    alpha: float | tuple[float, ...] = 0.2  # injection probability, constant or one per task
    bernoulli: bool = True  # False: inject the guidance every step
    scaling: bool = True  # False: never rescale (theta - theta*) to the gradient's norm
    replay: bool = True  # False: guidance only ("g-hat only"), no replay rows

    def __post_init__(self) -> None:
        if self.per_task < 1:
            raise ValueError(f"dgg.per_task must be >= 1, got {self.per_task}")
        for i, a in enumerate(self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)):
            check_unit(a, f"dgg.alpha[{i}]" if isinstance(self.alpha, tuple) else "dgg.alpha")
        if isinstance(self.alpha, tuple) and not self.alpha:
            raise ValueError("dgg.alpha as a per-task list needs at least one value")

    def alpha_for(self, task_index: int) -> float:
        """The injection probability for task `task_index` (a per-task list repeats its last value)."""
        if isinstance(self.alpha, tuple):
            return self.alpha[min(task_index, len(self.alpha) - 1)]
        return self.alpha


@register("dgg", DGGConfig, aliases={"replay_per_task": "per_task"})
@dataclass
class DGG(Replay):
    """One shared adapter, replay rows (optional) and Bernoulli(α)-gated guidance toward θ*."""

    opts: DGGConfig = field(default_factory=DGGConfig)

    def __post_init__(self) -> None:
        self.anchor: list[torch.Tensor] | None = None  # θ*, aligned with trainable_parameters(model)
        self.alpha = 0.0
        self.generator = torch.Generator()
        self.steps = self.injected = 0
        self.last_d_norm = self.last_grad_norm = 0.0
        self.trace: list[tuple[int, float, float, bool, bool]] = []  # (step, ‖θ−θ*‖, ‖∇L‖, injected, scaled)

    # ---- driver side -----------------------------------------------------------------------
    def training_table(self, ctx: TaskContext, current: pa.Table) -> pa.Table:
        """Current rows plus the replay reservoir, or only the current rows for ĝ-only DGG."""
        return super().training_table(ctx, current) if self.opts.replay else current

    def after_task(self, ctx: TaskContext, train: pa.Table) -> None:
        """Keep Replay's reservoir of this task's rows (nothing is kept for ĝ-only DGG)."""
        if self.opts.replay:
            super().after_task(ctx, train)

    # ---- worker side -----------------------------------------------------------------------
    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        """Load the previous shared adapter trainable; it is θ* for this task."""
        model = super().before_task(backbone, processor, ctx)
        self.begin(model, ctx)
        return model

    def begin(self, model: torch.nn.Module, ctx: TaskContext) -> None:
        """Reset the per-task state: θ* (none on task 0), α, the Bernoulli stream and the counters."""
        # θ* is exactly the loaded state: no averaging, it already targets the joint optimum of 1..t-1.
        self.anchor = [p.detach().clone() for p in trainable_parameters(model)] if ctx.index > 0 else None
        self.alpha = self.opts.alpha_for(ctx.index)
        self.generator = torch.Generator().manual_seed(draw_seed(ctx.seed, ctx.index))
        self.steps = self.injected = 0
        self.last_d_norm = self.last_grad_norm = 0.0
        self.trace = []

    def draw(self) -> bool:
        """One Bernoulli(α) draw from this task's generator."""
        return bool(torch.rand((), generator=self.generator).item() < self.alpha)

    def after_backward(self, model: torch.nn.Module, grads: Grads, step: int) -> None:
        """With probability α (always, without Bernoulli) add ĝ to every trainable gradient."""
        self.steps += 1
        # Draw on every step, used or not, so the stream stays one draw per optimizer step on every rank.
        inject = self.draw() or not self.opts.bernoulli
        if self.anchor is None:
            return
        # ĝ's norms on every step, injected or not, so the trace shows the displacement grow between injections.
        g_hat, self.last_d_norm, self.last_grad_norm = guidance(
            grads.thetas(), grads.local(self.anchor), grads.values(), self.opts.scaling, grads.norm)
        scaled = inject and self.opts.scaling and self.last_d_norm > self.last_grad_norm
        self.trace.append((step, self.last_d_norm, self.last_grad_norm, inject, scaled))
        if inject:
            grads.add(g_hat)
            self.injected += 1

    def displacement(self, grads: Grads) -> list[torch.Tensor | None] | None:
        """θ − θ*, laid out like `grads.values()`: ĝ's direction (None on the first task)."""
        if self.anchor is None:
            return None
        return [None if p is None else p.float() - a.float() for p, a in zip(grads.thetas(), grads.local(self.anchor))]

    def finish_task(self, model: torch.nn.Module, processor, ctx: TaskContext, train: pa.Table, dest: Path) -> None:
        """This task's per-step figures, as `dgg_steps/<task>.json` in the state dir."""
        if self.trace:
            names = ("step", "d_norm", "grad_norm", "injected", "scaled")
            columns = {n: [row[i] for row in self.trace] for i, n in enumerate(names)}
            write_text(dest / STEPS / f"{ctx.name}.json", json.dumps(columns))

    def train_state(self) -> dict[str, torch.Tensor]:
        """The Bernoulli stream's position and the counters, so a resumed worker draws on from here."""
        return {"generator": self.generator.get_state(), "counts": torch.tensor([self.steps, self.injected]),
                "trace": torch.tensor(self.trace, dtype=torch.float64).reshape(-1, 5)}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue the Bernoulli stream and counters where the checkpoint left them."""
        self.generator.set_state(state["generator"])
        self.steps, self.injected = (int(x) for x in state["counts"])
        self.trace = [(int(r[0]), float(r[1]), float(r[2]), bool(r[3]), bool(r[4])) for r in state["trace"].tolist()]

    def metrics(self) -> dict[str, float]:
        """Injection rate on this task so far, and the last ‖θ − θ*‖ and ‖∇L‖ used for ĝ."""
        return {
            "dgg/injection_rate": self.injected / max(self.steps, 1),
            "dgg/scaled_rate": sum(row[4] for row in self.trace) / max(self.injected, 1),
            "dgg/d_norm": self.last_d_norm,
            "dgg/grad_norm": self.last_grad_norm,
        }
