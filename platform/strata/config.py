"""Typed, frozen configs. YAML files and CLI flags only fill these; validation happens here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BUILTIN_BACKBONES = ("builtin:tiny", "builtin:test")
STRATEGIES = ("seqlora", "replay", "decoupled", "multitask")  # built by strategies.make_strategy
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """Refuse names that could escape a directory when they become a path component."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid {what} {name!r}: use 1-64 of [A-Za-z0-9_.-], not starting with . or -")
    return name


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen backbone to load."""

    source: str = "builtin:tiny"  # "builtin:tiny", "builtin:test", or a local HF LLaVA-style model dir
    quantization: str | None = None  # None, "4bit" (NF4 + double quant) or "8bit"; issue 5 wires it in

    def __post_init__(self) -> None:
        if self.source.startswith("builtin:") and self.source not in BUILTIN_BACKBONES:
            raise ValueError(f"unknown built-in backbone {self.source!r}; known: {BUILTIN_BACKBONES}")
        if not self.source.startswith("builtin:") and not Path(self.source).is_dir():
            raise ValueError(f"backbone {self.source!r} is neither builtin:* nor a local directory")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}")


@dataclass(frozen=True)
class LoraSpec:
    """Ranks of the visual side (vision tower + projector) and the text side (LM) of an adapter."""

    visual_rank: int = 8  # 0 leaves the vision side frozen (and lets its features be cached)
    text_rank: int = 8  # LoRA rank on the LM's attention and MLP projections
    alpha_ratio: float = 2.0  # lora_alpha = alpha_ratio * rank; raising it scales the update up
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.visual_rank < 0 or self.text_rank < 0 or self.visual_rank + self.text_rank == 0:
            raise ValueError(
                f"ranks must be >= 0 and not both 0 (visual_rank={self.visual_rank}, "
                f"text_rank={self.text_rank})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """How each task is trained."""

    steps: int = 100  # optimizer steps per task; more steps learn more and forget more
    batch_size: int = 32  # global batch, split across workers
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    num_workers: int = 1  # Ray Train workers; DDP over gloo when > 1
    cpus_per_worker: int | None = None  # None: the cluster's CPUs split evenly across workers
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must divide evenly across "
                f"train.num_workers ({self.num_workers})"
            )
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"train.cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class RunConfig:
    """One continual run: a stream of tasks learned by one or more strategies."""

    strategies: tuple[str, ...] = ("seqlora", "decoupled", "multitask")
    tasks: int = 8  # how many tasks of the stream to learn, in order
    data: str | None = None  # directory of <task>.parquet; None generates the built-in benchmark
    out: str = "runs/default"
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    replay_per_task: int = 100  # reservoir size kept per task by the replay strategy
    n_train: int = 1000  # built-in benchmark sizes (ignored when `data` is given)
    n_val: int = 100
    n_test: int = 500
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.strategies:
            raise ValueError("at least one strategy is needed")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"unknown strategy {s!r}; known: {sorted(STRATEGIES)}")
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")

    def hash(self) -> str:
        """A short content hash of the whole config, for manifests and lineage."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Fill a (possibly nested) config dataclass from a mapping; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        nested = type(default()) if default is not None and dataclasses.is_dataclass(default()) else None
        if nested is not None and (isinstance(value, dict) or value is None):
            kwargs[key] = from_dict(nested, value or {}, f"{where}.{key}")  # `train:` alone = defaults
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)
