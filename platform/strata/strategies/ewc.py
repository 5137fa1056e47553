"""EWC: a diagonal-Fisher penalty that keeps the shared adapter near its state after earlier tasks.

Two hooks, as in Avalanche: after a task the worker estimates the Fisher of the adapter's
parameters on that task's rows (added to the Fisher of earlier tasks); during training the loss
gains λ/2 · Σ F·(θ − θ_old)².
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from strata.adapters.lora import named_adapter_parameters
from strata.atomic import write_file
from strata.config import check_positive
from strata.data.collate import collate, encode_table
from strata.hooks import Strategy, TaskContext
from strata.strategies import register

STATE_FILE = "ewc.safetensors"


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                theta_old: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """weight/2 · Σ F·(θ − θ_old)² over the named parameters; its gradient is weight·F·(θ − θ_old)."""
    missing = sorted(set(params) ^ set(fisher)) or sorted(set(params) ^ set(theta_old))
    if missing:
        raise ValueError(f"EWC state and trainable parameters do not line up, e.g. {missing[:3]}")
    total = sum((fisher[n] * (p - theta_old[n]).pow(2)).sum() for n, p in params.items())
    return 0.5 * weight * total


def estimate_fisher(model: torch.nn.Module, processor, rows: pa.Table, adapter: str) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of an adapter's params: the squared gradient of each row's answer
    log-likelihood, averaged over rows.

    Per row, not per batch: the square of a batch-mean gradient is about batch-size times smaller
    than the mean of per-row squares, which would quietly divide λ by the batch size.
    """
    if rows.num_rows == 0:
        raise ValueError("the Fisher needs >= 1 row, got 0")
    params = named_adapter_parameters(model, adapter)
    if not params:
        raise ValueError(f"the model has no parameters for adapter {adapter!r}")
    enc = encode_table(processor, rows, with_answers=True)
    pad_id = processor.tokenizer.pad_token_id
    device = next(iter(params.values())).device
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    # The eval model is frozen: let the adapter's params take gradients for now, then restore.
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for row in range(len(enc)):
                batch = {k: v.to(device) for k, v in collate(enc.select([row]), pad_id).items()}
                n_answer = (batch["labels"][:, 1:] != -100).sum()
                nll = model(**batch, num_items_in_batch=n_answer).loss * n_answer  # summed over the answer
                grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        fisher[n] += g.float().pow(2)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return {n: f / len(enc) for n, f in fisher.items()}


def save_state(state_dir: str | Path, fisher: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]) -> Path:
    """Write F and θ_old, keyed by parameter name, to state_dir/ewc.safetensors atomically."""
    tensors = {f"fisher/{n}": t for n, t in fisher.items()} | {f"theta/{n}": t for n, t in theta.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_file(Path(state_dir) / STATE_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_state(state_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(F, θ_old) from state_dir/ewc.safetensors, or None before the first task has finished."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    tensors = load_file(str(path))
    fisher = {k.removeprefix("fisher/"): v for k, v in tensors.items() if k.startswith("fisher/")}
    theta = {k.removeprefix("theta/"): v for k, v in tensors.items() if k.startswith("theta/")}
    return fisher, theta


@dataclass(frozen=True)
class EWCConfig:
    """Elastic weight consolidation on the adapter parameters (diagonal Fisher)."""

    weight: float = 100.0  # lambda in lambda/2 * sum F (theta - theta_old)^2
    fisher_rows: int = 128  # train rows whose per-row squared gradients estimate the Fisher

    def __post_init__(self) -> None:
        check_positive(self, "ewc", at_least_zero=("weight",), above_zero=("fisher_rows",))


@register("ewc", EWCConfig)
@dataclass
class EWC(Strategy):
    """One shared adapter; the Fisher of every earlier task anchors it to its previous state."""

    opts: EWCConfig = field(default_factory=EWCConfig)

    def __post_init__(self) -> None:
        self.params: dict[str, torch.nn.Parameter] = {}  # worker side: the trainable params by name
        self.fisher: dict[str, torch.Tensor] | None = None
        self.theta_old: dict[str, torch.Tensor] = {}

    def finish_task(self, model: torch.nn.Module, processor, ctx: TaskContext, train: pa.Table, dest: Path) -> None:
        """Add this task's Fisher (on the trained model) to the running sum, with the adapter it protects."""
        adapter = self.adapter_name(ctx)
        fisher = estimate_fisher(model, processor, train.slice(0, self.opts.fisher_rows), adapter)
        previous = load_state(ctx.state_dir)
        if previous is not None:
            old = previous[0]
            if old.keys() != fisher.keys():
                raise ValueError(f"stored EWC Fisher in {ctx.state_dir} does not match adapter {adapter!r}")
            fisher = {n: old[n] + f for n, f in fisher.items()}
        theta = {n: p.detach().clone() for n, p in named_adapter_parameters(model, adapter).items()}
        save_state(dest, fisher, theta)

    def state_records(self, ctx: TaskContext) -> dict[str, Path]:
        """The adapter, and the summed Fisher with θ_old."""
        return super().state_records(ctx) | {"fisher": Path(ctx.state_dir) / STATE_FILE}

    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        """Load the previous shared adapter trainable, and F and θ_old if an earlier task left them."""
        model = super().before_task(backbone, processor, ctx)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state = load_state(ctx.state_dir)
        self.fisher, self.theta_old = None, {}
        if state is not None:
            device = next(iter(self.params.values())).device
            self.fisher = {n: f.to(device) for n, f in state[0].items()}
            self.theta_old = {n: t.to(device) for n, t in state[1].items()}
            ewc_penalty(self.params, self.fisher, self.theta_old, 0.0)  # fail now if the names differ
        return model

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """The EWC penalty (None before any task has finished)."""
        if self.fisher is None:
            return None
        return ewc_penalty(self.params, self.fisher, self.theta_old, self.opts.weight)
