"""What a release contains: the current outputs for a run's image set, streamed in chunks.

"Current" means produced under the stage fingerprints of the present configuration from
the images' present annotations; older outputs stay in the lineage DB but are not released.
Images are visited in image_id order, in chunks, so a release of any size is written with
memory bounded by the chunk and the Parquet part size.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import Connection, text

from lgt_ops import registry
from lgt_ops.annotations import ImageContext, current
from lgt_ops.db.repo import select_in
from lgt_ops.env import StageEnv
from lgt_ops.release.errors import ReleaseError
from lgt_ops.sources import SourceSpec, image_locations
from lgt_ops.storage import LocalStore

CHUNK = 500
_READ_THREADS = 8  # image reads are store round trips, not work


@dataclass
class ImageChunk:
    rows: list[Any]
    contexts: dict[str, ImageContext]
    locations: dict[str, tuple[str, str]]
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # image_id -> HF value

    def image(self, env: StageEnv, image_id: str) -> dict[str, Any]:
        """The image's HF `Image` value, read once per chunk (every split shares it)."""
        value = self.images.get(image_id)
        if value is None:
            embed = env.settings.method.embed_images
            value = image_value(env, image_id, self.locations[image_id], embed)
            self.images[image_id] = value
        return value

    def load_images(self, env: StageEnv) -> None:
        """Read the chunk's images from the store in parallel (embedded releases)."""
        if not env.settings.method.embed_images:
            return
        todo = [i for i in self.image_ids if i not in self.images and i in self.locations]
        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            for image_id, value in zip(
                todo,
                pool.map(lambda i: image_value(env, i, self.locations[i], True), todo),
                strict=True,
            ):
                self.images[image_id] = value

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.rows]


def iter_chunks(env: StageEnv, spec: SourceSpec, sample_size: int | None) -> Iterator[ImageChunk]:
    """The run's images in image_id order, `CHUNK` at a time, with their context (the image
    set read a page at a time)."""
    from lgt_ops.sources import iter_image_set

    with env.db.connect() as conn:
        yield from chunks_of(env, iter_image_set(conn, spec, sample_size))


def chunks_of(env: StageEnv, image_rows: Iterable[Any]) -> Iterator[ImageChunk]:
    """These images (rows of `image_set`), `CHUNK` at a time, with their context."""
    stream = iter(image_rows)
    while rows := list(islice(stream, CHUNK)):
        with env.db.connect() as conn:
            contexts = current(conn, rows, registry.stage_fingerprint("annotate", env.settings))
            locations = image_locations(conn, [r.image_id for r in rows])
        yield ImageChunk(rows, contexts, locations)


def image_value(
    env: StageEnv, image_id: str, location: tuple[str, str], embed: bool
) -> dict[str, Any]:
    """The HF `Image` value of an image.

    Embedded (the default): its bytes, checked against its content id, and a path naming the
    content only (`<image_id>.<ext>`), so the release loads anywhere and its content hash does
    not depend on where the store lives. By reference: a path or URI into the store, which a
    loader must be able to reach (and which the content hash then covers)."""
    store = env.store_for(location[0])
    if embed:
        data = store.get(location[1])
        if hashlib.sha256(data).hexdigest() != image_id:
            raise ReleaseError(
                f"image {image_id} at {store.uri(location[1])}: its bytes changed since ingest"
                " (content id mismatch); run the pipeline again to ingest the new version"
            )
        ext = posixpath.splitext(location[1])[1].lower()
        return {"bytes": data, "path": f"{image_id}{ext}"}
    if isinstance(store, LocalStore):
        path = str(store.local_path(location[1]))
    else:
        path = store.uri(location[1])
    return {"bytes": None, "path": path}


def served_models(conn: Connection, request_keys: list[str]) -> set[str]:
    rows = select_in(
        conn,
        "SELECT DISTINCT served_model FROM model_requests WHERE request_key IN :ids",
        sorted(set(request_keys)),
    )
    return {r[0] for r in rows if r[0]}


def rejection_counts(
    conn: Connection, image_ids: list[str], fingerprints: dict[str, str]
) -> dict[str, dict[str, int]]:
    rows = select_in(
        conn,
        "SELECT stage, fingerprint, reason, COUNT(*) AS n FROM rejections"
        " WHERE image_id IN :ids GROUP BY stage, fingerprint, reason",
        image_ids,
    )
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        if fingerprints.get(r.stage) == r.fingerprint:
            out.setdefault(r.stage, {})
            out[r.stage][r.reason] = out[r.stage].get(r.reason, 0) + r.n
    return out


def rejections_by_image(
    conn: Connection, image_ids: list[str], fingerprints: dict[str, str]
) -> dict[str, dict[str, dict[str, int]]]:
    """image_id -> stage -> reason -> rejections under the current fingerprints."""
    rows = select_in(
        conn,
        "SELECT image_id, stage, fingerprint, reason, COUNT(*) AS n FROM rejections"
        " WHERE image_id IN :ids GROUP BY image_id, stage, fingerprint, reason",
        image_ids,
    )
    out: dict[str, dict[str, dict[str, int]]] = {}
    for r in rows:
        if fingerprints.get(r.stage) == r.fingerprint:
            reasons = out.setdefault(r.image_id, {}).setdefault(r.stage, {})
            reasons[r.reason] = reasons.get(r.reason, 0) + r.n
    return out


def source_rejection_counts(conn: Connection, spec: SourceSpec, fp: str) -> dict[str, int]:
    rows = conn.execute(
        text(
            "SELECT reason, COUNT(*) FROM rejections WHERE stage = 'ingest' AND fingerprint = :fp"
            " AND image_id IS NULL AND item_ref LIKE :like ESCAPE '\\' GROUP BY reason"
        ),
        {"fp": fp, "like": spec.like},
    ).all()
    return {r[0]: r[1] for r in rows}
