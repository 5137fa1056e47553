"""Continual-learning metrics: pure functions of the accuracy matrix R (docs/ARCHITECTURE.md, "Metrics").

R is a T×T matrix in percent (0-100) where R[t][i] is the accuracy on task i after training
task t (0-indexed here; the usual formulas are 1-based). The diagonal and lower triangle
must be filled; the upper triangle may be NaN/None, which is what an open-ended stream gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Matrix = Sequence[Sequence[float | None]] | np.ndarray

METRIC_KEYS = ("faa", "mfn", "mft", "maa", "bwt", "fwt", "forgetting")


def to_array(R: Matrix) -> np.ndarray:
    """Convert R to a square float array with None mapped to NaN; raise ValueError if not square."""
    if isinstance(R, np.ndarray):
        if R.ndim != 2 or R.shape[0] != R.shape[1]:
            raise ValueError(f"accuracy matrix must be square (T×T), got shape {R.shape}")
        rows: list[Any] = R.tolist()
    else:
        rows = [list(row) for row in R]
        n = len(rows)
        for t, row in enumerate(rows):
            if len(row) != n:
                raise ValueError(
                    f"accuracy matrix must be square (T×T): row {t} has {len(row)} entries, "
                    f"expected {n}"
                )
    if len(rows) == 0:
        raise ValueError("accuracy matrix is empty; need at least one task")
    try:
        return np.array(
            [[math.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"accuracy matrix holds a non-numeric entry: {e}") from None


def _validated(R: Matrix) -> np.ndarray:
    """to_array plus what every metric relies on: filled lower triangle, values in [0, 100]."""
    A = to_array(R)
    T = A.shape[0]
    for t in range(T):
        for i in range(t + 1):
            if not math.isfinite(A[t, i]):
                where = "diagonal" if i == t else "lower-triangle"
                raise ValueError(
                    f"accuracy matrix is missing {where} entry R[{t}][{i}] (accuracy on task {i} "
                    f"after task {t}); every task seen so far must be evaluated"
                )
    finite = A[np.isfinite(A)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 100.0):
        raise ValueError(
            f"accuracy matrix must be in percent (0-100), got values in "
            f"[{finite.min():g}, {finite.max():g}]"
        )
    return A


def faa(R: Matrix, sizes: Sequence[int]) -> float:
    """Final average accuracy: last row weighted by each task's number of test rows."""
    A = _validated(R)
    T = A.shape[0]
    if len(sizes) != T:
        raise ValueError(f"sizes has {len(sizes)} entries but R covers {T} tasks")
    w = np.asarray(sizes, dtype=np.float64)
    if (w < 0).any():
        raise ValueError(f"sizes must be non-negative test-row counts, got {list(sizes)}")
    if w.sum() == 0:
        raise ValueError("sizes sum to zero; at least one task needs test rows")
    return float((w * A[-1]).sum() / w.sum())


def mfn(R: Matrix) -> float:
    """Mean final accuracy: unweighted mean of the last row."""
    A = _validated(R)
    return float(A[-1].mean())


def mft(R: Matrix) -> float:
    """Mean fine-tune accuracy: mean of the diagonal (each task just after training it)."""
    A = _validated(R)
    return float(np.diag(A).mean())


def maa(R: Matrix) -> float:
    """Mean average accuracy: mean over steps t of the mean accuracy on tasks seen so far."""
    A = _validated(R)
    return float(np.mean([A[t, : t + 1].mean() for t in range(A.shape[0])]))


def bwt(R: Matrix) -> float | None:
    """Backward transfer: mean final-minus-just-trained on earlier tasks; None if T == 1."""
    A = _validated(R)
    T = A.shape[0]
    if T == 1:
        return None
    return float(np.mean([A[-1, i] - A[i, i] for i in range(T - 1)]))


def fwt(R: Matrix, base: Sequence[float | None] | None) -> float | None:
    """Forward transfer vs. the base model's zero-shot accuracy; None if it cannot be computed.

    Needs R[i-1][i] (task i evaluated before it is trained), which only a benchmark stream gives,
    so an open-ended stream (NaN upper triangle) yields None rather than an error.
    """
    A = _validated(R)
    T = A.shape[0]
    if base is None or T == 1:
        return None
    if len(base) != T:
        raise ValueError(f"base has {len(base)} entries but R covers {T} tasks")
    terms = []
    for i in range(1, T):
        if not math.isfinite(A[i - 1, i]):
            return None
        b = base[i]
        if b is None or not math.isfinite(float(b)):
            raise ValueError(f"base zero-shot accuracy for task {i} is missing; FWT needs it")
        terms.append(A[i - 1, i] - float(b))
    return float(np.mean(terms))


def forgetting(R: Matrix) -> float | None:
    """Forgetting: mean drop from each earlier task's best accuracy to final; None if T == 1."""
    A = _validated(R)
    T = A.shape[0]
    if T == 1:
        return None
    # The best is taken before the last step (l < T), so a task improved by later training counts
    # from its peak, not from the diagonal.
    return float(np.mean([A[i : T - 1, i].max() - A[-1, i] for i in range(T - 1)]))


def summarize(
    R: Matrix, sizes: Sequence[int], base: Sequence[float | None] | None = None
) -> dict[str, float | None]:
    """All metrics of docs/ARCHITECTURE.md as a JSON-safe dict keyed by METRIC_KEYS."""
    return {
        "faa": faa(R, sizes),
        "mfn": mfn(R),
        "mft": mft(R),
        "maa": maa(R),
        "bwt": bwt(R),
        "fwt": fwt(R, base),
        "forgetting": forgetting(R),
    }
