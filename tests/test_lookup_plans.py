"""The lookups every stage's plan makes per shard read an index entry per id they ask for,
not every row near them: the skip list (`already_done`) whatever the planner statistics say
about the stage, and the model-made annotations without the manifest's."""

from __future__ import annotations

import re

from sqlalchemy import event, text

from lgt_ops.annotations import current_ids
from lgt_ops.db import make_engine, upgrade
from lgt_ops.stages.base import already_done


def _items(db, stage: str, n: int) -> None:  # noqa: ANN001
    with db.begin() as conn:
        conn.execute(text(
            "INSERT INTO stage_items (stage, fingerprint, item_id, status)"
            " SELECT :s, 'fp', md5(:s || k::text) || md5(k::text), 'done'"
            " FROM generate_series(1, :n) AS k"), {"s": stage, "n": n})


def _sent(db) -> list:  # noqa: ANN001
    """The (statement, parameters) the engine sends from now on."""
    sent: list = []
    event.listen(db, "before_cursor_execute",
                 lambda conn, cur, sql, params, *_: sent.append((sql, params)))
    return sent


def _explained(db, sql: str, params: dict) -> str:  # noqa: ANN001
    with db.connect() as conn:
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
    return re.sub(r"'\{[^}]*\}'", "'{...}'", plan)  # the ids themselves say nothing


def test_a_stage_with_no_statistics_yet_probes_its_items_by_id(pg_url):
    db = make_engine(pg_url)
    upgrade(db)
    _items(db, "mcq", 50_000)  # an earlier stage's rows, analyzed: this one has none yet
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE stage_items"))
    _items(db, "filter", 50_000)  # written since: the statistics still say none
    with db.connect() as conn:
        wanted = [r[0] for r in conn.execute(text(
            "SELECT item_id FROM stage_items WHERE stage = 'filter' ORDER BY item_id LIMIT 500"))]
    sent = _sent(db)
    with db.connect() as conn:
        done = already_done(conn, "filter", "fp", wanted + ["not-done"])
    assert done == set(wanted)
    [(sql, params)] = sent
    plan = _explained(db, sql, params)
    # the ids are the index condition (one probe each), not a filter over the stage's rows
    assert "Filter:" not in plan, plan
    assert "item_id = ANY" in plan.split("Index Cond:", 1)[1].splitlines()[0], plan


def test_sqlite_keeps_the_skip_list(sqlite_url):
    db = make_engine(sqlite_url)
    upgrade(db)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO stage_items (stage, fingerprint, item_id, status)"
                          " VALUES ('cot', 'fp', 'a', 'done'), ('cot', 'fp2', 'b', 'done')"))
        pk = {r[1]: r[5] for r in conn.execute(text("PRAGMA table_info(stage_items)"))}
    with db.connect() as conn:
        assert already_done(conn, "cot", "fp", ["a", "b"]) == {"a"}
    # the rebuilt table keeps its columns, keyed by the item first
    assert set(pk) == {"stage", "fingerprint", "item_id", "status", "outputs", "run_id",
                       "created_at"}
    assert sorted((v, k) for k, v in pk.items() if v) == [
        (1, "item_id"), (2, "stage"), (3, "fingerprint")]


def test_model_annotations_are_read_without_the_manifests(pg_url):
    db = make_engine(pg_url)
    upgrade(db)
    with db.begin() as conn:
        conn.execute(text(
            "INSERT INTO images (image_id, hbucket, width, height, format, mode, bytes)"
            " SELECT 'img' || k, k, 8, 8, 'JPEG', 'RGB', 100 FROM generate_series(1, 20000) k"))
        conn.execute(text(  # the manifest's caption and objects of every image
            "INSERT INTO annotations (annotation_id, image_id, kind, source, content, fingerprint)"
            " SELECT 'm' || kind || k, 'img' || k, kind, 'manifest', '{}', 'manifest'"
            " FROM generate_series(1, 20000) k, (VALUES ('caption'), ('objects')) AS v(kind)"))
        conn.execute(text(  # a model captioned one image in ten
            "INSERT INTO annotations (annotation_id, image_id, kind, source, content, fingerprint)"
            " SELECT 'a' || k, 'img' || k, 'caption', 'model', '{}', 'fp-annotate'"
            " FROM generate_series(10, 20000, 10) k"))
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    shard = [type("Row", (), {"image_id": f"img{k}"}) for k in range(1, 501)]
    sent = _sent(db)
    with db.connect() as conn:
        contexts = current_ids(conn, shard, "fp-annotate")
    captioned = {i for i, c in contexts.items() if c.caption_id}
    assert captioned == {f"img{k}" for k in range(10, 501, 10)}
    [(sql, params)] = [(q, p) for q, p in sent if "source = 'model'" in q]
    plan = _explained(db, sql, params)
    assert "annotations_model" in plan and "annotations_image" not in plan, plan
