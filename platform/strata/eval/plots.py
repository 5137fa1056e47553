"""Plots written next to results: the accuracy-matrix heat-map and the gradient-conflict bars."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

# Runs are headless (Ray workers, CI); pick Agg before pyplot can choose an interactive backend.
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from strata.atomic import write_file
from strata.eval.metrics import Matrix, to_array


def plot_accuracy_matrix(
    R: Matrix, tasks: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Write R as an annotated heat-map PNG at `path` (atomically) and return the path."""
    A = to_array(R)
    T = A.shape[0]
    if len(tasks) != T:
        raise ValueError(f"got {len(tasks)} task names but R covers {T} tasks")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    side = max(4.0, 0.6 * T + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    try:
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # NaN (not evaluated) blank
        im = ax.imshow(np.ma.masked_invalid(A), cmap=cmap, vmin=0.0, vmax=100.0)
        fig.colorbar(im, ax=ax, label="accuracy (%)")
        ax.set_xticks(range(T), labels=list(tasks), rotation=45, ha="right")
        ax.set_yticks(range(T), labels=[f"after {name}" for name in tasks])
        ax.set_xlabel("task i")
        ax.set_ylabel("after task t")
        if title:
            ax.set_title(title)
        fontsize = 9 if T <= 10 else 6
        for t in range(T):
            for i in range(T):
                v = A[t, i]
                if np.isfinite(v):
                    # Dark text on the bright end of viridis, light text on the dark end.
                    color = "black" if v > 60.0 else "white"
                    ax.text(i, t, f"{v:.1f}", ha="center", va="center", color=color,
                            fontsize=fontsize)
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def save_figure(fig, path: Path) -> None:
    """Write `fig` as PNG beside `path` and rename, so a reader never sees a half-written file."""
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_conflict(report: dict, path: str | os.PathLike[str]) -> Path:
    """Bars of the mean cos(∇L_text, ∇L_image) per kind and parameter group, whiskers at min and max."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(f"{kind}/{group}", s) for kind in ("mode", "coupled") if kind in report
            for group, s in report[kind]["groups"].items()]
    if not rows:
        raise ValueError("not a probe report: no 'mode' or 'coupled' entry")
    mean = np.array([s["cos_mean"] for _, s in rows], dtype=float)
    low = mean - np.array([s["cos_min"] for _, s in rows], dtype=float)
    high = np.array([s["cos_max"] for _, s in rows], dtype=float) - mean
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2.0, 3.5))
    try:
        ax.bar(range(len(rows)), np.nan_to_num(mean), yerr=np.nan_to_num(np.stack([low, high])), capsize=4,
               color=["tab:blue" if name.startswith("mode") else "tab:orange" for name, _ in rows])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels=[name for name, _ in rows])
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("cos(∇L_text, ∇L_image)")
        ax.set_title("Gradient conflict per parameter tensor (mean, min-max)")
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_sweep(trials: list[dict], metric: str, path: str | os.PathLike[str]) -> Path:
    """One line per Tune trial: the metric after each task it learned (stopped trials end early)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for trial in trials:
        history = trial["history"]
        ax.plot(range(1, len(history) + 1), history, marker="o", label=trial["trial"][:20],
                linestyle="--" if trial["stopped_early"] else "-")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep: {metric} per trial (dashed: stopped early)")
    if trials:
        ax.legend(fontsize=6)
    save_figure(fig, Path(path))
    plt.close(fig)
    return Path(path)


def plot_drift(report: dict, path: str | os.PathLike[str]) -> Path:
    """Mean KL(reference ‖ version) per version, with the gate's threshold where a card recorded one."""
    rows = report["drift"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2.0), 3.5))
    try:
        colours = {"production": "tab:green", "rejected": "tab:red", "archived": "tab:gray"}
        ax.bar([f"v{r['version']}" for r in rows], [r["kl"] for r in rows],
               color=[colours.get(r["stage"], "tab:blue") for r in rows])
        limits = {r["kl_threshold"] for r in rows if r.get("kl_threshold") is not None}
        for limit in limits:
            ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_ylabel("mean KL (nats / answer token)")
        ax.set_title(f"{report['adapter']}: drift against {report['against']} "
                     f"({report['anchor_rows']} anchor rows)")
        fig.tight_layout()
        save_figure(fig, Path(path))
    finally:
        plt.close(fig)
    return Path(path)
