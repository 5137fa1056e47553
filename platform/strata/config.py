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

BUILTIN_BACKBONES = ("builtin:tiny", "builtin:test", "builtin:tiny-qwen2vl", "builtin:test-qwen2vl")  # strata.backbone.tiny.RECIPES
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """Refuse names that could escape a directory when they become a path component."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid {what} {name!r}: use 1-64 of [A-Za-z0-9_.-], not starting with . or -")
    return name


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen backbone to load."""

    source: str = "builtin:tiny"  # one of BUILTIN_BACKBONES, or a local model directory of a supported family
    quantization: str | None = None  # None, "4bit" (NF4 + double quant) or "8bit" (bitsandbytes)

    def __post_init__(self) -> None:
        if self.source.startswith("builtin:") and self.source not in BUILTIN_BACKBONES:
            raise ValueError(f"unknown built-in backbone {self.source!r}; known: {BUILTIN_BACKBONES}")
        if not self.source.startswith("builtin:") and not Path(self.source).is_dir():
            raise ValueError(f"backbone {self.source!r} is neither builtin:* nor a local directory")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}")


ADAPTER_KINDS = ("lora", "dora", "bottleneck", "prefix", "bitfit")
MULTI_ADAPTER_KINDS = ("lora", "dora")  # kinds that can share a model as several named adapters
PLACEMENTS = ("all", "top_half", "bottom_half", "every_other", "vision_only", "language_only")


@dataclass(frozen=True)
class AdapterSpec:
    """What kind of adapter to train, where it sits, and its ranks per side (and per layer)."""

    kind: str = "lora"  # one of ADAPTER_KINDS; adapters/placement.py says which placements fit
    placement: str = "all"  # one of PLACEMENTS: which layers of which tower get the adapter
    visual_rank: int = 8  # 0 leaves the vision side frozen (and lets its features be cached)
    text_rank: int = 8  # rank (LoRA/DoRA), bottleneck width or prefix length on the LM side
    alpha_ratio: float = 2.0  # lora_alpha = alpha_ratio * rank; raising it scales the update up
    dropout: float = 0.0
    layer_ranks: dict[str, int] = field(default_factory=dict)  # module-name regex -> rank (adaptive)

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter.kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"adapter.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.visual_rank < 0 or self.text_rank < 0 or self.visual_rank + self.text_rank == 0:
            raise ValueError(
                f"ranks must be >= 0 and not both 0 (visual_rank={self.visual_rank}, "
                f"text_rank={self.text_rank})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        for pattern, rank in self.layer_ranks.items():
            if not isinstance(rank, int) or rank < 1:
                raise ValueError(f"adapter.layer_ranks[{pattern!r}] must be an int >= 1, got {rank!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"adapter.layer_ranks key {pattern!r} is not a valid regex: {e}") from None

    def __hash__(self) -> int:
        return hash((self.kind, self.placement, self.visual_rank, self.text_rank, self.alpha_ratio,
                     self.dropout, tuple(sorted(self.layer_ranks.items()))))


def check_unit(value: float, where: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {value}")


def check_positive(owner: object, section: str, *, at_least_zero: tuple[str, ...] = (),
                    above_zero: tuple[str, ...] = ()) -> None:
    """Refuse negative weights and non-positive temperatures/sizes, naming `section.field`."""
    for name in at_least_zero:
        if getattr(owner, name) < 0:
            raise ValueError(f"{section}.{name} must be >= 0, got {getattr(owner, name)}")
    for name in above_zero:
        if getattr(owner, name) <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {getattr(owner, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """How each task is trained, and on what: Ray Train scaling, storage, fault tolerance, precision."""

    steps: int = 300  # the most optimizer steps per task; early stopping on val usually ends sooner
    val_every: int = 25  # steps between val-loss checks for early stopping (0: always train every step)
    # Val checks in a row without a real gain in val loss (train/loop.py) before the task stops. A
    # binding task (`exists`) can sit on a plateau for a few checks before its loss falls again:
    # with 2, make run stopped it at 125 steps and 79% (BENCHMARKS.md).
    patience: int = 4
    batch_size: int = 32  # global batch, split across workers
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (always done by the loop, after DGG's ĝ)
    num_workers: int = 1  # Ray Train workers; DDP (or DeepSpeed) when > 1
    cpus_per_worker: int | None = None  # None: the cluster's CPUs split evenly across workers
    use_gpu: bool = False  # one GPU per worker and NCCL; False: CPU workers and gloo
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources
    storage_path: str | None = None  # Ray Train checkpoints: a local dir or any pyarrow.fs URI (s3://...)
    max_failures: int = 2  # worker-group restarts per task; each resumes from the last checkpoint
    checkpoint_every: int = 25  # steps between resumable checkpoints (0: only the final adapter)
    # Steps between metric reports to Ray. A report is a round trip to the Train controller, about
    # 0.1 s on the 2-core box: reporting every step doubled make run's training time (BENCHMARKS.md).
    report_every: int = 25
    zero_stage: int | None = None  # None: plain DDP; 0-3: DeepSpeed ZeRO stage
    zero_offload: bool = False  # DeepSpeed: optimizer state on the CPU (DeepSpeedCPUAdam)
    bf16: bool = False  # bfloat16 autocast for forward/backward (adapter weights stay fp32)
    gradient_checkpointing: bool = False  # recompute backbone activations in backward to save memory
    seed: int = 0
    executor: str = "ray"  # "ray": Ray Train workers; "local": the same loop in this process (1 worker)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_workers", "report_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must divide evenly across "
                f"train.num_workers ({self.num_workers})"
            )
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"train.cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.lr < 0:  # lr = 0 is allowed: a sweep's known-bad control trains nothing
            raise ValueError(f"train.lr must be >= 0, got {self.lr}")
        check_positive(self, "train", at_least_zero=("max_failures", "checkpoint_every", "weight_decay",
                                                       "max_grad_norm", "val_every"))
        for key, amount in self.resources_per_worker.items():
            if key in ("CPU", "GPU") or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"train.resources_per_worker[{key!r}] must be a custom resource with an "
                                 f"amount > 0 (CPU and GPU have their own fields), got {amount!r}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be null or one of 0, 1, 2, 3, got {self.zero_stage!r}")
        if self.zero_offload and self.zero_stage is None:
            raise ValueError("train.zero_offload needs train.zero_stage (DeepSpeed offloads ZeRO state)")
        if self.executor not in ("ray", "local"):
            raise ValueError(f"train.executor must be 'ray' or 'local', got {self.executor!r}")
        if self.executor == "local" and self.num_workers != 1:
            raise ValueError("train.executor 'local' runs one worker; use 'ray' for num_workers > 1")

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))


GATE_MODES = ("enforce", "report")


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate on `val` (docs/ARCHITECTURE.md): a floor, a forgetting ceiling and a KL bound."""

    mode: str = "enforce"  # enforce: a failing candidate is rejected; report: recorded, promoted anyway
    floor: float = 0.0  # new task val accuracy (%) must reach this ...
    min_gain: float = 0.0  # ... and beat what the served state scored on it by this many points
    forgetting_ceiling: float = 10.0  # most points any old task's val accuracy may drop
    kl_threshold: float = 1.0  # most mean KL(anchor || candidate), nats per answer token
    calibrate_kl: bool = False  # derive the threshold from the first tasks' drift instead
    calibration_tasks: int = 2  # tasks whose drift sets the calibrated threshold (they pass on KL)
    calibration_factor: float = 3.0  # calibrated threshold = factor x the largest drift seen on them
    anchor: str | None = None  # Parquet anchor set; None: val rows of the tasks learned before
    anchor_rows: int = 64

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"gate.mode must be one of {GATE_MODES}, got {self.mode!r}")
        for name in ("forgetting_ceiling", "kl_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"gate.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.floor <= 100:
            raise ValueError(f"gate.floor must be a percentage in [0, 100], got {self.floor}")
        if self.calibration_tasks < 1 or self.calibration_factor <= 0:
            raise ValueError("gate.calibration_tasks must be >= 1 and gate.calibration_factor > 0")
        if self.anchor_rows < 1:
            raise ValueError(f"gate.anchor_rows must be >= 1, got {self.anchor_rows}")


@dataclass(frozen=True)
class RunConfig:
    """One continual run: a stream of tasks learned by one or more strategies."""

    strategies: tuple[str, ...] = ("seqlora", "decoupled", "multitask")
    tasks: int = 8  # how many tasks of the stream to learn, in order
    data: str | None = None  # directory of <task>.parquet; None generates the built-in benchmark
    out: str = "runs/default"
    stream: str = "default"  # names the coordinator actor that holds this stream's state
    storage: str | None = None  # coordinator state: a dir or pyarrow.fs URI; None: <out>/coordinator
    registry: str | None = None  # adapter registry: a dir or pyarrow.fs URI; None: <out>/registry
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)  # strategy name -> its options dataclass
    n_train: int = 1000  # built-in benchmark sizes (ignored when `data` is given)
    n_val: int = 100
    n_test: int = 500
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        # Strategy names and options are checked by the registry (strata.strategies.run_config and
        # make_strategy): config.py sits below the strategies and does not import them.
        if not self.strategies:
            raise ValueError("at least one strategy is needed")
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        check_name(self.stream, "stream name")

    def hash(self) -> str:
        """A short content hash of the whole config, for manifests and lineage."""
        data = dataclasses.asdict(self)
        # Options set to a strategy's defaults are the same run as options left out.
        data["options"] = {k: dataclasses.asdict(v) for k, v in self.options.items() if v != type(v)()}
        blob = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def smoke_test(cfg: RunConfig) -> RunConfig:
    """The same run, small enough to check in minutes: the test backbone of the same built-in family
    (builtin:test, or builtin:test-qwen2vl for the Qwen one), <= 2 tasks, 60 steps (lr >= 3e-3), few rows."""
    small = "builtin:test-qwen2vl" if cfg.backbone.source.endswith("qwen2vl") else "builtin:test"
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, source=small), tasks=min(cfg.tasks, 2),
        n_train=min(cfg.n_train, 320), n_val=min(cfg.n_val, 16), n_test=min(cfg.n_test, 80),
        train=dataclasses.replace(cfg.train, steps=min(cfg.train.steps, 60), lr=max(cfg.train.lr, 3e-3),
                                  checkpoint_every=0),
    )


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

