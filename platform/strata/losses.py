"""Loss pieces shared by strategies: knowledge distillation (LwF, MoDE, CMA) and InfoNCE (Decoupled, CMA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T over the masked positions, times T² (Hinton).

    student, teacher: (B, L, V) logits; mask: (B, L) bool of the positions that count.
    """
    if not mask.any():
        return student.sum() * 0.0
    s = F.log_softmax(student[mask] / temperature, dim=-1)
    t = F.log_softmax(teacher[mask].detach() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a supervised token (labels shifted left by one)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached copies of parameters: the state a teacher or θ* is computed from."""
    return {k: p.detach().clone() for k, p in params.items()}


@torch.no_grad()
def forward_with(model: torch.nn.Module, state: dict[str, torch.Tensor], batch: dict, **kwargs):
    """Run `model` on `batch` with some parameters swapped for `state`, without touching them."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()  # a teacher has no dropout
    try:
        return functional_call(model, state, args=(), kwargs={**inputs, **kwargs}, strict=False)
    finally:
        model.train(was_training)


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
