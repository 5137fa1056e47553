"""CMA: one shared cross-modality MoE adapter whose busiest experts (and their gate rows) freeze after each task.

After "Multi-Modal Continual Learning via Cross-Modality Adapters and Representation Alignment with
Knowledge Preservation" (arXiv:2511.06723).

Loss = CE + distill_weight·KD + align_weight·alignment + sqrt(t−1)·preserve_weight·preservation, with
t the 1-based task number. KD and preservation compare the current adapter with the previous task's
adapter (a parameter snapshot, run with `forward_with`) on a memory buffer of earlier tasks' rows, so
both are absent on the first task. State in ctx.state_dir: the freeze masks (cma_freeze.json), the
memory buffer (memory/, `opts.memory` rows split evenly over the tasks seen), and an expert-usage log.
The run's AdapterSpec is not used: CMA brings its own adapter (adapters/cross_modal_moe.py).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.func import functional_call

from strata.adapters import cross_modal_moe as cma
from strata.adapters.custom import adapter_parameters
from strata.atomic import write_text
from strata.backbone.features import modality_masks
from strata.config import check_positive, check_unit
from strata.data.collate import Encoded, collate, encode_table
from strata.data.replay import ReplayBuffer
from strata.hooks import Strategy, TaskContext
from strata.losses import forward_with, info_nce, kd_loss, snapshot, target_mask
from strata.strategies import register

FREEZE_FILE = "cma_freeze.json"
USAGE_FILE = "expert_usage.jsonl"
MEMORY = "memory"  # the memory buffer's folder in the strategy's state directory


def alignment_loss(z_v: torch.Tensor, z_t: torch.Tensor, z_joint: torch.Tensor, tau: float) -> torch.Tensor:
    """Pull each modality toward the fused joint representation: InfoNCE(z_v, z_joint) + InfoNCE(z_t, z_joint).

    The joint side is not detached: in a LLaVA model no classifier sits on z_joint, so this term is
    what trains the fusion head; the in-batch negatives keep the joint from collapsing to a constant.
    """
    return (info_nce(z_v, z_joint, tau) + info_nce(z_t, z_joint, tau)) / 2


def relation(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise log-softmax of the pairwise cosine similarities of (M, D) vectors, self-pairs left out: (M, M−1)."""
    zn = F.normalize(z, dim=-1)
    sims = zn @ zn.T  # (M, M)
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return F.log_softmax(sims[off].view(len(z), len(z) - 1) / temperature, dim=-1)


def preservation_loss(z_old: torch.Tensor, z_new: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(old ‖ new) between the rows' similarity distributions to the other memory samples (batchmean)."""
    if z_old.shape != z_new.shape or z_old.dim() != 2:
        raise ValueError(f"z_old and z_new must both be (M, D), got {tuple(z_old.shape)} and {tuple(z_new.shape)}")
    if len(z_new) < 2:  # one sample has no pairs
        return z_new.sum() * 0.0
    old, new = relation(z_old.detach(), temperature), relation(z_new, temperature)
    return F.kl_div(new, old, log_target=True, reduction="batchmean")


def update_masks(counts: dict[str, torch.Tensor], old: dict[str, list[bool]], opts: CMAConfig) -> dict[str, list[bool]]:
    """Add, per layer, up to `freeze_top` of the task's busiest experts above `freeze_threshold` to `old`'s
    frozen ones, never past `freeze_cap` of the layer's experts (none when `freeze` is off)."""
    masks = {name: list(mask) for name, mask in old.items()}
    for name, c in counts.items():
        mask = masks.setdefault(name, [False] * len(c))
        if len(mask) != len(c):
            raise ValueError(f"layer {name}: {len(c)} expert counts but a freeze mask of {len(mask)}")
        if not opts.freeze:
            continue
        share = cma.shares(c)
        room = min(opts.freeze_top, int(opts.freeze_cap * len(c) + 1e-9) - sum(mask))  # 1e-9: 0.29 * 100 is 28.99…
        busy = [e for e in share.argsort(descending=True).tolist() if share[e] > opts.freeze_threshold and not mask[e]]
        for e in busy[:max(room, 0)]:
            mask[e] = True
    return masks


def read_masks(state_dir: str | Path) -> dict[str, list[bool]]:
    """Frozen-expert masks by layer name ({} before any task has finished)."""
    path = Path(state_dir) / FREEZE_FILE
    return json.loads(path.read_text())["masks"] if path.exists() else {}


@dataclass(frozen=True)
class CMAConfig:
    """Options of CMA: the cross-modality MoE adapter, expert freezing, the memory buffer and the loss weights."""

    # Adapters after the last B blocks of the LM; None: after every block, as the seed does. On the
    # built-in tiny LM (3 blocks, width 64) B=2 with width 16 learned the first task to 17% vs 42% at
    # every block with width 64 (LoRA: 38%); the defaults are the latter.
    blocks: int | None = None
    experts: int = 10
    top_k: int = 2
    hidden: int = 64  # bottleneck width of each expert
    # After each task, each layer freezes up to `freeze_top` more of the experts the task used most
    # (share of its text tokens' top-k picks above `freeze_threshold`, the paper's 10%), until
    # `freeze_cap` of the layer's experts are frozen. Without the cap a uniform 1/E share is the
    # threshold itself, half the experts froze after one task and later tasks had little left.
    freeze_threshold: float = 0.1
    freeze_top: int = 2
    freeze_cap: float = 0.5
    freeze: bool = True  # False: the no-freezing ablation
    memory: int = 200  # memory-buffer rows kept across all tasks
    memory_batch: int = 8  # memory rows per training step
    distill_weight: float = 1.0
    align_weight: float = 0.1
    preserve_weight: float = 1.0  # multiplied by sqrt(t - 1)
    temperature: float = 2.0  # KD temperature on the logits
    # Cosine similarities live in [-1, 1]: at T=2 their softmax is almost uniform and preservation
    # carries no signal, so the similarity distributions get their own, sharper temperature.
    preserve_temperature: float = 0.1
    align_tau: float = 0.07  # InfoNCE temperature of the alignment term (the CLIP value)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"cma.top_k must be in [1, cma.experts={self.experts}], got {self.top_k}")
        if (self.blocks is not None and self.blocks < 1) or min(self.hidden, self.memory, self.memory_batch) < 1:
            raise ValueError("cma.blocks (or null), cma.hidden, cma.memory and cma.memory_batch must be >= 1")
        check_unit(self.freeze_threshold, "cma.freeze_threshold")
        check_unit(self.freeze_cap, "cma.freeze_cap")
        if self.freeze_top < 0:
            raise ValueError(f"cma.freeze_top must be >= 0, got {self.freeze_top}")
        check_positive(self, "cma", at_least_zero=("distill_weight", "align_weight", "preserve_weight"),
                        above_zero=("temperature", "preserve_temperature", "align_tau"))


@register("cma", CMAConfig)
@dataclass
class CMA(Strategy):
    """One shared cross-modality MoE adapter; CE + KD + alignment + preservation; busy experts (and their gate rows) freeze."""

    opts: CMAConfig = field(default_factory=CMAConfig)
    needs_hidden_states = True  # the joint representation reads the LM's final hidden state

    def __post_init__(self) -> None:
        self.previous: dict[str, torch.Tensor] | None = None  # worker side: the previous adapter's state
        self.old_head: dict[str, torch.Tensor] = {}  # the previous joint head's weights, by head-local name
        self.memory: Encoded | None = None
        self.layers: dict[str, cma.CrossModalMoE] = {}
        self.index, self.seed, self.pad_id, self.frozen = 0, 0, 0, 0
        self.last: dict[str, float] = {}

    # ---- driver side -----------------------------------------------------------------------
    def load_eval(self, backbone: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        """The backbone with the shared CMA adapter after task `ctx`, frozen."""
        return cma.load(backbone, ctx.adapters_dir / self.adapter_name(ctx))[0]

    def version_files(self, ctx: TaskContext, scratch: Path) -> dict[str, Path]:
        """The expert-freeze masks as they stand after this task."""
        path = Path(ctx.state_dir) / FREEZE_FILE
        return {FREEZE_FILE: path} if path.exists() else {}

    def state_records(self, ctx: TaskContext) -> dict[str, Path]:
        """The adapter, the freeze masks and every task's share of the memory buffer."""
        state = Path(ctx.state_dir)
        memory = {f"{MEMORY}/{f.stem}": f for f in sorted((state / MEMORY).glob("*.parquet"))}
        return super().state_records(ctx) | {"freeze_masks": state / FREEZE_FILE} | memory

    def after_task(self, ctx: TaskContext, train: pa.Table) -> None:
        """Freeze the busy experts, log their use, and give this task its share of the memory."""
        counts = cma.read_counts(ctx.adapters_dir / self.adapter_name(ctx))
        masks = update_masks(counts, read_masks(ctx.state_dir), self.opts)
        state = Path(ctx.state_dir)
        write_text(state / FREEZE_FILE, json.dumps({"masks": masks, "after": ctx.name}, indent=1))
        with open(state / USAGE_FILE, "a") as f:
            f.writelines(json.dumps({"task": ctx.name, "layer": layer, "shares": cma.shares(c).tolist(),
                                    "frozen": masks[layer]}) + "\n" for layer, c in counts.items())
        memory = ReplayBuffer(state / MEMORY)
        per_task = max(1, self.opts.memory // (len(ctx.seen) + 1))
        for old in memory.tasks():  # earlier tasks shrink to their new share (a uniform sample of a sample)
            if old != ctx.name:
                memory.add(old, memory.read(old), per_task, ctx.seed)
        memory.add(ctx.name, train, per_task, ctx.seed + ctx.index)

    # ---- worker side -----------------------------------------------------------------------
    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        """Attach (or load the previous) adapter, freeze experts, snapshot it, and encode the memory once."""
        previous = ctx.adapters_dir / self.adapter_name(ctx)
        o = self.opts
        if previous.exists():
            model, config = cma.load(backbone, previous, trainable=True)
            if (config["experts"], config["top_k"], config["hidden"], len(config["layers"])) != \
                    (o.experts, o.top_k, o.hidden, o.blocks or len(config["layers"])):
                raise ValueError(f"the adapter in {previous} was built with {config}, which does not match {o}")
        else:
            model = backbone
            cma.attach(model, o.blocks, o.experts, o.top_k, o.hidden)
        self.frozen = cma.freeze_experts(model, read_masks(ctx.state_dir)) if o.freeze else 0
        self.previous = snapshot(adapter_parameters(model)) if ctx.index > 0 and previous.exists() else None
        rows = ReplayBuffer(Path(ctx.state_dir) / MEMORY).rows()
        self.memory = encode_table(processor, rows, with_answers=True) if rows is not None else None
        name, _ = cma.joint_head(model)
        self.old_head = {k.removeprefix(f"{name}."): v for k, v in (self.previous or {}).items()
                         if k.startswith(f"{name}.")}
        self.layers, self.index, self.seed = cma.moe_layers(model), ctx.index, ctx.seed
        self.pad_id, self.last = processor.tokenizer.pad_token_id, {}
        return model

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """Alignment on the batch, plus KD and preservation on memory rows once a previous adapter exists."""
        image, text = modality_masks(model, batch)
        # Text tokens only: every task's pictures look alike to the gate, its words do not.
        cma.record_usage(model, text)  # before any memory forward overwrites the choices
        o = self.opts
        _, head = cma.joint_head(model)
        z_v, z_t, z_joint = head(outputs.hidden_states[-1], image, text)
        terms = {"align": (o.align_weight, alignment_loss(z_v, z_t, z_joint, o.align_tau))}
        if self.previous is not None and self.memory is not None:
            mem = self.memory_batch(step, batch["input_ids"].device)
            new = model(**{k: v for k, v in mem.items() if k != "labels"}, output_hidden_states=True)
            old = forward_with(model, self.previous, mem, output_hidden_states=True)
            terms["distill"] = (o.distill_weight, kd_loss(new.logits, old.logits, target_mask(mem["labels"]),
                                                          o.temperature))
            image, text = modality_masks(model, mem)
            z_new = head(new.hidden_states[-1], image, text)[2]
            with torch.no_grad():
                z_old = functional_call(head, self.old_head, (old.hidden_states[-1], image, text))[2]
            weight = math.sqrt(self.index) * o.preserve_weight  # sqrt(t − 1) with t = index + 1
            terms["preserve"] = (weight, preservation_loss(z_old, z_new, o.preserve_temperature))
        self.last = {k: v.item() for k, (_, v) in terms.items()}
        return sum(w * v for w, v in terms.values())

    def memory_batch(self, step: int, device: torch.device) -> dict[str, torch.Tensor]:
        """`memory_batch` memory rows for this step, drawn the same way on every rank."""
        rng = random.Random(f"{self.seed}:{self.index}:{step}")
        idx = rng.sample(range(len(self.memory)), min(self.opts.memory_batch, len(self.memory)))
        return {k: v.to(device) for k, v in collate(self.memory.select(idx), self.pad_id).items()}

    def train_state(self) -> dict[str, torch.Tensor]:
        """This task's expert-selection counts so far (they decide the freeze after the task)."""
        return {f"counts.{name}": layer.counts for name, layer in self.layers.items()}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue counting expert selections from the checkpoint's counts."""
        for name, layer in self.layers.items():
            layer.counts.copy_(state[f"counts.{name}"])

    def metrics(self) -> dict[str, float]:
        """Per-layer max share and entropy of this task's expert selections, frozen experts, loss terms."""
        out: dict[str, float] = {"cma/frozen_experts": float(self.frozen)}
        for i, layer in enumerate(self.layers.values()):
            p = cma.shares(layer.counts)
            out[f"cma/layer{i}/max_share"] = float(p.max())
            out[f"cma/layer{i}/entropy"] = cma.entropy(p)
        return out | {f"cma/loss/{k}": v for k, v in self.last.items()}

    def save(self, model: torch.nn.Module, ctx: TaskContext, dest: Path) -> Path:
        """Write the CMA weights, joint heads and usage counts as one side file, atomically."""
        return cma.save(model, dest)
