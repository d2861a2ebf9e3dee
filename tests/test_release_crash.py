"""A publisher SIGKILLed at any point: the re-run converges to the release an uninterrupted
publish makes, in the version the dead attempt claimed, and leaves nothing behind.

Publishers are real `lgt release publish` processes; LGT_TEST_KILL_AT=<point> makes one kill
itself with SIGKILL at a named point. Also: a live publisher's claim is never taken over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import text

from lgt_ops.release.manage import verify
from lgt_ops.release.publish import KILL_POINTS
from lgt_ops.release.recovery import publisher_lock
from tests.conftest import ROOT
from tests.test_release import _stage1


def _cli_env(env, **extra: str) -> dict[str, str]:
    out = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LGT_DATABASE_URL": env.settings.database_url,
        "LGT_STORE_URL": env.settings.store_url,
        "LGT_RELEASE_LOCK_WAIT_S": "10",  # a dead publisher's lock must be free at once
        **extra,
    }
    out.pop("LGT_TEST_KILL_AT", None)
    if env.settings.s3_endpoint_url:
        out["LGT_S3_ENDPOINT_URL"] = env.settings.s3_endpoint_url
    return {**out, **extra}


def _publish_cmd(name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lgt_ops.cli",
        "release",
        "publish",
        "--source",
        "sources/sample/",
        "--release-name",
        name,
        "--allow-simulated",
    ]


def _publish(env, name: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _publish_cmd(name), env=_cli_env(env, **extra), capture_output=True, text=True, timeout=300
    )


def _ok(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _rows(env, sql: str, **params) -> list:
    with env.db.connect() as conn:
        return conn.execute(text(sql), params).all()


def _staging(env, name: str) -> list:
    return _rows(env, "SELECT version FROM releases WHERE name = :n AND status = 'staging'", n=name)


def _assert_clean(env, name: str) -> None:
    """No staging row, no member of an unpublished release, no file of no published version."""
    assert _rows(env, "SELECT release_id FROM releases WHERE status <> 'published'") == []
    orphans = _rows(
        env,
        "SELECT COUNT(*) FROM release_members m JOIN releases r ON r.release_id = m.release_id"
        " WHERE r.status <> 'published'",
    )
    assert orphans[0][0] == 0
    unowned = _rows(  # member rows written by an attempt that never published
        env,
        "SELECT COUNT(*) FROM member_rows m JOIN releases r ON r.release_id = m.owner_release_id"
        " WHERE r.status <> 'published'",
    )
    assert unowned[0][0] == 0
    published = {v for (v,) in _rows(env, "SELECT version FROM releases WHERE name = :n", n=name)}
    for info in env.store.list(f"releases/{name}/"):
        top = info.key.split("/")[2]
        assert top in published or top == "latest.json", f"stray file {info.key}"
    for version in published:
        assert verify(env, f"{name}/{version}").ok  # every file listed, none extra


def _members(env, release_id: str) -> list:
    return _rows(
        env,
        "SELECT split, row_id FROM release_members WHERE release_id = :r ORDER BY split, row_id",
        r=release_id,
    )


@pytest.mark.parametrize(
    ("store", "points"),
    [
        pytest.param("pg_s3_env", KILL_POINTS, marks=[pytest.mark.postgres, pytest.mark.s3]),
        ("local_env", ("part_staged", "promoted", "committed")),
    ],
)
def test_a_publish_killed_anywhere_converges_on_rerun(store, points, request):
    env = request.getfixturevalue(store)
    _stage1(env)
    ref = _ok(_publish(env, "ref"))  # an uninterrupted publish
    ref_members = [(s, r) for s, r in _members(env, ref["release"])]
    name = "crash"
    for point in points:
        killed = _publish(env, name, LGT_TEST_KILL_AT=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout + killed.stderr)
        if point == "published":  # it had finished all but removing its staging files
            assert _staging(env, name) == []
            (claimed,) = _rows(
                env,
                "SELECT version FROM release_pointers p JOIN releases r"
                " ON r.release_id = p.release_id WHERE p.name = :n",
                n=name,
            )[0]
            staged = list(env.store.list(f"releases/{name}/.staging/"))
            body = env.store.get(f"releases/{name}/{claimed}/manifest.json")
            # an incremental publish stages only the parts it rewrites (maybe none)
            assert len(staged) == json.loads(body)["incremental"]["parts_written"]
        else:
            ((claimed,),) = _staging(env, name)  # the dead attempt's claim
        again = _ok(_publish(env, name))
        rid = f"{name}/{claimed}"
        if point == "published":
            assert again["release"] != rid  # that publish was complete: this is a new one
        else:
            assert again["release"] == rid, point  # the same version, not the next one
        for release_id in (rid, again["release"]):
            status = _rows(
                env,
                "SELECT status, content_sha256 FROM releases WHERE release_id = :r",
                r=release_id,
            )
            assert [tuple(s) for s in status] == [("published", ref["content_sha256"])], point
            assert _members(env, release_id) == ref_members, point
        assert again["content_sha256"] == ref["content_sha256"]
        if point != points[0]:  # a version exists already: the re-run reused all its parts
            assert again["parts"]["written"] == 0 and again["parts"]["reused"] > 0, point
        _assert_clean(env, name)
    versions = [v for (v,) in _rows(env, "SELECT version FROM releases WHERE name = :n", n=name)]
    # One version per kill, except the kill after publishing, whose re-run made another.
    assert len(versions) == len(points) + ("published" in points)


@pytest.mark.parametrize(
    "store", ["local_env", pytest.param("pg_s3_env", marks=[pytest.mark.postgres, pytest.mark.s3])]
)
def test_a_live_publishers_claim_is_not_taken(store, request):
    env = request.getfixturevalue(store)
    _stage1(env)
    with publisher_lock(env, "busy"):  # a live publisher of "busy", in this process
        blocked = _publish(env, "busy", LGT_RELEASE_LOCK_WAIT_S="1")
        other = _publish(env, "other")  # other names do not wait
    assert blocked.returncode == 3  # a release failure (README: exit codes)
    assert "being published by another live publisher" in blocked.stderr
    assert _rows(env, "SELECT release_id FROM releases WHERE name = 'busy'") == []
    assert _ok(other)["release"].startswith("other/")
    # Two publishers at once: one waits for the other; two versions, nothing left staging.
    procs = [
        subprocess.Popen(
            _publish_cmd("busy"),
            env=_cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out) for out, _ in outs]
    assert len({r["release"] for r in results}) == 2
    assert len({r["content_sha256"] for r in results}) == 1
    _assert_clean(env, "busy")
