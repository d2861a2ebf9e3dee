"""Adaptive in-flight window for endpoints that queue rather than refuse (vLLM).

vLLM rarely answers 429: past its batch capacity it queues, so latency climbs while
throughput stays flat. The controller works in periods (at least `limit` completions and
0.2 s). Per period it compares the median latency with a baseline, and the throughput with
the previous period's:

The baseline is the lowest period median of the last minute.

- latency near the baseline: there is headroom, grow by 10% (by 50% until the first sign of
  congestion, like TCP's slow start);
- latency up but throughput up too (a GPU batching more): grow by one;
- latency up, throughput flat: the server is queueing, shrink by 10%.

Explicit overload answers (429/503) shrink the window by 30%, at most once per period and
only when they are a real share of the period's answers: a stray 429 is noise, a wall of
them is a server saying no. `adaptive=False` keeps the window fixed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class AdaptiveWindow:
    limit: float
    min_limit: int = 4
    max_limit: int = 4096
    adaptive: bool = True
    tolerance: float = 0.5  # latency may exceed the baseline by this share
    overload_share: float = 0.1  # overload answers above this share of a period shrink it
    min_period_s: float = 0.2
    history: list[tuple[float, float, float, float]] = field(default_factory=list)
    _latencies: list[float] = field(default_factory=list)
    _overloads: int = 0
    _period_start: float = field(default_factory=time.monotonic)
    baseline_memory_s: float = 60.0
    _recent_medians: deque = field(default_factory=deque)  # (time, period median)
    _prev_throughput: float = 0.0
    _slow_start: bool = True  # grow x1.5 per period until the first sign of congestion

    def __post_init__(self) -> None:
        self.limit = float(max(self.min_limit, min(self.max_limit, self.limit)))

    @property
    def size(self) -> int:
        return int(self.limit)

    @property
    def baseline(self) -> float | None:
        """Lowest period median of the last minute: long enough that a queue building up
        cannot become the new normal, short enough to follow a server that got slower."""
        horizon = time.monotonic() - self.baseline_memory_s
        while self._recent_medians and self._recent_medians[0][0] < horizon:
            self._recent_medians.popleft()
        return min(m for _, m in self._recent_medians) if self._recent_medians else None

    def on_success(self, latency_s: float) -> None:
        if self.adaptive:
            self._latencies.append(latency_s)
            self._maybe_adjust()

    def on_overload(self) -> None:
        if self.adaptive:
            self._overloads += 1
            self._maybe_adjust()

    def _maybe_adjust(self) -> None:
        answers = len(self._latencies) + self._overloads
        elapsed = time.monotonic() - self._period_start
        if answers >= max(16, int(self.limit)) and elapsed >= self.min_period_s:
            self._adjust(elapsed)

    def _adjust(self, elapsed: float) -> None:
        answers = len(self._latencies) + self._overloads
        if self._overloads / answers > self.overload_share:
            self.limit = max(self.min_limit, self.limit * 0.7)
            self._slow_start = False
        elif self._latencies:
            lat = sorted(self._latencies)[len(self._latencies) // 2]
            throughput = len(self._latencies) / elapsed
            base = self.baseline
            self._recent_medians.append((time.monotonic(), lat))
            if base is None or lat <= base * (1 + self.tolerance):
                grow = 1.5 if self._slow_start else 1.1
                self.limit = min(self.max_limit, self.limit * grow + 1)
            elif throughput > self._prev_throughput * 1.05:
                self.limit = min(self.max_limit, self.limit + 1)
            else:
                self.limit = max(self.min_limit, self.limit * 0.9)
                self._slow_start = False
            self._prev_throughput = throughput
        self.history.append(
            (round(time.monotonic(), 3), round(self.limit, 1), answers, self._overloads)
        )
        del self.history[:-200]
        self._latencies, self._overloads = [], 0
        self._period_start = time.monotonic()
