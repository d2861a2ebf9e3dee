"""The request engine's counters: attempts, outcomes, failure classes, tokens, latencies."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

_LATENCY_SAMPLES = 4096


@dataclass
class EngineStats:
    sent: int = 0  # HTTP attempts
    fresh: int = 0  # outcomes from the endpoint
    cache_hits: int = 0  # outcomes from the ledger
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # failure class -> occurrences
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    _seen: int = 0

    def add_latency(self, ms: float) -> None:
        # Reservoir sample: percentiles without keeping every latency.
        self._seen += 1
        if len(self.latencies_ms) < _LATENCY_SAMPLES:
            self.latencies_ms.append(ms)
        else:
            j = random.randrange(self._seen)
            if j < _LATENCY_SAMPLES:
                self.latencies_ms[j] = ms

    def percentile(self, p: float) -> float | None:
        if not self.latencies_ms:
            return None
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(p / 100 * len(data)))]
