"""Image metadata that arrives with the images: JSONL manifests and COCO detection files.

Under a source prefix every `*.jsonl` file is a manifest (one object per line:
`{"key", "caption", "objects": [{"id", "label", "box"}], "box_format", ...}`) and every
`*.json` file with `images` and `annotations` is a COCO detection file. Keys are relative to
the folder of the file that names them. Problems are returned with a reason, never raised,
so one bad line costs one line.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, BinaryIO

from lgt_ops.boxes import BOX_FORMATS
from lgt_ops.config import IngestLimits
from lgt_ops.reasons import IngestReason as R
from lgt_ops.reasons import Rejected

METADATA_SUFFIXES = (".jsonl", ".json")


def is_metadata(key: str) -> bool:
    return key.lower().endswith(METADATA_SUFFIXES)


@dataclass
class Metadata:
    """What the metadata files say about one image key."""

    key: str
    caption: str | None = None
    objects: list[dict[str, Any]] | None = None
    box_format: str = "xyxy"
    objects_source: str | None = None  # manifest | coco
    origin: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "objects": self.objects,
            "box_format": self.box_format,
            "objects_source": self.objects_source,
            "origin": self.origin,
            "extra": self.extra,
        }


def _resolve(meta_key: str, rel: str) -> str | None:
    """The key `rel` names, relative to the metadata file's folder; None if it leaves it
    (or holds control characters, which no key of ours has)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return None
    base = posixpath.dirname(meta_key)
    full = posixpath.normpath(posixpath.join(base, rel.lstrip("/")))
    inside = not base or full.startswith(base + "/")
    return full if inside and not full.startswith("..") and full != "." else None


class _Dropped:
    """A line longer than the limit, read past and not kept: only its length is known."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _lines(data: bytes | BinaryIO, limit: int = 0) -> Iterator[tuple[int, bytes]]:
    """Numbered lines of a JSONL file, split on LF only (JSON strings may hold U+2028).
    A stream is read a chunk at a time, and a line over `limit` bytes is yielded as a
    `_Dropped` (its length only), so memory is a chunk and a line, not the file."""
    chunks = iter([data]) if isinstance(data, bytes) else iter(lambda: data.read(1 << 20), b"")
    buf, lineno, dropped, first = b"", 0, -1, True
    for chunk in chain(chunks, [b""]):  # b"": the end, so a short file is split too
        buf += chunk
        if first and len(buf) < 3 and chunk:
            continue
        if first and buf.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            buf = buf[3:]
        first, start = False, 0
        while (end := buf.find(b"\n", start)) >= 0:
            lineno += 1
            yield lineno, _line(buf[start:end], dropped)
            start, dropped = end + 1, -1
        buf = buf[start:]
        kept = len(buf.rstrip(b"\r")) if limit else 0
        if limit and (dropped >= 0 or kept > limit):  # a line too long to keep: count it
            dropped = max(dropped, 0) + kept
            buf = buf[kept:]  # its trailing CRs, which the line's length leaves out
    yield lineno + 1, _line(buf, dropped)


def _line(raw: bytes, dropped: int) -> bytes:
    if dropped < 0:
        return raw.rstrip(b"\r")
    return _Dropped(dropped + len(raw.rstrip(b"\r")))  # type: ignore[return-value]


def parse_jsonl(
    meta_key: str, data: bytes, limits: IngestLimits | None = None
) -> tuple[list[Metadata], list[Rejected]]:
    """One Metadata per good line; each bad line costs that line only."""
    out: list[Metadata] = []
    problems: list[Rejected] = []
    for entries, found in jsonl_pages(meta_key, data, limits):
        out += entries
        problems += found
    return out, problems


def jsonl_pages(
    meta_key: str, data: bytes | BinaryIO, limits: IngestLimits | None = None, page: int = 2_000
) -> Iterator[tuple[list[Metadata], list[Rejected]]]:
    """parse_jsonl a page of lines at a time (`data` may be a stream, read as it goes), so a
    long manifest is held neither parsed nor whole."""
    limits = limits or IngestLimits()
    out: list[Metadata] = []
    problems: list[Rejected] = []
    for lineno, raw in _lines(data, limits.max_manifest_line_bytes):
        ref = f"{meta_key}:{lineno}"
        if len(raw) > limits.max_manifest_line_bytes:  # checked before parsing it
            detail = f"{len(raw)} bytes > limit {limits.max_manifest_line_bytes}"
            problems.append(Rejected.at(ref, R.MANIFEST_LINE_TOO_LONG, detail))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Rejected.at(ref, R.MANIFEST_NOT_UTF8, str(exc)))
            continue
        if not line.strip():
            continue
        meta, found = _parse_line(meta_key, ref, line, limits)
        problems += found
        if meta is not None:
            out.append(meta)
        if len(out) >= page:
            yield out, problems
            out, problems = [], []
    yield out, problems


def _parse_line(
    meta_key: str, ref: str, line: str, limits: IngestLimits
) -> tuple[Metadata | None, list[Rejected]]:
    problems: list[Rejected] = []
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, [Rejected.at(ref, R.MANIFEST_MALFORMED, f"not JSON: {exc}"[:300])]
    if not isinstance(row, dict) or not isinstance(row.get("key"), str) or not row["key"]:
        return None, [Rejected.at(ref, R.MANIFEST_MALFORMED, "a line needs a string 'key'")]
    key = _resolve(meta_key, row["key"])
    if key is None:
        detail = f"key {row['key']!r} escapes the prefix or holds control characters"
        return None, [Rejected.at(ref, R.MANIFEST_BAD_KEY, detail[:300])]
    caption = row.get("caption")
    objects = row.get("objects")
    fmt = row.get("box_format", "xyxy")
    if caption is not None and not isinstance(caption, str):
        problems.append(Rejected.at(ref, R.MANIFEST_MALFORMED, "'caption' must be a string"))
        caption = None
    if caption is not None and len(caption) > limits.max_caption_chars:
        detail = f"{len(caption)} characters > limit {limits.max_caption_chars}"
        problems.append(Rejected.at(ref, R.CAPTION_TOO_LONG, detail))
        caption = None
    if objects is not None and not isinstance(objects, list):
        problems.append(Rejected.at(ref, R.MANIFEST_MALFORMED, "'objects' must be a list"))
        objects = None
    objects = _capped(ref, objects, limits, problems)
    if not isinstance(fmt, str) or fmt not in BOX_FORMATS:
        problems.append(Rejected.at(ref, R.BOX_FORMAT_UNKNOWN, f"box_format {fmt!r}"[:200]))
        objects, fmt = None, "xyxy"
    extra = {k: v for k, v in row.items() if k not in ("key", "caption", "objects", "box_format")}
    meta = Metadata(
        key=key,
        caption=caption.strip() if caption and caption.strip() else None,
        objects=objects,
        box_format=fmt,
        objects_source="manifest" if objects is not None else None,
        origin={"manifest": ref},
        extra=extra,
    )
    return meta, problems


def _capped(
    ref: str, objects: list[Any] | None, limits: IngestLimits, problems: list[Rejected]
) -> list[Any] | None:
    """The objects, or None when there are more than the cap (a prefix would be arbitrary)."""
    if objects is not None and len(objects) > limits.max_objects_per_image:
        detail = f"{len(objects)} objects > limit {limits.max_objects_per_image}"
        problems.append(Rejected.at(ref, R.TOO_MANY_OBJECTS, detail))
        return None
    return objects


def _hashable_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def parse_coco(
    meta_key: str, data: bytes, limits: IngestLimits | None = None
) -> tuple[list[Metadata], list[Rejected]]:
    """Objects per image from a COCO detection file; bad entries cost that entry only."""
    limits = limits or IngestLimits()
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return [], [Rejected.at(meta_key, R.COCO_MALFORMED, f"not JSON: {exc}"[:300])]
    if not isinstance(doc, dict) or not {"images", "annotations"} <= doc.keys():
        return [], [Rejected.at(meta_key, R.COCO_MALFORMED, "needs 'images' and 'annotations'")]
    categories = doc.get("categories", [])
    if not all(isinstance(doc[k], list) for k in ("images", "annotations")) or not isinstance(
        categories, list
    ):
        detail = "'images', 'annotations' and 'categories' must be lists"
        return [], [Rejected.at(meta_key, R.COCO_MALFORMED, detail)]
    cats = {
        c.get("id"): c.get("name")
        for c in categories
        if isinstance(c, dict) and _hashable_id(c.get("id")) and isinstance(c.get("name"), str)
    }
    by_image: dict[Any, Metadata] = {}
    problems: list[Rejected] = []
    for img in doc["images"]:
        ok = isinstance(img, dict) and _hashable_id(img.get("id"))
        name = img.get("file_name") if ok else None
        key = _resolve(meta_key, name) if isinstance(name, str) and name else None
        if key is None:
            problems.append(
                Rejected.at(meta_key, R.COCO_MALFORMED, f"bad image entry {img!r}"[:200])
            )
            continue
        by_image[img["id"]] = Metadata(
            key=key, objects=[], box_format="xywh", objects_source="coco", origin={"coco": meta_key}
        )
    for ann in doc["annotations"]:
        ok = isinstance(ann, dict) and _hashable_id(ann.get("image_id"))
        meta = by_image.get(ann["image_id"]) if ok else None
        if meta is None:
            problems.append(
                Rejected.at(
                    meta_key, R.COCO_MALFORMED, f"annotation for unknown image {ann!r}"[:200]
                )
            )
            continue
        cat = ann.get("category_id")
        label = cats.get(cat) if _hashable_id(cat) else None
        if not label:
            problems.append(
                Rejected.at(f"{meta_key}#{ann.get('id')}", R.COCO_MALFORMED, "unknown category_id")
            )
            continue
        assert meta.objects is not None
        meta.objects.append({"id": f"c{ann.get('id')}", "label": label, "box": ann.get("bbox")})
    for meta in by_image.values():
        meta.objects = _capped(f"{meta_key}#{meta.key}", meta.objects, limits, problems)
        if meta.objects is None:
            meta.objects_source = None
    return list(by_image.values()), problems


def parse(
    meta_key: str, data: bytes, limits: IngestLimits | None = None
) -> tuple[list[Metadata], list[Rejected]]:
    if meta_key.lower().endswith(".jsonl"):
        return parse_jsonl(meta_key, data, limits)
    return parse_coco(meta_key, data, limits)


def parse_pages(
    meta_key: str, data: bytes | BinaryIO, limits: IngestLimits | None = None
) -> Iterator[tuple[list[Metadata], list[Rejected]]]:
    """`parse` in pages of entries: a JSONL manifest read as a stream, a page of lines at a
    time; a COCO file read whole (one JSON document), one page."""
    if meta_key.lower().endswith(".jsonl"):
        yield from jsonl_pages(meta_key, data, limits)
    else:
        yield parse_coco(meta_key, data if isinstance(data, bytes) else data.read(), limits)


def merge(parsed: list[Metadata]) -> tuple[dict[str, Metadata], list[Rejected]]:
    """One Metadata per key: the manifest's caption and objects, COCO objects as a fallback.

    `parsed` is in metadata-file key order, so the first file to describe a key wins and a
    later duplicate is reported.
    """
    merged: dict[str, Metadata] = {}
    problems: list[Rejected] = []
    for meta in parsed:
        have = merged.get(meta.key)
        if have is None:
            merged[meta.key] = meta
            continue
        if "manifest" in meta.origin and "manifest" in have.origin:
            problems.append(
                Rejected.at(
                    meta.origin["manifest"],
                    R.MANIFEST_DUPLICATE_KEY,
                    f"{meta.key} already described at {have.origin['manifest']}",
                )
            )
            continue
        if have.caption is None and meta.caption is not None:
            have.caption = meta.caption
        if have.objects is None and meta.objects is not None:
            have.objects, have.box_format = meta.objects, meta.box_format
            have.objects_source = meta.objects_source
        have.origin.update(meta.origin)
        for k, v in meta.extra.items():
            have.extra.setdefault(k, v)
    return merged, problems
