"""Which adapters are hot: a sliding window of the ingress's requests, and the replicas' latest reports.

Serve's multiplexer sends a model id to the replicas that already hold it, so a hot adapter would
stay pinned to one replica while the others idle (ray-project/ray#48741). Strata's replicas mix
adapters in one forward, so any replica can answer any adapter once it has loaded it: the ingress
sends a hot adapter's requests without a multiplexed id (Serve then picks the less loaded of two
replicas), and every replica preloads and keeps what is hot. Cold adapters keep their multiplexed
id and go where they are resident. See docs/ARCHITECTURE.md, "The life of a request".
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class Traffic:
    """Requests per adapter key (`<stream>/<adapter>` or a pinned `...@vN`) over the last `window_s`."""

    window_s: float = 10.0
    share: float = 0.25  # an adapter with at least this share of the window's requests is hot ...
    minimum: int = 8  # ... once it has at least this many in the window
    seen: deque[tuple[float, str]] = field(default_factory=deque)
    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, now: float | None = None) -> bool:
        """Count one request for `key`; whether `key` is hot now."""
        now = time.monotonic() if now is None else now
        self.seen.append((now, key))
        self.counts[key] += 1
        self._expire(now)
        return self.is_hot(key)

    def is_hot(self, key: str) -> bool:
        """Whether `key` has its share of the window's requests."""
        return self.counts[key] >= max(self.minimum, self.share * len(self.seen))

    def hot(self, now: float | None = None) -> list[str]:
        """Every hot key, busiest first."""
        self._expire(time.monotonic() if now is None else now)
        return [k for k, _ in self.counts.most_common() if self.is_hot(k)]

    def _expire(self, now: float) -> None:
        while self.seen and self.seen[0][0] < now - self.window_s:
            _, key = self.seen.popleft()
            self.counts[key] -= 1
            if not self.counts[key]:
                del self.counts[key]


@dataclass
class Reports:
    """Each replica's latest counters, as its heartbeat sent them; a silent replica drops out."""

    stale_s: float = 10.0
    latest: dict[str, tuple[float, dict]] = field(default_factory=dict)

    def put(self, replica: str, stats: dict, now: float | None = None) -> None:
        """Record a replica's counters."""
        self.latest[replica] = (time.monotonic() if now is None else now, stats)

    def view(self, now: float | None = None) -> dict:
        """Per live replica (with the report's age) and summed over them."""
        now = time.monotonic() if now is None else now
        live = {r: (t, s) for r, (t, s) in self.latest.items() if now - t <= self.stale_s}
        self.latest = live
        return {"replicas": {r: {**s, "age_s": round(now - t, 3)} for r, (t, s) in sorted(live.items())},
                "total": total([s for _, s in live.values()])}


def total(reports: list[dict]) -> dict:
    """Counters summed over replicas: per-adapter counts add up, lists are joined, numbers add up."""
    out: dict = {}
    for stats in reports:
        for key, value in stats.items():
            if isinstance(value, dict):
                into = out.setdefault(key, Counter())
                into.update(value)
            elif isinstance(value, list):
                out.setdefault(key, []).extend(value)
            elif isinstance(value, (int, float)):
                out[key] = out.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}
