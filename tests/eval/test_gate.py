"""The gate's decision and the KL drift it uses, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from strata.config import GateConfig
from strata.eval.drift import mean_kl
from strata.eval.gate import decide, kl_threshold


def test_a_good_candidate_passes_and_every_check_can_fail_it() -> None:
    cfg = GateConfig(floor=20.0, forgetting_ceiling=5.0, kl_threshold=0.5)
    ok = decide(cfg, "shape", {"colour": 88.0, "shape": 60.0}, {"colour": 90.0}, served_on_new=30.0, kl=0.2,
                threshold=0.5)
    assert ok.passed and ok.reasons == [] and ok.drops == {"colour": 2.0} and ok.floor == 30.0
    bad = decide(cfg, "shape", {"colour": 80.0, "shape": 25.0}, {"colour": 90.0}, served_on_new=30.0, kl=0.9,
                 threshold=0.5)
    assert not bad.passed and len(bad.reasons) == 3
    assert "new task 'shape': val accuracy 25.0 is below its floor 30.0" in bad.reasons[0]
    assert "old task 'colour': val accuracy fell 10.0 points (90.0 -> 80.0)" in bad.reasons[1]
    assert "mean KL(anchor || candidate) 0.900 nats/token is above 0.500" in bad.reasons[2]
    assert decide(cfg, "shape", {"shape": 19.0}, {}, 0.0, None, 0.5).reasons[0].startswith("new task 'shape'")


def test_the_kl_threshold_is_fixed_or_calibrated_from_the_first_tasks() -> None:
    assert kl_threshold(GateConfig(kl_threshold=0.7), [5.0]) == 0.7
    cal = GateConfig(calibrate_kl=True, calibration_tasks=2, calibration_factor=3.0)
    assert kl_threshold(cal, []) is None and kl_threshold(cal, [0.1]) is None  # still calibrating: no KL check
    assert kl_threshold(cal, [0.1, 0.2, 9.0]) == pytest.approx(0.6)  # only the first tasks set it
    verdict = decide(cal, "t", {"t": 50.0}, {}, 0.0, kl=9.0, threshold=None)
    assert verdict.passed and verdict.kl_threshold is None


def test_mean_kl_matches_a_hand_computation() -> None:
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert mean_kl([p.log()], [q.log()]) == pytest.approx(want, abs=1e-6)
    assert mean_kl([p[:1].log(), p[1:].log()], [p[:1].log(), p[1:].log()]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same answer tokens"):
        mean_kl([p.log()], [q[:1].log()])


def test_bad_gate_settings_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="gate.mode must be one of"):
        GateConfig(mode="strict")
    with pytest.raises(ValueError, match="gate.forgetting_ceiling must be >= 0"):
        GateConfig(forgetting_ceiling=-1)
    with pytest.raises(ValueError, match=r"gate.floor must be a percentage"):
        GateConfig(floor=150)
