"""Gradient-conflict probe (MoDE's motivation: arXiv:2512.03125): do the text and image losses pull an adapter's parameters apart?

For an understanding-only LLaVA the two losses on one batch are
  L_text  = the task CE on answer tokens;
  L_image = λ · KL(backbone ‖ model) at the image-token positions (MoDE's anchor, at image tokens).
Their gradients are taken separately with nothing detached. For every parameter tensor that gets a
non-zero gradient from both, the cosine between the two is computed; the cosines are summarised per
group (ϕ and ψ for MoDE, the one MoE-LoRA for the coupled baseline) with the gradient norms. In a causal
LLaVA, text positions attend to image positions, so L_text does reach ψ: the probe measures how much.
A fresh adapter has B = 0 (so ∇A = 0, and the KL and its gradient are 0), hence `probe` trains first.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from rich.table import Table

from strata.adapters import modality_lora as ml
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, BackboneSpec, TrainConfig
from strata.data.collate import collate, encode_table
from strata.hooks import TaskContext
from strata.losses import kd_loss
from strata.strategies.mode import MoDE, MoDEConfig
from strata.train.loop import train_task

KINDS = ("mode", "coupled")
OWN = {"phi": "text", "psi": "image", "moe": "text"}  # the loss each group is meant to serve


def _groups(model: torch.nn.Module, kind: str) -> dict[str, dict[str, torch.nn.Parameter]]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    coupled = ml.context(model).config.coupled
    if coupled != (kind == "coupled"):
        raise ValueError(f"kind {kind!r} does not match the model's layers (coupled={coupled})")
    return {"moe": ml.phi(model)} if coupled else {"phi": ml.phi(model), "psi": ml.psi(model)}


def _summary(grads_text: dict[str, torch.Tensor], grads_image: dict[str, torch.Tensor], own: str) -> dict:
    """Cosines over tensors with both gradients non-zero, plus group-level norms and cosine."""
    cosines, counts = [], {"both": 0, "text_only": 0, "image_only": 0, "neither": 0}
    for name, gt in grads_text.items():
        gi = grads_image[name]
        has_t, has_i = bool(gt.abs().max() > 0), bool(gi.abs().max() > 0)
        counts[{(True, True): "both", (True, False): "text_only", (False, True): "image_only",
                (False, False): "neither"}[(has_t, has_i)]] += 1
        if has_t and has_i:
            cosines.append(F.cosine_similarity(gt.flatten().double(), gi.flatten().double(), dim=0).item())
    flat_t = torch.cat([g.flatten().double() for g in grads_text.values()])
    flat_i = torch.cat([g.flatten().double() for g in grads_image.values()])
    norm_t, norm_i = flat_t.norm().item(), flat_i.norm().item()
    nan = float("nan")
    own_norm, other_norm = (norm_t, norm_i) if own == "text" else (norm_i, norm_t)
    return {
        "params": len(grads_text), **counts,
        "cos_mean": sum(cosines) / len(cosines) if cosines else nan,
        "cos_min": min(cosines, default=nan),
        "cos_max": max(cosines, default=nan),
        "frac_negative": sum(c < 0 for c in cosines) / len(cosines) if cosines else nan,
        "cos_group": F.cosine_similarity(flat_t, flat_i, dim=0).item() if norm_t > 0 and norm_i > 0 else nan,
        "norm_text": norm_t,
        "norm_image": norm_i,
        "own_loss": own,
        # ‖∇ of the other modality's loss‖ / ‖∇ of the group's own loss‖ (e.g. ψ: ‖∇_ψ L_text‖ / ‖∇_ψ L_image‖)
        "cross_ratio": other_norm / own_norm if own_norm > 0 else nan,
    }


def conflict_report(
    model: torch.nn.Module,
    processor,
    rows_table: pa.Table,
    kind: str,
    kd_weight: float = 0.3,
    temperature: float = 2.0,
) -> dict:
    """∇L_text vs ∇L_image on one batch (every row of `rows_table`), per parameter group of `model`.

    `model` holds modality-routed layers (trained, or the gradients are degenerate); `kind` is
    "mode" or "coupled" and must match them. Nothing is detached; the model's params are left as found.
    """
    if kd_weight <= 0 or temperature <= 0:
        raise ValueError(f"kd_weight and temperature must be > 0 (L_image is λ·KL), got {kd_weight}, {temperature}")
    if len(rows_table) == 0:
        raise ValueError("the probe needs at least one row")
    groups = _groups(model, kind)
    params = {n: p for g in groups.values() for n, p in g.items()}
    batch = collate(encode_table(processor, rows_table, with_answers=True), processor.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    image = (batch["input_ids"] == ml.context(model).image_token_id) & batch["attention_mask"].bool()  # (B, L)

    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: both losses see the same function
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.no_grad(), ml.adapters_disabled(model):
            teacher = model(**inputs).logits  # (B, L, V)
        out = model(**batch)
        loss_text = out.loss
        loss_image = kd_weight * kd_loss(out.logits, teacher, image, temperature)
        names = list(params)
        g_text = torch.autograd.grad(loss_text, [params[n] for n in names], retain_graph=True, allow_unused=True)
        g_image = torch.autograd.grad(loss_image, [params[n] for n in names], allow_unused=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)

    def as_dict(grads: tuple) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads)}

    gt, gi = as_dict(g_text), as_dict(g_image)
    return {
        "kind": kind,
        "rows": len(rows_table),
        "loss_text": loss_text.item(),
        "loss_image": loss_image.item(),
        "groups": {name: _summary({n: gt[n] for n in g}, {n: gi[n] for n in g}, OWN[name])
                   for name, g in groups.items()},
    }


def probe(
    backbone_spec: BackboneSpec,
    backbone_path,
    table: pa.Table,
    mode_cfg: MoDEConfig,
    steps: int,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 2e-3,
    rows: int = 8,
    adapter: AdapterSpec | None = None,
) -> dict:
    """Train MoDE and the coupled MoE-LoRA for `steps` steps each (CE + MoDE's KD) on the train rows of
    `table`, from the same backbone and seed, then run `conflict_report` on one shared batch of `rows`
    rows sampled from those train rows. Returns {"mode": report, "coupled": report, "setup": {...}}."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1: a fresh adapter has B = 0, so its gradients say nothing (got {steps})")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    train = table.filter(pc.equal(table["split"], "train")) if "split" in table.column_names else table
    if len(train) == 0:
        raise ValueError("the probe table has no train rows")
    picked = sorted(random.Random(f"conflict:{seed}").sample(range(len(train)), min(rows, len(train))))
    batch_rows = train.take(picked)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, executor="local")
    out: dict = {"setup": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "rows": len(picked),
                           "kd_weight": mode_cfg.kd_weight, "temperature": mode_cfg.temperature,
                           "experts": mode_cfg.experts, "rank": mode_cfg.rank}}
    for kind in KINDS:
        model, processor = load_backbone(backbone_spec, backbone_path)
        strategy = MoDE(adapter=adapter or AdapterSpec(), opts=dataclasses.replace(mode_cfg, coupled=kind == "coupled"))
        with tempfile.TemporaryDirectory(prefix="strata-probe-") as tmp:
            ctx = TaskContext(0, "probe", (), {}, tmp, seed)
            train_task(model, processor, strategy, ctx, train, cfg, lambda metrics, ckpt: None, log_every=steps)
        trained = strategy.model
        out[kind] = conflict_report(trained, processor, batch_rows, kind, mode_cfg.kd_weight, mode_cfg.temperature)
    return out


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def conflict_table(report: dict) -> Table:
    """A terminal table of a `probe` result (or of one `conflict_report`): a row per kind and group."""
    reports = {report["kind"]: report} if "groups" in report else {k: report[k] for k in KINDS if k in report}
    if not reports:
        raise ValueError("not a conflict report: expected 'groups', or 'mode'/'coupled' entries")
    table = Table(title="Gradient conflict: cos(∇L_text, ∇L_image) per parameter tensor")
    for header in ("kind", "group", "both/params", "cos mean", "cos min", "cos max", "frac < 0",
                   "‖∇L_text‖", "‖∇L_image‖", "cross ratio"):
        table.add_column(header, justify="left" if header in ("kind", "group") else "right")
    for kind, rep in reports.items():
        for group, s in rep["groups"].items():
            table.add_row(kind, group, f"{s['both']:.0f}/{s['params']:.0f}", _fmt(s["cos_mean"]), _fmt(s["cos_min"]),
                          _fmt(s["cos_max"]), _fmt(s["frac_negative"], 2), f"{s['norm_text']:.3g}",
                          f"{s['norm_image']:.3g}", _fmt(s["cross_ratio"]))
    return table
