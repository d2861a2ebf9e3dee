"""Deterministic Parquet parts with Hugging Face `datasets` feature metadata.

Same rows in the same order give the same bytes (pinned pyarrow, fixed compression, no
timestamps), which is what makes "publishing the same inputs twice gives the same content
hashes" true. The schema carries the `huggingface` metadata key that `datasets` writes
itself, so image columns load as `Image` features without glue code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TEXT_PART = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(TEXT_PART))])
MESSAGES = pa.list_(MESSAGE)
_DICTIONARY_BYTES = 64 << 20


def _feature(dtype: pa.DataType, image: bool) -> dict[str, Any]:
    if image and dtype == IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(dtype):
        return {"feature": _feature(dtype.value_type, image), "_type": "List"}
    if pa.types.is_struct(dtype):
        return {f.name: _feature(f.type, image) for f in dtype}
    names = {
        pa.string(): "string",
        pa.int64(): "int64",
        pa.int32(): "int32",
        pa.float64(): "float64",
        pa.float32(): "float32",
        pa.bool_(): "bool",
        pa.binary(): "binary",
    }
    return {"dtype": names[dtype], "_type": "Value"}


def with_hf_features(schema: pa.Schema, image_columns: Iterable[str]) -> pa.Schema:
    images = set(image_columns)
    features = {f.name: _feature(f.type, f.name in images) for f in schema}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return schema.with_metadata(meta)


@dataclass(frozen=True)
class Part:
    path: str  # relative to the release root
    rows: int
    sha256: str
    bytes: int
    data: bytes


def encode_part(rows: list[dict[str, Any]], schema: pa.Schema, path: str) -> Part:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=3,
        use_dictionary=True,
        write_statistics=True,
        row_group_size=10_000,
        # an embedded image repeats in every row about it: a dictionary this large keeps one
        # copy per part and row group even for multi-megabyte images (default: 1 MiB)
        dictionary_pagesize_limit=_DICTIONARY_BYTES,
    )
    data = buf.getvalue()
    return Part(path, len(rows), hashlib.sha256(data).hexdigest(), len(data), data)


@contextmanager
def system_pool() -> Iterator[None]:
    """Arrow allocates on the C heap meanwhile (a release's parts written or read back).

    Arrow's default pool (mimalloc) keeps the pages of the tables and buffers it freed, and
    what it keeps grows with the part sizes, i.e. with the corpus at a fixed bucket count: the
    release step's peak RSS grew by 14 MB from 5,000 to 20,000 images, and by 4 MB on the C
    heap (bench/refresh_memory.py --release). An explicit ARROW_DEFAULT_MEMORY_POOL wins."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)
