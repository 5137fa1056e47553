"""Task routing by nearest prototype: which task's adapter should answer a row.

A prototype is the mean of a task's pooled backbone features (backbone/features.py) plus its
within-task scatter. Decoupled adds one per task after training; serving merges the prototypes
of whichever versions are in production, so `<stream>/auto` routes over exactly what is served.
Neither side needs to know how the other stores them: both go through `save`, `load` and `merge`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from strata.atomic import write_file
from strata.backbone.features import FEATURE_PARTS

ROUTER_FILE = "router.safetensors"
SHRINKAGE = 0.1  # blend of the covariance toward a scaled identity, so it stays invertible
# A row whose distance to its nearest prototype is over 4× what that task's own rows average is far
# from every task the router knows: it still goes to the nearest adapter, flagged.
LOW_CONFIDENCE = 4.0


def _block_diagonal(dim: int) -> torch.Tensor:
    """A (dim, dim) mask that keeps the covariance within each of the FEATURE_PARTS parts of a feature.

    With one full covariance, a task whose pictures vary a lot (1 to 5 objects for `count`) lends
    that spread to every direction it correlates with, and its one-object rows drift to `colour`.
    Taken part by part, the question part alone keeps them apart.
    """
    part = torch.arange(dim) * FEATURE_PARTS // dim
    return (part[:, None] == part[None]).float()


@dataclass(frozen=True)
class Routed:
    """Where one row goes, and how far it is from that task's prototype.

    `distance` is the squared Mahalanobis distance over the mean that the task's own rows have
    (about 1 for a typical row of the task); None when the row was routed by name.
    """

    task: str
    distance: float | None = None

    @property
    def low_confidence(self) -> bool:
        """Far from every known task: answered by the nearest adapter anyway."""
        return far(self.distance)


def far(distance: float | None) -> bool:
    """A relative router distance beyond LOW_CONFIDENCE (None: routed by name, never far)."""
    return distance is not None and distance > LOW_CONFIDENCE


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

    @staticmethod
    def of(name: str, feats: torch.Tensor) -> PrototypeRouter:
        """A router that knows one task, from its (N, D) features."""
        mean = feats.mean(0)
        centred = feats - mean
        return PrototypeRouter([name], mean[None], (centred.T @ centred)[None], torch.tensor([float(len(feats))]))

    @staticmethod
    def merge(routers: list[PrototypeRouter]) -> PrototypeRouter:
        """One router over every task of `routers`; a later router's entry replaces an earlier one of that name."""
        last: dict[str, tuple[PrototypeRouter, int]] = {}
        for r in routers:
            for i, n in enumerate(r.names):
                last.pop(n, None)  # a replaced task moves to the end, as if added last
                last[n] = (r, i)
        if not last:
            return PrototypeRouter()
        picked = list(last.values())
        return PrototypeRouter(list(last), *(torch.stack([getattr(r, k)[i] for r, i in picked])
                                            for k in ("means", "scatters", "counts")))

    def add(self, name: str, feats: torch.Tensor) -> PrototypeRouter:
        """This router plus task `name` from its (N, D) features (replacing any earlier entry of that name)."""
        return PrototypeRouter.merge([self, PrototypeRouter.of(name, feats)])

    def only(self, name: str) -> PrototypeRouter:
        """A router that knows task `name` alone."""
        i = self.names.index(name)
        return PrototypeRouter([name], self.means[i : i + 1], self.scatters[i : i + 1], self.counts[i : i + 1])

    def route(self, feats: torch.Tensor) -> list[str]:
        """The nearest task's name for each (N, D) feature row."""
        return [r.task for r in self.assign(feats)]

    def assign(self, feats: torch.Tensor) -> list[Routed]:
        """The nearest task for each (N, D) feature row, with its relative distance."""
        if not self.names:
            raise RuntimeError("the router has no tasks yet")
        d = feats.shape[1]
        if d != self.means.shape[1]:
            raise ValueError(f"the router's prototypes of {self.names} have {self.means.shape[1]} dims but the rows' "
                             f"features have {d}: they were saved by an older Strata; train those tasks again")
        cov = self.scatters.sum(0) / max(float(self.counts.sum()) - len(self.names), 1.0)
        blocks = _block_diagonal(d)
        cov = cov * blocks
        # Each part shrinks toward its own mean variance: the parts' scales differ several-fold.
        scale = (blocks @ cov.diagonal()) / blocks.sum(1)
        precision = torch.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * torch.diag(scale))
        diff = feats[:, None, :] - self.means[None]  # (N, tasks, D)
        dist = torch.einsum("ntd,de,nte->nt", diff, precision, diff)
        # A task's own rows sit at trace(Σ_task · Σ⁻¹) on average: the yardstick for "far".
        own = torch.einsum("tde,ed->t", self.scatters, precision) / (self.counts - 1).clamp(min=1)
        nearest = dist.argmin(1)
        return [Routed(self.names[i], float(dist[n, i] / own[i].clamp(min=1e-12)))
                for n, i in enumerate(nearest.tolist())]

    @staticmethod
    def load(directory: str | Path) -> PrototypeRouter:
        """The router saved in `directory`, or an empty one."""
        path = Path(directory) / ROUTER_FILE
        if not path.exists():
            return PrototypeRouter()
        with safe_open(str(path), framework="pt") as f:
            names = json.loads(f.metadata()["tasks"])
            # Copies: safetensors maps the file, and a later save over it must not change these tensors.
            return PrototypeRouter(names, *(f.get_tensor(k).clone() for k in ("means", "scatters", "counts")))

    def save(self, directory: str | Path) -> Path:
        """Write the router's tensors with task names in the metadata, atomically; returns the file."""
        tensors = {k: v.contiguous() for k, v in
                   {"means": self.means, "scatters": self.scatters, "counts": self.counts}.items()}
        return write_file(Path(directory) / ROUTER_FILE,
                          lambda tmp: save_file(tensors, str(tmp), metadata={"tasks": json.dumps(self.names)}))
