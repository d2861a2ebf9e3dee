"""Content-addressed identity: canonical JSON, hashes and shard buckets."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# One encoder for every id: json.dumps with these options builds a new one per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return _CANONICAL.encode(obj)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def content_id(kind: str, *parts: Any) -> str:
    """Id of an item from its kind and the canonical JSON of its defining parts."""
    return sha256_hex(canonical_json([kind, *parts]))


def fingerprint(obj: Any) -> str:
    """Short, stable hash of a configuration object (stage fingerprints)."""
    return sha256_hex(canonical_json(obj))[:16]


def hbucket(image_id: str) -> int:
    """A stable integer in [0, 2**31) from an image id; shards are ranges of it."""
    return int(image_id[:8], 16) & 0x7FFFFFFF


def seeded_unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from arbitrary parts (used for seeded choices)."""
    return int(sha256_hex(canonical_json(list(parts)))[:13], 16) / float(1 << 52)
