"""The promotion gate (docs/ARCHITECTURE.md): a candidate is promoted only if it learned, did not forget, did not drift.

All three checks run on `val`, never on `test`, so the reported accuracy matrix stays unbiased.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from strata.config import GateConfig


@dataclass(frozen=True)
class Verdict:
    """The gate's decision with every number it looked at."""

    passed: bool
    reasons: list[str]
    floor: float  # the new task's bar: max(gate floor, served accuracy on it + min gain)
    drops: dict[str, float] = field(default_factory=dict)  # old task -> val points lost
    kl: float | None = None
    kl_threshold: float | None = None  # None while the threshold is still being calibrated

    def record(self) -> dict:
        """The verdict as plain JSON for the card and the coordinator."""
        return asdict(self)


def kl_threshold(cfg: GateConfig, calibration: list[float]) -> float | None:
    """The KL bound for this task: fixed, or factor x the largest drift of the first tasks (None until then)."""
    if not cfg.calibrate_kl:
        return cfg.kl_threshold
    if len(calibration) < cfg.calibration_tasks:
        return None
    return cfg.calibration_factor * max(calibration[: cfg.calibration_tasks])


def decide(cfg: GateConfig, task: str, val_now: dict[str, float], val_before: dict[str, float],
           served_on_new: float, kl: float | None, threshold: float | None) -> Verdict:
    """Check the candidate's val accuracies and drift against the state served before this task."""
    reasons = []
    floor = max(cfg.floor, served_on_new + cfg.min_gain)
    if val_now[task] < floor:
        reasons.append(f"new task {task!r}: val accuracy {val_now[task]:.1f} is below its floor {floor:.1f} "
                       f"(gate.floor {cfg.floor:.1f}; the served state scored {served_on_new:.1f})")
    drops = {t: before - val_now[t] for t, before in val_before.items()}
    for t, drop in drops.items():
        if drop > cfg.forgetting_ceiling:
            reasons.append(f"old task {t!r}: val accuracy fell {drop:.1f} points ({val_before[t]:.1f} -> "
                           f"{val_now[t]:.1f}), above the forgetting ceiling {cfg.forgetting_ceiling:.1f}")
    if kl is not None and threshold is not None and kl > threshold:
        reasons.append(f"anchor drift: mean KL(anchor || candidate) {kl:.3f} nats/token is above {threshold:.3f}")
    return Verdict(not reasons, reasons, floor, drops, kl, threshold)
