"""MoDE: modality-decoupled experts, one shared adapter evolving across tasks.

After "Mitigating Intra- and Inter-modal Forgetting in Continual Learning of Unified Multimodal
Models" (arXiv:2512.03125).

Text tokens train a T-MoE (ϕ), image tokens a V-Adapter (ψ). The task CE reaches both; the KD
anchor KL(backbone ‖ model) on a reference set of pretraining captions reaches ψ only, because the
student's text experts are detached for that term. With `coupled=True` this is the modality-coupled
MoE-LoRA baseline: there is no ψ, so KD (when its weight is > 0) goes into the shared MoE.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from strata.adapters import custom
from strata.adapters import modality_lora as ml
from strata.data import pretraining
from strata.data.collate import Encoded, collate, encode_table
from strata.data.schema import read_table
from strata.hooks import Strategy, TaskContext
from strata.losses import kd_loss, target_mask
from strata.strategies import register


@functools.lru_cache(maxsize=2)
def _corpus(seed: int, n: int, image_size: int) -> tuple[tuple[bytes, str, str], ...]:
    # Drawing thousands of scenes takes about a second: MoDE and the coupled probe share one draw.
    return tuple(pretraining.corpus(seed, n, image_size))


def pretraining_reference(backbone_dir: Path, rows: int, seed: int) -> pa.Table:
    """A deterministic sample (seeded by `seed`) of `rows` rows of a built-in backbone's own
    pretraining mixture (captions, questions, rendered words), rebuilt from the recipe it records."""
    recipe_file = Path(backbone_dir) / "strata_recipe.json"
    if not recipe_file.exists():
        raise ValueError(f"mode.reference='pretraining' needs the backbone's pretraining rows, but "
                         f"{backbone_dir} is not a built-in backbone (no strata_recipe.json); set "
                         "mode.reference to a Parquet dataset of reference rows instead")
    recipe = json.loads(recipe_file.read_text())["recipe"]
    size = recipe["corpus_size"]
    idx = sorted(random.Random(f"mode-reference:{seed}").sample(range(size), min(rows, size)))
    # The corpus is one seeded stream, so its first k rows do not depend on how many are drawn.
    corpus = _corpus(recipe["seed"], idx[-1] + 1, recipe["image_size"])
    picked = [corpus[i] for i in idx]
    return pa.table({"image": [r[0] for r in picked], "prompt": [r[1] for r in picked],
                     "answer": [r[2] for r in picked]})


def file_reference(path: str, rows: int, seed: int) -> pa.Table:
    """A deterministic sample of up to `rows` rows of a Parquet dataset in the public schema."""
    table = read_table(path)
    missing = {"image", "prompt", "answer"} - set(table.column_names)
    if missing:
        raise ValueError(f"mode.reference {path!r} lacks column(s) {sorted(missing)}")
    if len(table) == 0:
        raise ValueError(f"mode.reference {path!r} has no rows")
    idx = sorted(random.Random(f"mode-reference:{seed}").sample(range(len(table)), min(rows, len(table))))
    return table.take(idx)


@dataclass(frozen=True)
class MoDEConfig:
    """Options of MoDE: T-MoE experts for text tokens, a V-Adapter for image tokens, KD on a reference set."""

    experts: int = 4  # LoRA experts in each T-MoE
    rank: int = 8  # rank of every T-MoE expert and of the V-Adapter
    kd_weight: float = 0.3  # lambda: weight of KL(teacher || student) on the reference set
    temperature: float = 2.0
    reference: str = "pretraining"  # "pretraining" (backbone captions) or a Parquet dataset path
    reference_rows: int = 256
    kd_batch: int = 8  # reference rows per training step
    coupled: bool = False  # True: every token goes through one MoE-LoRA (the coupled baseline)

    def __post_init__(self) -> None:
        if self.experts < 1 or self.rank < 1 or self.reference_rows < 1 or self.kd_batch < 1:
            raise ValueError("mode.experts, mode.rank, mode.reference_rows and mode.kd_batch must be >= 1")
        if self.kd_weight < 0 or self.temperature <= 0:
            raise ValueError(f"mode.kd_weight must be >= 0 and mode.temperature > 0, got "
                             f"{self.kd_weight}, {self.temperature}")


@register("mode", MoDEConfig)
@dataclass
class MoDE(Strategy):
    """One shared modality-routed adapter: CE into ϕ and ψ, λ·KD on reference captions into ψ only."""

    opts: MoDEConfig = field(default_factory=MoDEConfig)

    def __post_init__(self) -> None:
        self.reference: Encoded | None = None  # worker side: the encoded reference set
        self.reference_key: tuple | None = None  # what it was built from, so it is built once
        self.pad_id = 0
        self.seed = (0, 0)  # (run seed, task index): the per-step KD sample stream
        self.kd_values: list[float] = []
        self.model: torch.nn.Module | None = None  # worker side: the model being trained, for router stats

    def layer_config(self) -> ml.ModalityLoRAConfig:
        """Shapes of the layers this strategy attaches."""
        return ml.ModalityLoRAConfig.from_options(self.opts, self.adapter)

    def load_eval(self, backbone: torch.nn.Module, ctx: TaskContext) -> torch.nn.Module:
        """The backbone with the saved shared adapter attached, frozen."""
        return ml.load(backbone, ctx.adapters_dir / self.adapter_name(ctx), trainable=False)

    # ---- worker side -----------------------------------------------------------------------
    def before_task(self, backbone: torch.nn.Module, processor, ctx: TaskContext) -> torch.nn.Module:
        """Attach (or reload) the shared adapter with ϕ and ψ trainable, and build the reference set."""
        saved = ctx.adapters_dir / self.adapter_name(ctx)
        if (saved / custom.SIDE_FILE).exists():
            cfg, _ = ml.read_config(saved)
            if cfg != self.layer_config():
                raise ValueError(f"the saved adapter {saved} has layers {cfg}, this run asks for "
                                 f"{self.layer_config()}; start a new stream to change them")
            model = ml.load(backbone, saved, trainable=True)  # training continues from the last task
        else:
            model = ml.attach(backbone, self.layer_config())
            for p in {**ml.phi(model), **ml.psi(model)}.values():
                p.requires_grad_(True)
        ml.router_stats(model, reset=True)
        self.model = model
        self.pad_id = processor.tokenizer.pad_token_id
        self.seed = (ctx.seed, ctx.index)
        self.kd_values = []
        if self.opts.kd_weight > 0:
            self.build_reference(model, processor, ctx.seed)
        return model

    def build_reference(self, model: torch.nn.Module, processor, seed: int) -> Encoded:
        """Encode the reference set once per (source, size, seed); captions are the supervised tokens."""
        source = str(getattr(model, "name_or_path", "")) if self.opts.reference == "pretraining" else None
        key = (self.opts.reference, source, self.opts.reference_rows, seed)
        if self.reference is None or self.reference_key != key:
            if self.opts.reference == "pretraining":
                table = pretraining_reference(Path(source), self.opts.reference_rows, seed)
            else:
                table = file_reference(self.opts.reference, self.opts.reference_rows, seed)
            self.reference, self.reference_key = encode_table(processor, table, with_answers=True), key
        return self.reference

    def loss(self, model: torch.nn.Module, batch: dict, outputs, step: int) -> torch.Tensor | None:
        """λ · KL(backbone ‖ model) on a seeded reference batch, caption positions only, into ψ only."""
        if self.opts.kd_weight == 0:
            return None
        if self.reference is None:
            raise RuntimeError("MoDE.loss before before_task: the reference set is not built")
        rng = random.Random(f"mode-kd:{self.seed[0]}:{self.seed[1]}:{step}")
        idx = rng.sample(range(len(self.reference)), min(self.opts.kd_batch, len(self.reference)))
        device = batch["input_ids"].device
        ref = {k: v.to(device) for k, v in collate(self.reference.select(idx), self.pad_id).items()}
        mask = target_mask(ref.pop("labels"))  # (B, L): positions predicting a caption token
        with torch.no_grad(), ml.adapters_disabled(model):
            teacher = model(**ref).logits  # (B, L, V)
        # The coupled baseline has no ψ: detaching its only adapter would leave KD with no gradient at all.
        detach = ml.text_detached(model) if not self.opts.coupled else contextlib.nullcontext()
        with detach:
            student = model(**ref).logits
        kd = kd_loss(student, teacher, mask, self.opts.temperature)
        self.kd_values.append(kd.item())
        return self.opts.kd_weight * kd

    def metrics(self) -> dict[str, float]:
        """Mean KD, mean per-token router entropy (nats) and mean expert weights, over the task so far."""
        out: dict[str, float] = {}
        if self.kd_values:
            out["mode/kd"] = sum(self.kd_values) / len(self.kd_values)
        if self.model is not None:
            stats = ml.router_stats(self.model, reset=False)
            if stats["tokens"]:
                out["mode/router_entropy"] = stats["entropy"]
                out.update({f"mode/expert{j}": w for j, w in enumerate(stats["expert_weight"])})
        return out

    def save(self, model: torch.nn.Module, ctx: TaskContext, dest: Path) -> Path:
        """Write ϕ, ψ and the layer config as a side file (atomically)."""
        return ml.save(model, dest)
