"""A sweep's trials as they run: a Tune callback keeps `<sweep dir>/trials.json` up to date, and the
console reads it while the sweep goes on.

Tune's own experiment state holds the same facts, but in a format of Tune's making that changes
between releases and may embed pickled objects; this file is plain JSON that Strata writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune import Callback

from strata.atomic import write_text

FILE = "trials.json"
SHOWN = ("tasks", "faa", "bwt", "forgetting")  # what each trial's last report shows


class TrialStates(Callback):
    """Write every trial's status, config and last report after each step of the sweep that changed any."""

    def __init__(self, where: Path, tasks: int) -> None:
        self.path, self.tasks, self.last = Path(where) / FILE, tasks, None

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._write(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write(trials)

    def _write(self, trials: list) -> None:
        rows = [{"trial": t.trial_id, "status": t.status, "config": t.config,
                 **{k: (t.last_result or {}).get(k) for k in SHOWN}} for t in trials]
        snapshot = {"tasks": self.tasks, "trials": rows}
        if snapshot != self.last:  # the controller steps many times a second: write only changes
            write_text(self.path, json.dumps(snapshot, default=str))
            self.last = snapshot


def read_states(where: Path) -> dict | None:
    """The trials' states, with `state` in words ("stopped early" for one the scheduler ended); None before the first."""
    path = Path(where) / FILE
    if not path.is_file():
        return None
    snapshot = json.loads(path.read_text())
    for row in snapshot["trials"]:
        done = row.get("tasks") or 0
        row["state"] = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "failed"}.get(
            row["status"], "stopped early" if done < snapshot["tasks"] else "finished")
    return snapshot
