"""Adaptive in-flight window for endpoints that queue rather than refuse (vLLM).

vLLM rarely answers 429: past its batch capacity it queues, so latency climbs while
throughput stays flat. Every period the controller compares the period's median latency with
a slowly-forgetting minimum: while latency stays near that baseline the window grows; when
latency grows and throughput does not, it shrinks. An explicit overload (429/503) halves it.
A fixed window is the same object with `adaptive=False`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class AdaptiveWindow:
    limit: float
    min_limit: int = 4
    max_limit: int = 4096
    adaptive: bool = True
    tolerance: float = 0.6  # latency may exceed the baseline by this share before we worry
    _latencies: list[float] = field(default_factory=list)
    _period_start: float = field(default_factory=time.monotonic)
    _baseline: float | None = None
    _prev_throughput: float = 0.0
    history: list[tuple[float, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.limit = float(max(self.min_limit, min(self.max_limit, self.limit)))

    @property
    def size(self) -> int:
        return int(self.limit)

    def _period_len(self) -> int:
        return max(16, int(self.limit))

    def on_success(self, latency_s: float) -> None:
        if not self.adaptive:
            return
        self._latencies.append(latency_s)
        if len(self._latencies) >= self._period_len():
            self._adjust()

    def on_overload(self) -> None:
        if not self.adaptive:
            return
        self.limit = max(self.min_limit, self.limit * 0.5)
        self._reset_period()

    def _reset_period(self) -> None:
        self._latencies = []
        self._period_start = time.monotonic()

    def _adjust(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._period_start, 1e-6)
        lat = sorted(self._latencies)[len(self._latencies) // 2]
        throughput = len(self._latencies) / elapsed
        # Forget slowly, so a baseline measured under a lighter model still moves.
        base = lat if self._baseline is None else min(self._baseline * 1.02, lat)
        self._baseline = base
        if lat <= base * (1 + self.tolerance):
            self.limit = min(self.max_limit, self.limit + max(1.0, self.limit * 0.15))
        elif throughput <= self._prev_throughput * 1.05:
            self.limit = max(self.min_limit, self.limit * 0.9)
        else:
            self.limit = min(self.max_limit, self.limit + 1)
        self._prev_throughput = throughput
        self.history.append((round(now, 3), round(self.limit, 1), round(throughput, 1)))
        del self.history[:-200]
        self._reset_period()
