"""A reporter for `train_task` in tests: the loop hands over a temporary checkpoint directory that is
gone once the report returns, so this keeps a copy (or installs it) and records every report."""

from __future__ import annotations

import shutil
from pathlib import Path

from strata.train.checkpoint import ADAPTER
from strata.train.driver import install


class Collector:
    """Records (metrics, kept checkpoint copy or None) per report; optionally installs checkpoints."""

    def __init__(self, keep: Path | None = None, install_to: Path | None = None) -> None:
        self.reports: list[tuple[dict, Path | None]] = []
        self.keep, self.install_to = keep, install_to

    def __call__(self, metrics: dict, ckpt: Path | None) -> None:
        saved = None
        if ckpt is not None:
            if self.keep is not None:
                saved = self.keep / f"report{len(self.reports)}"
                shutil.copytree(ckpt, saved)
            if self.install_to is not None and (ckpt / ADAPTER).is_dir():
                install(ckpt / ADAPTER, self.install_to)
        self.reports.append((dict(metrics), saved))
