"""Bad input over both stores: every broken key, file, manifest line, box and link gets its own
verdict and reason, nothing hangs or fails the prefix, and the good images beside them go in.

The same inputs are written to the local directory store and to the S3 HTTP API (moto); the
kinds that only exist on one of them (S3 folder markers and `//` keys; symlinks, FIFOs,
sockets and non-UTF-8 file names on a local disk) are added for that store only. Both run on
Postgres, which (unlike SQLite) refuses NUL characters, so a stray one would fail a commit.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text

from lgt_ops.reasons import IngestReason as R
from lgt_ops.stages import ingest
from lgt_ops.storage import S3Store
from tests.conftest import make_settings
from tests.samples import SAMPLE, jpeg, png

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

P = "sources/bad/"
OK, REJECTED, SKIPPED = "ok", "rejected", "skipped"
# Small caps, so the oversized inputs stay small and the test fast.
LIMITS = {
    "LGT_INGEST_MAX_CAPTION_CHARS": "1000",
    "LGT_INGEST_MAX_OBJECTS": "20",
    "LGT_INGEST_MAX_LINE_BYTES": "20000",
    "LGT_INGEST_MAX_FILE_BYTES": "400000",
    "LGT_INGEST_PIXEL_BUDGET": "200000",  # several images wait for each other's decode
}
MAX_PIXELS = 4_000_000


@dataclass
class Case:
    """What we put in, and what ingest must say about each reference."""

    expect: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # key -> (object ids kept, caption kept?) for images whose metadata is partly rejected
    kept: dict[str, tuple[list[str], bool]] = field(default_factory=dict)

    def add(self, ref: str, verdict: str, reason: str | None = None) -> None:
        self.expect[ref] = (verdict, reason)


def _corrupt_webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 200)).save(buf, "WEBP")
    data = bytearray(buf.getvalue())
    data[40:80] = b"\x00" * 40  # the frame's bitstream, after an intact header
    return bytes(data)


def _manifest(rows: list[Any]) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


def _common_inputs(store: Any) -> Case:
    """Inputs every store can hold: files, manifests, COCO, boxes."""
    c = Case()
    good = (SAMPLE / "images" / "coffee.jpg").read_bytes()
    for n in range(3):
        store.put(f"{P}good/g{n}.jpg", jpeg(40 + n, 30))
        c.add(f"{P}good/g{n}.jpg", OK)
    store.put(f"{P}files/truncated.jpg", good[: len(good) // 2])
    c.add(f"{P}files/truncated.jpg", REJECTED, R.TRUNCATED)
    store.put(f"{P}files/corrupt.webp", _corrupt_webp())
    c.add(f"{P}files/corrupt.webp", REJECTED, R.CORRUPT)
    store.put(f"{P}files/empty.jpg", b"")
    c.add(f"{P}files/empty.jpg", REJECTED, R.EMPTY_FILE)
    store.put(f"{P}files/notes.png", b"a text file named .png\n")
    c.add(f"{P}files/notes.png", REJECTED, R.NOT_AN_IMAGE)
    store.put(f"{P}files/bomb.png", png(2500, 2000, mode="1"))  # 5 MP > 4 MP, a tiny file
    c.add(f"{P}files/bomb.png", REJECTED, R.TOO_MANY_PIXELS)
    store.put(f"{P}files/big.jpg", os.urandom(450_000))  # over the file cap: never downloaded
    c.add(f"{P}files/big.jpg", REJECTED, R.FILE_TOO_LARGE)
    store.put(f"{P}files/.DS_Store", b"\x00\x00\x00\x01Bud1")
    c.add(f"{P}files/.DS_Store", SKIPPED, R.HIDDEN_KEY)
    store.put(f"{P}.thumbs/g0.jpg", jpeg(8, 8))  # an image, but in a hidden folder
    c.add(f"{P}.thumbs/g0.jpg", SKIPPED, R.HIDDEN_KEY)

    # One manifest with a line per kind of metadata problem, around good images.
    for name in ("boxes", "caps", "many", "alias", "nul"):
        store.put(f"{P}meta/{name}.jpg", jpeg(32, 32, (10, 20 * len(name), 30)))
        c.add(f"{P}meta/{name}.jpg", OK)
    objects = [
        {"id": "ok", "label": "cup", "box": [1, 1, 10, 5]},
        {"id": "nan", "label": "cup", "box": [1, 1, float("nan"), 5]},
        {"id": "inf", "label": "cup", "box": [1, 1, float("inf"), 5]},
        {"id": "str", "label": "cup", "box": [1, "1", 10, 5]},
        {"id": "bool", "label": "cup", "box": [True, 1, 10, 5]},
        {"id": "three", "label": "cup", "box": [1, 1, 10]},
        {"id": "none", "label": "cup"},
        {"id": "out", "label": "cup", "box": [1, 1, 400, 5]},
        {"id": "flat", "label": "cup", "box": [5, 5, 5, 9]},
        {"id": "nolabel", "box": [1, 1, 10, 5]},
        {"id": "ok", "label": "cup", "box": [2, 2, 10, 5]},  # same id again
    ]
    for o in objects[1:]:
        reason = {
            "out": R.BOX_OUTSIDE_IMAGE,
            "flat": R.BOX_EMPTY,
            "nolabel": R.OBJECT_LABEL_MISSING,
            "ok": R.DUPLICATE_OBJECT_ID,
        }.get(o["id"], R.BOX_MALFORMED)
        c.add(f"{P}meta/boxes.jpg#{o['id']}", REJECTED, reason)
    c.kept[f"{P}meta/boxes.jpg"] = (["ok"], False)
    rows: list[Any] = [
        {"key": "boxes.jpg", "objects": objects},
        {"key": "caps.jpg", "caption": "x" * 5000},
        {"key": "many.jpg", "objects": [{"label": "a", "box": [0, 0, 1, 1]}] * 21},
        {
            "key": "alias.jpg",
            "caption": "Two boxes.",
            "objects": [
                {"id": "a", "label": "cup", "bbox": [1, 1, 10, 5]},
                {"id": "b", "label": "cup", "bbox": [1, 1, "wide", 5]},
            ],
        },
        {"key": "nul.jpg", "caption": "a caption with a NUL \u0000 in it"},
        {"key": "ghost.jpg", "caption": "nobody uploaded this"},
        {"key": "../escape.jpg", "caption": "outside"},
        {"key": "ctl\u0001.jpg", "caption": "a control character in the key"},
        {"key": "unknownfmt.jpg", "box_format": "yxyx", "objects": []},
        b"{broken json",
        {"key": "g.jpg", "caption": "x", "pad": "y" * 30_000},
        {"key": "boxes.jpg", "caption": "described twice"},
    ]
    store.put(f"{P}meta/manifest.jsonl", _manifest(rows))
    m = f"{P}meta/manifest.jsonl"
    c.add(f"{m}:2", REJECTED, R.CAPTION_TOO_LONG)
    c.kept[f"{P}meta/caps.jpg"] = ([], False)
    c.add(f"{m}:3", REJECTED, R.TOO_MANY_OBJECTS)
    c.kept[f"{P}meta/many.jpg"] = ([], False)
    c.add(f"{P}meta/alias.jpg#b", REJECTED, R.BOX_MALFORMED)
    c.kept[f"{P}meta/alias.jpg"] = (["a"], True)
    c.kept[f"{P}meta/nul.jpg"] = ([], True)
    c.add(f"{P}meta/ghost.jpg", REJECTED, R.MISSING_OBJECT)
    c.add(f"{m}:7", REJECTED, R.MANIFEST_BAD_KEY)
    c.add(f"{m}:8", REJECTED, R.MANIFEST_BAD_KEY)
    c.add(f"{m}:9", REJECTED, R.BOX_FORMAT_UNKNOWN)
    c.add(f"{P}meta/unknownfmt.jpg", REJECTED, R.MISSING_OBJECT)
    c.add(f"{m}:10", REJECTED, R.MANIFEST_MALFORMED)
    c.add(f"{m}:11", REJECTED, R.MANIFEST_LINE_TOO_LONG)
    c.add(f"{m}:12", REJECTED, R.MANIFEST_DUPLICATE_KEY)

    # A manifest with one line that is not UTF-8: only that line is lost.
    store.put(f"{P}latin/l.jpg", jpeg(20, 20, (1, 2, 3)))
    c.add(f"{P}latin/l.jpg", OK)
    c.kept[f"{P}latin/l.jpg"] = ([], True)
    latin = _manifest(
        [
            '{"key": "l.jpg", "caption": "café"}'.encode("latin-1"),
            {"key": "l.jpg", "caption": "A café, in UTF-8."},
        ]
    )
    store.put(f"{P}latin/manifest.jsonl", latin)
    c.add(f"{P}latin/manifest.jsonl:1", REJECTED, R.MANIFEST_NOT_UTF8)

    # COCO: a good file whose bbox errors name 'bbox', and two malformed ones.
    store.put(f"{P}coco/c.jpg", jpeg(50, 40, (90, 90, 9)))
    c.add(f"{P}coco/c.jpg", OK)
    coco = {
        "images": [{"id": 1, "file_name": "c.jpg"}, {"id": [2], "file_name": "x.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 20, 10]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [1, 1, None, 10]},
            {"id": 3, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]},
        ],
        "categories": [{"id": 7, "name": "lamp"}],
    }
    store.put(f"{P}coco/instances.json", json.dumps(coco).encode())
    c.add(f"{P}coco/c.jpg#c2", REJECTED, R.BOX_MALFORMED)
    c.add(f"{P}coco/instances.json#3", REJECTED, R.COCO_MALFORMED)
    c.add(f"{P}coco/instances.json", REJECTED, R.COCO_MALFORMED)  # the image with id [2]
    c.kept[f"{P}coco/c.jpg"] = (["c1"], False)
    store.put(f"{P}coco/broken.json", json.dumps({"images": {}, "annotations": 3}).encode())
    c.add(f"{P}coco/broken.json", REJECTED, R.COCO_MALFORMED)
    store.put(f"{P}coco/notjson.json", b"\xff\xfe not json")
    c.add(f"{P}coco/notjson.json", REJECTED, R.COCO_MALFORMED)
    return c


def _s3_only(store: S3Store, c: Case) -> None:
    """Keys only S3 can hold, written around the store's key checks."""
    client, bucket = store._client, store.bucket
    root = f"{store.root}/" if store.root else ""
    for key, body in (
        (f"{P}folder/", b""),  # what the AWS console's "Create folder" makes
        (f"{P}good/", b""),
        (f"{P}a//b.jpg", jpeg(10, 10)),
        (f"{P}dot/./c.jpg", jpeg(10, 10)),
        (f"{P}dir-with-body/", b"not empty"),
    ):
        client.put_object(Bucket=bucket, Key=root + key, Body=body)
    c.add(f"{P}folder/", SKIPPED, R.FOLDER_MARKER)
    c.add(f"{P}good/", SKIPPED, R.FOLDER_MARKER)
    c.add(f"{P}a//b.jpg", REJECTED, R.INVALID_KEY)
    c.add(f"{P}dot/./c.jpg", REJECTED, R.INVALID_KEY)
    c.add(f"{P}dir-with-body/", REJECTED, R.INVALID_KEY)


def _local_only(root: Path, outside: Path, c: Case) -> None:
    """What only a local disk can hold: links, loops, FIFOs, sockets, raw file names."""
    d = root / P / "fs"
    d.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0\n")
    (outside / "photo.jpg").write_bytes(jpeg(30, 30, (5, 5, 5)))
    (root / P / "good" / "inner.jpg").write_bytes(jpeg(33, 33, (7, 7, 7)))
    c.add(f"{P}good/inner.jpg", OK)
    os.symlink("loop-b.jpg", d / "loop-a.jpg")
    os.symlink("loop-a.jpg", d / "loop-b.jpg")
    c.add(f"{P}fs/loop-a.jpg", REJECTED, R.SYMLINK_LOOP)
    c.add(f"{P}fs/loop-b.jpg", REJECTED, R.SYMLINK_LOOP)
    os.symlink("self", d / "self")  # a loop named like a folder
    c.add(f"{P}fs/self", REJECTED, R.SYMLINK_LOOP)
    os.mkfifo(d / "pipe.png")  # opening it would block forever
    c.add(f"{P}fs/pipe.png", REJECTED, R.SPECIAL_FILE)
    here = os.getcwd()
    os.chdir(d)  # a relative bind: the full path may exceed AF_UNIX's 108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("s.png")
    finally:
        os.chdir(here)
    c.add(f"{P}fs/s.png", REJECTED, R.SPECIAL_FILE)
    os.symlink("pipe.png", d / "to-pipe.jpg")  # a link inside the root to a FIFO
    c.add(f"{P}fs/to-pipe.jpg", REJECTED, R.SPECIAL_FILE)
    try:  # a character device (/dev/null's numbers); creating one needs CAP_MKNOD
        os.mknod(d / "null.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        c.add(f"{P}fs/null.jpg", REJECTED, R.SPECIAL_FILE)
    except PermissionError:
        pass
    os.symlink(outside / "secret.txt", d / "passwd.png")
    c.add(f"{P}fs/passwd.png", REJECTED, R.LINK_OUTSIDE_ROOT)
    os.symlink(outside / "photo.jpg", d / "outside.jpg")
    c.add(f"{P}fs/outside.jpg", REJECTED, R.LINK_OUTSIDE_ROOT)
    os.symlink(outside, d / "outside-dir")
    c.add(f"{P}fs/outside-dir", REJECTED, R.LINK_OUTSIDE_ROOT)
    os.symlink("../" * 40 + "etc/passwd", d / "dotdot.jpg")
    c.add(f"{P}fs/dotdot.jpg", REJECTED, R.LINK_OUTSIDE_ROOT)
    os.symlink("gone.jpg", d / "dangling.jpg")
    c.add(f"{P}fs/dangling.jpg", REJECTED, R.BROKEN_LINK)
    os.symlink("../good/g0.jpg", d / "alias-of-g0.jpg")  # inside the root: followed
    c.add(f"{P}fs/alias-of-g0.jpg", OK)
    os.symlink("../good", d / "good-again")  # its files are listed where they are
    c.add(f"{P}fs/good-again", SKIPPED, R.LINKED_DIRECTORY)
    os.close(os.open(os.fsencode(d) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    c.add(f"{P}fs/caf\\xe9.jpg", REJECTED, R.INVALID_KEY)  # recorded printable


@pytest.fixture(params=["local", "s3"])
def bad_env(request, tmp_path, pg_url, s3_url, s3_endpoint):
    from lgt_ops.runctx import new_cli_run
    from lgt_ops.stages.base import StageEnv

    if request.param == "local":
        settings = make_settings(pg_url, (tmp_path / "store").as_uri())
    else:
        settings = make_settings(pg_url, s3_url, None, s3_endpoint)
    from lgt_ops.config import ingest_limits_from_env

    settings = settings.model_copy(update={"ingest": ingest_limits_from_env(LIMITS)})
    settings = settings.with_method(max_image_pixels=MAX_PIXELS)
    env = StageEnv.open(settings, new_cli_run("test"))
    env.show_progress = False
    env.store.ensure_bucket()
    return request.param, env, tmp_path


def _verdicts(env: Any, scan: ingest.ScanResult) -> dict[str, tuple[str, set[str]]]:
    with env.db.connect() as conn:
        rej = conn.execute(text("SELECT item_ref, reason FROM rejections")).all()
        src = conn.execute(text("SELECT key, status, reason FROM sources")).all()
    out: dict[str, tuple[str, set[str]]] = {}
    for key, status, reason in src:
        out[key] = (status, {reason} if reason else set())
    for ref, reason in rej:
        status, reasons = out.get(ref, (REJECTED, set()))
        out[ref] = (status, reasons | {reason})
    for key, reason in scan.skipped_keys.items():
        assert key not in out, f"{key} skipped and recorded"
        out[key] = (SKIPPED, {reason})
    return out


def _kept(env: Any, key: str) -> tuple[list[str], bool]:
    with env.db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT o.content AS objects, c.content AS caption FROM sources s"
                " LEFT JOIN annotations o ON o.annotation_id = s.objects_annotation_id"
                " LEFT JOIN annotations c ON c.annotation_id = s.caption_annotation_id"
                " WHERE s.key = :k"
            ),
            {"k": key},
        ).one()
    ids = [o["id"] for o in json.loads(row.objects)["objects"]] if row.objects else []
    return ids, row.caption is not None


@pytest.mark.timeout(240)
def test_every_bad_input_gets_its_verdict_and_the_good_ones_go_in(bad_env):
    kind, env, tmp_path = bad_env
    case = _common_inputs(env.store)
    if kind == "s3":
        _s3_only(env.store, case)
    else:
        _local_only(env.store.root, tmp_path / "outside", case)
    assert len({r for _v, r in case.expect.values() if r}) >= 24  # kinds of broken input

    scan, stats = ingest.ingest_all(env, P)

    got = _verdicts(env, scan)
    wrong = {
        ref: (want, got.get(ref))
        for ref, want in case.expect.items()
        if got.get(ref) is None
        or got[ref][0] != want[0]
        or (want[1] is not None and want[1] not in got[ref][1])
        or (want[1] is None and got[ref][1])
    }
    assert not wrong, wrong
    unexpected = set(got) - set(case.expect)
    assert not unexpected, {k: got[k] for k in unexpected}
    for key, (ids, caption) in case.kept.items():
        assert _kept(env, key) == (ids, caption), key
    ok = sorted(k for k, (v, _r) in case.expect.items() if v == OK)
    with env.db.connect() as conn:
        n_ok = conn.execute(text("SELECT COUNT(*) FROM sources WHERE status = 'ok'")).scalar()
        detail = conn.execute(
            text("SELECT detail FROM rejections WHERE item_ref = :r"), {"r": f"{P}meta/alias.jpg#b"}
        ).scalar_one()
    assert n_ok == len(ok) == stats.items_out
    assert "'bbox'" in detail  # the error names the field the box came under

    # A re-run converges: nothing pending, the same rejections, no error.
    again, stats2 = ingest.ingest_all(env, P)
    assert again.pending == 0 and stats2.items_in == 0
    assert _verdicts(env, again) == got
