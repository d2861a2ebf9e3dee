"""A small read-only HTTP view of the lineage database (mounted in Airflow by the plugin)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from fastapi import FastAPI, HTTPException
from sqlalchemy import Engine, text

from lgt_ops.config import settings_from_env
from lgt_ops.db.engine import make_engine

_RELEASES = """
SELECT r.release_id, r.name, r.version, r.uri, r.content_sha256, r.simulated, r.counts,
       r.parent_release_id, r.created_at, (p.name IS NOT NULL) AS latest
FROM releases r LEFT JOIN release_pointers p ON p.release_id = r.release_id
WHERE r.status = 'published'
ORDER BY r.created_at DESC, r.release_id DESC
"""
_RELEASE = "SELECT * FROM releases WHERE name = :n AND version = :v AND status = 'published'"
_SPLITS = """
SELECT split, COUNT(*) AS n, COUNT(DISTINCT image_id) AS images
FROM release_members WHERE release_id = :r GROUP BY split ORDER BY split
"""


@cache
def _engine() -> Engine:
    return make_engine(settings_from_env().database_url)


def create_app(engine: Engine | None = None) -> FastAPI:
    app = FastAPI(title="LGT-ETL releases", docs_url=None, redoc_url=None)

    def db() -> Engine:
        return engine or _engine()

    @app.get("/releases")
    def releases() -> list[dict[str, Any]]:
        with db().connect() as conn:
            rows = conn.execute(text(_RELEASES)).mappings().all()
        return [
            {
                **dict(r),
                "counts": json.loads(r["counts"]),
                "simulated": bool(r["simulated"]),
                "latest": bool(r["latest"]),
                "created_at": str(r["created_at"]),
            }
            for r in rows
        ]

    @app.get("/releases/{name}/{version}")
    def release(name: str, version: str) -> dict[str, Any]:
        with db().connect() as conn:
            row = (
                conn.execute(
                    text(_RELEASE),
                    {"n": name, "v": version},
                )
                .mappings()
                .first()
            )
            if row is None:
                raise HTTPException(
                    status_code=404, detail=f"no published release {name}/{version}"
                )
            splits = (
                conn.execute(
                    text(_SPLITS),
                    {"r": row["release_id"]},
                )
                .mappings()
                .all()
            )
        return {
            **{k: str(v) if k == "created_at" else v for k, v in row.items()},
            "counts": json.loads(row["counts"]),
            "simulated": bool(row["simulated"]),
            "splits": [dict(s) for s in splits],
        }

    return app
