"""Heat-map of the accuracy matrix R, written once per run next to R and the metrics."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

# Runs are headless (Ray workers, CI); pick Agg before pyplot can choose an interactive backend.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from strata.eval.metrics import Matrix, to_array  # noqa: E402


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

        # Write beside the target and rename, so a reader never sees a half-written PNG.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=120)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
