"""Decoupled per-task adapters: each task trains its own visual+text LoRA; a router picks one.

The router is nearest-prototype over the frozen backbone's pooled image+text features, so adding
a task never changes an earlier task's adapter; only routing mistakes can cost old tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from strata.atomic import write_file
from strata.backbone.features import masked_mean, modality_masks, pooled_features
from strata.config import DecoupledConfig
from strata.data.collate import encode_table
from strata.strategies.base import Strategy, TaskContext

ROUTER_FILE = "router.safetensors"
SHRINKAGE = 0.1  # blend of the covariance toward a scaled identity, so it stays invertible


def info_nce(visual: torch.Tensor, text: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between row-paired (N, D) visual and text vectors at temperature tau.

    Row i of each is a positive pair; every other row of the batch is a negative.
    """
    if visual.shape != text.shape or visual.dim() != 2:
        raise ValueError(f"visual and text must both be (N, D), got {tuple(visual.shape)} and {tuple(text.shape)}")
    v, t = F.normalize(visual, dim=-1), F.normalize(text, dim=-1)
    logits = v @ t.T / tau  # (N, N) cosine similarities
    target = torch.arange(len(v), device=v.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class Decoupled(Strategy):
    """One named adapter per task; inference routes by task name or by prototype (`auto`)."""

    opts: DecoupledConfig = field(default_factory=DecoupledConfig)
    prototype_rows: int = 256  # train rows whose features estimate a task's prototype
    name = "decoupled"
    shared = False

    def __post_init__(self) -> None:
        # The loop returns hidden states only when asked; the alignment term is what needs them.
        self.needs_hidden_states = self.opts.contrastive

    def after_task(self, ctx: TaskContext, train: pa.Table, model, processor) -> None:
        """Add this task's prototype from a sample of its train rows."""
        enc = encode_table(processor, train.slice(0, self.prototype_rows), with_answers=False)
        router = PrototypeRouter.load(ctx.state_dir)
        router.add(ctx.name, pooled_features(model, processor, enc))
        router.save(ctx.state_dir)

    def version_files(self, ctx: TaskContext, scratch: Path) -> dict[str, Path]:
        """This task's prototype, so any set of registered versions can rebuild a router."""
        PrototypeRouter.load(ctx.state_dir).only(ctx.name).save(str(scratch))
        return {ROUTER_FILE: scratch / ROUTER_FILE}

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """Weighted InfoNCE between each row's pooled image and text states (None when off)."""
        if not self.opts.contrastive:
            return None
        hidden = outputs.hidden_states[-1]  # (B, L, D), the LM's last layer
        image, text = modality_masks(model, batch)
        return self.opts.contrastive_weight * info_nce(masked_mean(hidden, image), masked_mean(hidden, text),
                                                       self.opts.tau)

    def route(self, ctx: TaskContext, model, processor, enc, task: str) -> list[str]:
        """Per-row adapter: the named task's own adapter, or the nearest prototype's."""
        router = PrototypeRouter.load(ctx.state_dir)
        if self.opts.routing == "name" and task in router.names:
            return [task] * len(enc)
        return router.route(pooled_features(model, processor, enc))


@dataclass
class PrototypeRouter:
    """Nearest task prototype under a shared within-task covariance (Mahalanobis distance).

    Plain cosine to the mean is dominated by what every prompt shares (the chat template, the
    white background); the pooled covariance down-weights those shared, noisy directions.
    """

    names: list[str] = field(default_factory=list)
    means: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (tasks, D)
    scatters: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (tasks, D, D)
    counts: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (tasks,)

    def add(self, name: str, feats: torch.Tensor) -> None:
        """Add task `name` from its (N, D) features, replacing any earlier entry of that name."""
        mean = feats.mean(0)
        centred = feats - mean
        keep = [i for i, n in enumerate(self.names) if n != name]
        self.names = [self.names[i] for i in keep] + [name]
        self.means = torch.cat([self.means[keep], mean[None]]) if keep else mean[None]
        scatter = (centred.T @ centred)[None]
        self.scatters = torch.cat([self.scatters[keep], scatter]) if keep else scatter
        count = torch.tensor([float(len(feats))])
        self.counts = torch.cat([self.counts[keep], count]) if keep else count

    def only(self, name: str) -> PrototypeRouter:
        """A router that knows task `name` alone."""
        i = self.names.index(name)
        return PrototypeRouter([name], self.means[i : i + 1], self.scatters[i : i + 1], self.counts[i : i + 1])

    def route(self, feats: torch.Tensor) -> list[str]:
        """The nearest task's name for each (N, D) feature row."""
        if not self.names:
            raise RuntimeError("the router has no tasks yet")
        d = feats.shape[1]
        cov = self.scatters.sum(0) / max(float(self.counts.sum()) - len(self.names), 1.0)
        cov = (1 - SHRINKAGE) * cov + SHRINKAGE * cov.trace() / d * torch.eye(d)
        diff = feats[:, None, :] - self.means[None]  # (N, tasks, D)
        dist = torch.einsum("ntd,de,nte->nt", diff, torch.linalg.inv(cov), diff)
        return [self.names[i] for i in dist.argmin(1).tolist()]

    @staticmethod
    def load(state_dir: str) -> PrototypeRouter:
        """The router saved in `state_dir`, or an empty one."""
        path = Path(state_dir) / ROUTER_FILE
        if not path.exists():
            return PrototypeRouter()
        with safe_open(str(path), framework="pt") as f:
            names = json.loads(f.metadata()["tasks"])
            return PrototypeRouter(names, *(f.get_tensor(k) for k in ("means", "scatters", "counts")))

    def save(self, state_dir: str) -> None:
        """Write the router's tensors with task names in the metadata, atomically."""
        tensors = {k: v.contiguous() for k, v in
                   {"means": self.means, "scatters": self.scatters, "counts": self.counts}.items()}
        write_file(Path(state_dir) / ROUTER_FILE,
                   lambda tmp: save_file(tensors, str(tmp), metadata={"tasks": json.dumps(self.names)}))
