"""Metrics against hand-computed accuracy matrices (0-indexed R[t][i], percent)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from strata.eval import metrics as m

NAN = float("nan")

# Open-ended stream: upper triangle not evaluated, with forgetting.
#   after task 0: [80,  -,  -]
#   after task 1: [60, 90,  -]
#   after task 2: [50, 70, 85]
FORGET = [[80, NAN, NAN], [60, 90, None], [50, 70, 85]]
FORGET_SIZES = [100, 200, 700]

# Benchmark stream: full matrix, so FWT is defined. Task 0 *improves* after task 1 (60 -> 70)
# before dropping, so forgetting (from the peak) differs from -BWT (from the diagonal).
FULL = np.array([[50.0, 40.0, 30.0], [70.0, 60.0, 45.0], [65.0, 58.0, 80.0]])
FULL_SIZES = [300, 100, 100]
FULL_BASE = [20.0, 35.0, 25.0]

# Perfect retention: every task keeps its just-trained accuracy.
KEEP = [[90, NAN, NAN], [90, 70, NAN], [90, 70, 60]]


def test_faa_is_sample_weighted():
    # FORGET: (50*100 + 70*200 + 85*700) / 1000 = (5000 + 14000 + 59500) / 1000 = 78.5
    assert m.faa(FORGET, FORGET_SIZES) == pytest.approx(78.5)
    # FULL: (65*300 + 58*100 + 80*100) / 500 = (19500 + 5800 + 8000) / 500 = 66.6
    assert m.faa(FULL, FULL_SIZES) == pytest.approx(66.6)
    # KEEP with sizes [1, 1, 2]: (90 + 70 + 2*60) / 4 = 70.0
    assert m.faa(KEEP, [1, 1, 2]) == pytest.approx(70.0)


def test_faa_differs_from_mfn_with_unequal_sizes_and_matches_with_equal():
    # MFN(FORGET) = 205/3 = 68.33 vs FAA 78.5: the big task 2 (85%) dominates the weighting.
    assert m.faa(FORGET, FORGET_SIZES) != pytest.approx(m.mfn(FORGET))
    assert m.faa(FORGET, [5, 5, 5]) == pytest.approx(m.mfn(FORGET))


def test_mfn():
    # FORGET: (50 + 70 + 85) / 3 = 205/3
    assert m.mfn(FORGET) == pytest.approx(205 / 3)
    # FULL: (65 + 58 + 80) / 3 = 203/3
    assert m.mfn(FULL) == pytest.approx(203 / 3)


def test_mft():
    # FORGET: (80 + 90 + 85) / 3 = 85.0
    assert m.mft(FORGET) == pytest.approx(85.0)
    # FULL: (50 + 60 + 80) / 3 = 190/3
    assert m.mft(FULL) == pytest.approx(190 / 3)


def test_maa():
    # FORGET: mean(80, (60+90)/2 = 75, 205/3) = (80 + 75 + 68.333) / 3 = 74.444
    assert m.maa(FORGET) == pytest.approx((80 + 75 + 205 / 3) / 3)
    # FULL (upper triangle ignored): mean(50, (70+60)/2 = 65, 203/3) = 60.889
    assert m.maa(FULL) == pytest.approx((50 + 65 + 203 / 3) / 3)
    # KEEP: mean(90, 80, 220/3) = 81.111
    assert m.maa(KEEP) == pytest.approx((90 + 80 + 220 / 3) / 3)


def test_bwt():
    # FORGET: ((50-80) + (70-90)) / 2 = -25
    assert m.bwt(FORGET) == pytest.approx(-25.0)
    # FULL: ((65-50) + (58-60)) / 2 = 6.5
    assert m.bwt(FULL) == pytest.approx(6.5)
    assert m.bwt(KEEP) == pytest.approx(0.0)


def test_forgetting():
    # FORGET: task 0 peak max(80, 60) = 80 -> 80-50 = 30; task 1 peak 90 -> 90-70 = 20; mean 25
    assert m.forgetting(FORGET) == pytest.approx(25.0)
    # FULL: task 0 peak max(50, 70) = 70 -> 70-65 = 5; task 1 peak 60 -> 60-58 = 2; mean 3.5
    assert m.forgetting(FULL) == pytest.approx(3.5)
    assert m.forgetting(KEEP) == pytest.approx(0.0)


def test_fwt():
    # FULL: task 1: R[0][1] - b1 = 40-35 = 5; task 2: R[1][2] - b2 = 45-25 = 20; mean 12.5
    assert m.fwt(FULL, FULL_BASE) == pytest.approx(12.5)
    # b_0 is never used, so it may be unknown.
    assert m.fwt(FULL, [None, 35.0, 25.0]) == pytest.approx(12.5)
    # A 2x2: R[0][1] - b1 = 30 - 40 = -10
    assert m.fwt([[70, 30], [60, 80]], [0, 40]) == pytest.approx(-10.0)


def test_fwt_none_without_base_or_open_ended():
    assert m.fwt(FULL, None) is None
    assert m.fwt(FORGET, [10, 10, 10]) is None  # NaN upper triangle: open-ended stream
    assert m.fwt([[50, 40, NAN], [60, 55, NAN], [60, 55, 70]], [0, 0, 0]) is None


def test_single_task():
    R = [[42.0]]
    assert m.faa(R, [10]) == m.mfn(R) == m.mft(R) == m.maa(R) == pytest.approx(42.0)
    assert m.bwt(R) is None
    assert m.forgetting(R) is None
    assert m.fwt(R, [10.0]) is None


def test_summarize_is_json_safe():
    out = m.summarize(FULL, FULL_SIZES, FULL_BASE)
    assert set(out) == set(m.METRIC_KEYS)
    assert out["faa"] == pytest.approx(66.6)
    assert out["fwt"] == pytest.approx(12.5)
    assert out["forgetting"] == pytest.approx(3.5)
    assert all(v is None or type(v) is float for v in out.values())
    json.dumps(out, allow_nan=False)

    single = m.summarize([[42.0]], [1])
    assert single["bwt"] is None and single["fwt"] is None and single["forgetting"] is None
    assert json.loads(json.dumps(single, allow_nan=False))["bwt"] is None


@pytest.mark.parametrize(
    ("R", "match"),
    [
        ([[1, 2, 3], [4, 5, 6]], "square"),
        ([[1, 2], [3]], "square"),
        (np.zeros((2, 3)), "square"),
        (np.zeros(3), "square"),
        ([], "empty"),
        ([[NAN, NAN], [50, 60]], "diagonal entry R\\[0\\]\\[0\\]"),
        ([[50, NAN], [None, 60]], "lower-triangle entry R\\[1\\]\\[0\\]"),
        ([[50, NAN], [40, 150]], "percent"),
        ([[50, NAN], [-1, 60]], "percent"),
        ([[50, NAN], ["x", 60]], "non-numeric"),
    ],
)
def test_invalid_matrix(R, match):
    with pytest.raises(ValueError, match=match):
        m.mfn(R)


def test_invalid_sizes_and_base():
    with pytest.raises(ValueError, match="sizes has 2 entries"):
        m.faa(FORGET, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        m.faa(FORGET, [1, -2, 3])
    with pytest.raises(ValueError, match="sum to zero"):
        m.faa(FORGET, [0, 0, 0])
    with pytest.raises(ValueError, match="base has 2 entries"):
        m.fwt(FULL, [1.0, 2.0])
    with pytest.raises(ValueError, match="task 2"):
        m.fwt(FULL, [1.0, 2.0, None])


def test_metrics_do_not_mutate_input():
    R = [row[:] for row in FORGET]
    m.summarize(R, FORGET_SIZES)
    assert R[0][0] == 80 and math.isnan(R[0][1]) and R[1][2] is None
