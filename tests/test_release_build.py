"""A rebuilt bucket encodes a split's part as soon as it holds `rows_per_file` rows
(lgt_ops.release.build), so an open bucket holds fewer rows than that per split; its parts,
their names and bytes are those encoding the bucket's rows all at once gives."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

from lgt_ops.release import build, incremental, splits
from lgt_ops.release.parquet import encode_part, system_pool

PER_FILE = 100


class _Split(splits.SplitBuilder):
    name = path = "rows"
    schema = pa.schema([("row_id", pa.string()), ("n", pa.int64())])


def _part(rows: list[dict[str, Any]], stem: str) -> tuple[str, int, str]:
    return stem, len(rows), encode_part(rows, _Split.schema, "").sha256


def _at_once(rows: list[dict[str, Any]], bucket: int) -> list[tuple[str, int, str]]:
    """The parts of encoding the bucket's rows at its end (the layout before streaming)."""
    return [
        _part(rows[i : i + PER_FILE], f"part-{bucket:05d}-{i // PER_FILE:02d}")
        for i in range(0, len(rows), PER_FILE)
    ]


@pytest.mark.parametrize("batches", [[37, 150, 1, 99, 64, 250], [100, 100, 100], [5], []])
def test_parts_streamed_as_rows_arrive_match_a_whole_bucket(batches: list[int]) -> None:
    env = SimpleNamespace(settings=SimpleNamespace(method=SimpleNamespace(rows_per_file=PER_FILE)))
    split = _Split()
    o = build._Open([split], incremental.BucketState("d", parts={"rows": []}), {"rows": []})
    made: list[tuple[str, int, str]] = []

    def add_part(b: Any, rows: list[dict[str, Any]], stem: str) -> dict[str, Any]:
        made.append(_part(rows, stem))
        return {"path": stem, "rows": len(rows)}

    every: list[dict[str, Any]] = []
    for size in batches:
        batch = [{"row_id": f"r{len(every) + k:05d}", "n": len(every) + k} for k in range(size)]
        every += batch
        o.rows["rows"] += batch
        build._flush(env, 7, o, add_part, final=False)  # type: ignore[arg-type]
        assert len(o.rows["rows"]) < PER_FILE  # full parts are written, not held
    state = build._close(env, 7, o, add_part)  # type: ignore[arg-type]
    assert made == _at_once(every, 7)
    assert [p["rows"] for p in state.parts["rows"]] == [n for _, n, _ in made]
    assert o.rows["rows"] == []


def test_the_release_pool_is_the_c_heap_and_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    before = pa.default_memory_pool().backend_name
    with system_pool():
        assert pa.default_memory_pool().backend_name == "system"
        table = pa.table({"n": list(range(1000))})  # allocated in the C heap
    assert pa.default_memory_pool().backend_name == before
    assert table.column("n")[999].as_py() == 999  # still readable after the switch back
