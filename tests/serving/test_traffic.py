"""Which adapters are hot, and the replicas' reports: a sliding window and summed counters."""

from __future__ import annotations

from strata.serving.traffic import Reports, Traffic, total


def test_an_adapter_is_hot_with_its_share_of_the_window_and_cools_when_traffic_moves() -> None:
    t = Traffic(window_s=10, share=0.25, minimum=8)
    for i in range(7):
        assert not t.add("s/a", now=i * 0.1)  # too few requests yet
    assert t.add("s/a", now=0.8) and t.hot(now=0.8) == ["s/a"]
    for i in range(40):  # traffic moves to b: a falls under 25% of the window, then out of it
        t.add("s/b", now=1 + i * 0.1)
    assert t.hot(now=5) == ["s/b"]
    assert t.hot(now=20) == [] and not t.counts  # the window emptied


def test_reports_drop_a_silent_replica_and_sum_the_live_ones() -> None:
    r = Reports(stale_s=3)
    r.put("x", {"requests": {"s/a@v1": 3}, "tokens": 10, "resident": ["s/a@v1"]}, now=0)
    r.put("y", {"requests": {"s/a@v1": 2, "s/b@v1": 1}, "tokens": 5, "resident": ["s/b@v1"]}, now=1)
    view = r.view(now=2)
    assert set(view["replicas"]) == {"x", "y"} and view["replicas"]["x"]["age_s"] == 2
    assert view["total"] == {"requests": {"s/a@v1": 5, "s/b@v1": 1}, "tokens": 15, "resident": ["s/a@v1", "s/b@v1"]}
    assert set(r.view(now=3.5)["replicas"]) == {"y"}  # x missed its beats
    assert total([]) == {}
