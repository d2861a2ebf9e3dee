"""The scan's working set on disk: the listed images, the merged metadata and the known rows.

A scan compares three sets that each grow with the corpus (the listing, the metadata files'
lines, the `sources` rows of the prefix). Held as Python objects they cost a few KB per image;
here they live in a temporary SQLite file, written in pages and read back by key order in
pages, so the scan's memory stays the size of a page whatever the corpus size.
Keys are stored as UTF-8 bytes (lone surrogates from a manifest passed through): byte order
is code point order, the order `sorted()` gives the keys.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from lgt_ops.db.repo import dumps
from lgt_ops.ids import sha256_hex
from lgt_ops.manifest import Metadata

PAGE = 2_000  # rows per insert or fetch

_SCHEMA = """
CREATE TABLE listed (key BLOB PRIMARY KEY, etag TEXT, size INTEGER) WITHOUT ROWID;
CREATE TABLE meta (key BLOB PRIMARY KEY, doc BLOB) WITHOUT ROWID;
CREATE TABLE known (key BLOB PRIMARY KEY, etag TEXT, sha TEXT, status TEXT) WITHOUT ROWID;
"""


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _s(key: bytes) -> str:
    return key.decode("utf-8", "surrogatepass")


def _doc(meta: Metadata) -> bytes:
    return dumps(meta.as_json()).encode("utf-8", "surrogatepass")


def _meta(key: str, doc: bytes) -> Metadata:
    return Metadata(key=key, **json.loads(doc.decode("utf-8", "surrogatepass")))


class ScanIndex:
    """One scan's listing, metadata and known source rows, in a temporary SQLite file."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="lgt-scan-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path)
        self.db.create_function("sha", 1, _sha, deterministic=True)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)

    def close(self) -> None:
        self.db.close()
        os.unlink(self.path)

    def __enter__(self) -> ScanIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listed(self, rows: Iterable[tuple[str, str, int]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO listed VALUES (?, ?, ?)", ((_b(k), e, s) for k, e, s in rows)
        )

    def add_known(self, rows: Iterable[tuple[str, Any, Any, Any]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO known VALUES (?, ?, ?, ?)", ((_b(r[0]), *r[1:]) for r in rows)
        )

    def described(self, keys: list[str]) -> dict[str, Metadata]:
        """The merged metadata held so far for these keys (one metadata file's worth)."""
        found: dict[str, Metadata] = {}
        for i in range(0, len(keys), 500):
            part = [_b(k) for k in keys[i : i + 500]]
            marks = ",".join("?" * len(part))
            sql = f"SELECT key, doc FROM meta WHERE key IN ({marks})"
            for key, doc in self.db.execute(sql, part):
                found[_s(key)] = _meta(_s(key), doc)
        return found

    def put_metadata(self, metas: Iterable[Metadata]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", ((_b(m.key), _doc(m)) for m in metas)
        )

    def images(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM listed").fetchone()[0]

    def unlisted_metadata(self) -> Iterator[Metadata]:
        """Metadata naming a key the listing has no image for, in key order."""
        yield from self._pages(
            "SELECT m.key, m.doc FROM meta m LEFT JOIN listed l ON l.key = m.key"
            " WHERE l.key IS NULL AND m.key > ? ORDER BY m.key",
            lambda r: _meta(_s(r[0]), r[1]),
        )

    def gone(self) -> Iterator[str]:
        """Known keys, not removed yet, that the listing no longer has."""
        yield from self._pages(
            "SELECT k.key FROM known k LEFT JOIN listed l ON l.key = k.key"
            " WHERE l.key IS NULL AND k.status IS NOT 'removed' AND k.key > ? ORDER BY k.key",
            lambda r: _s(r[0]),
        )

    _PENDING = (
        " FROM listed l LEFT JOIN meta m ON m.key = l.key LEFT JOIN known k ON k.key = l.key"
        " WHERE (k.key IS NULL OR k.status IS 'removed' OR k.etag IS NOT l.etag"
        " OR k.sha IS NOT sha(m.doc))"
    )

    def pending_count(self) -> int:
        return self.db.execute("SELECT COUNT(*)" + self._PENDING).fetchone()[0]

    def pending(self) -> Iterator[tuple[str, str, int, dict[str, Any] | None]]:
        """(key, etag, size, metadata as JSON) of the images new or changed, in key order."""
        sql = f"SELECT l.key, l.etag, l.size, m.doc{self._PENDING} AND l.key > ? ORDER BY l.key"
        yield from self._pages(
            sql,
            lambda r: (
                _s(r[0]),
                r[1],
                r[2],
                json.loads(r[3].decode("utf-8", "surrogatepass")) if r[3] is not None else None,
            ),
        )

    def _pages(self, sql: str, row: Any) -> Iterator[Any]:
        """Rows of a `key > ?` query, a page at a time (keyset pagination on the key)."""
        after = b""
        while True:
            page = self.db.execute(f"{sql} LIMIT {PAGE}", (after,)).fetchall()
            for r in page:
                yield row(r)
            if len(page) < PAGE:
                return
            after = page[-1][0]


def _sha(doc: bytes | None) -> str | None:
    """The metadata sha scan records on `sources` (None when no metadata file names the key)."""
    return sha256_hex(doc.decode("utf-8", "surrogatepass")) if doc is not None else None
