"""How wide a fan-out may be: Airflow refuses to map a task over more than
`[core] max_map_length` values (1024 by default), so every mapped list is capped and the
items per shard grow instead.

    shard size = max(configured shard size, ceil(items / cap))
    shards     = ceil(items / shard size)          (<= cap)

e.g. a first run over 10,000,000 new images with the default cap of 1024 writes 1,000 ingest
shard files of 10,000 keys each instead of 50,000 files of 200.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_MAP_LENGTH = 1024  # Airflow's default [core] max_map_length


@dataclass(frozen=True)
class FanOut:
    shards: int
    shard_size: int  # items per shard (the last one may hold fewer)


def fan_out(items: int, shard_size: int, cap: int, *, at_least_one: bool = False) -> FanOut:
    """Split `items` into shards of at least `shard_size`, never more than `cap` shards."""
    if shard_size < 1 or cap < 1:
        raise ValueError(f"shard_size ({shard_size}) and cap ({cap}) must be at least 1")
    if items <= 0:
        return FanOut(1 if at_least_one else 0, shard_size)
    size = max(shard_size, math.ceil(items / cap))
    return FanOut(math.ceil(items / size), size)
