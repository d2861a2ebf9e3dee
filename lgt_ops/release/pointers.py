"""A release's place in the store and its publication mark (status, counts, `latest`).

Shared by publishing and by recovery (which finishes a publication a killed task left)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text

from lgt_ops.db.repo import dumps, upsert, utcnow
from lgt_ops.env import StageEnv
from lgt_ops.release import goodput, quality


def release_prefix(name: str, version: str) -> str:
    return f"releases/{name}/{version}"


def mark_published(
    env: StageEnv,
    release_id: str,
    name: str,
    manifest: dict[str, Any],
    manifest_sha: str,
    simulated: bool,
) -> None:
    pointer = {
        "release_id": release_id,
        "manifest": f"{manifest['version']}/manifest.json",
        "content_sha256": manifest["content_sha256"],
    }
    with env.db.begin() as conn:
        conn.execute(
            text(
                "UPDATE releases SET status = 'published', manifest_sha256 = :m,"
                " content_sha256 = :c, parent_release_id = :p, simulated = :s, counts = :n"
                " WHERE release_id = :r"
            ),
            {
                "m": manifest_sha,
                "c": manifest["content_sha256"],
                "p": manifest["parent_release"],
                "s": simulated,
                "n": dumps({k: v["rows"] for k, v in manifest["splits"].items()}),
                "r": release_id,
            },
        )
        goodput.record(conn, release_id, manifest)
        quality.record(conn, release_id, manifest)
        upsert(
            conn,
            "release_pointers",
            [{"name": name, "release_id": release_id, "updated_at": utcnow()}],
            ["name"],
            ["release_id", "updated_at"],
        )
    env.store.put(
        f"releases/{name}/latest.json", json.dumps(pointer, sort_keys=True).encode("utf-8")
    )
