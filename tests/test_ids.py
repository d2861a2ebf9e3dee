"""Content ids are the sha256 of one canonical JSON text, however it is written: the direct
path for plain strings must give the bytes json.dumps gives (ids are stored and compared
across versions; a changed byte would re-do every stage)."""

from __future__ import annotations

import hashlib
import json
import random

from lgt_ops.ids import _direct_json, canonical_json, content_id

_CHARS = 'abcXYZ09 _-:/."\\\n\t\x00\x1f\x7f\u00e9\u2028\u2029\U0001f600'
_PLAIN = "abcdef0123456789_-:"  # what most id parts are made of: the direct path's case


def _reference(kind: str, *parts: object) -> str:
    text = json.dumps([kind, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _part(rng: random.Random) -> object:
    pick = rng.random()
    if pick < 0.7:
        chars = rng.choice((_PLAIN, _CHARS))
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, 12)))
    if pick < 0.77:
        return rng.randint(-5, 5)
    if pick < 0.8:
        return None
    if pick < 0.85:
        return [_part(rng) for _ in range(rng.randint(0, 3))]
    if pick < 0.9:  # a list of ids
        chars = rng.choice((_PLAIN, _CHARS))
        return ["".join(rng.choice(chars) for _ in range(rng.randint(0, 4))) for _ in range(3)]
    return {"b": _part(rng), "a": None}


def test_content_ids_are_the_sha256_of_the_canonical_json():
    rng = random.Random(5)
    for _ in range(20_000):
        parts = [_part(rng) for _ in range(rng.randint(0, 5))]
        assert content_id("kind", *parts) == _reference("kind", *parts), parts
    assert content_id("rejection", "a" * 64, "ok") == _reference("rejection", "a" * 64, "ok")
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'


def test_the_direct_path_writes_the_common_id_parts():
    """Strings, None and lists of strings are written without the encoder; the rest is not."""
    parts = ("rejection", "a" * 64, None, ["b" * 64, "c" * 64], [])
    assert _direct_json(parts) == json.dumps(list(parts), separators=(",", ":"))
    assert _direct_json(("x", 'say "no"')) is None  # needs an escape
    assert _direct_json(("x", ["y", 'a"b'])) is None
    assert _direct_json(("x", ["y", 1])) is None
    assert _direct_json(("x", 1)) is None
