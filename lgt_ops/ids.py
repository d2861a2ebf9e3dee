"""Content-addressed identity: canonical JSON, hashes and shard buckets."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

# One encoder for every id: json.dumps with these options builds a new one per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# What JSON escapes in a string (with ensure_ascii=False): the quote, the backslash, controls.
_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return _CANONICAL.encode(obj)


def _plain_strings_json(parts: tuple[str, ...]) -> str | None:
    """canonical_json(list(parts)) written directly when every part is a string that needs
    no escape (most ids: hex digests, names), else None."""
    if not all(type(p) is str for p in parts):
        return None
    body = '","'.join(parts)
    return None if _ESCAPED.search(body) else f'["{body}"]'


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def content_id(kind: str, *parts: Any) -> str:
    """Id of an item from its kind and the canonical JSON of its defining parts."""
    everything = (kind, *parts)
    text = _plain_strings_json(everything)
    return sha256_hex(canonical_json(list(everything)) if text is None else text)


def fingerprint(obj: Any) -> str:
    """Short, stable hash of a configuration object (stage fingerprints)."""
    return sha256_hex(canonical_json(obj))[:16]


def hbucket(image_id: str) -> int:
    """A stable integer in [0, 2**31) from an image id; shards are ranges of it."""
    return int(image_id[:8], 16) & 0x7FFFFFFF


def seeded_unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from arbitrary parts (used for seeded choices)."""
    return int(sha256_hex(canonical_json(list(parts)))[:13], 16) / float(1 << 52)
