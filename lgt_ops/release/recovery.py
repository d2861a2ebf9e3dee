"""One publisher per release name at a time, and what it does with attempts that died.

The rule: a publisher of release name N holds N's publisher lock for its whole publish:
- PostgreSQL: a session-level advisory lock (`pg_advisory_lock`) on a connection kept open for
  the publish. The server drops it when the session ends, so a killed publisher (SIGKILL,
  lost host) releases it at once, and a live one can never have it taken away: there is no
  expiry to guess, unlike a lease.
- SQLite (embedded runs, one machine): an exclusive `flock` on `<database>.release-<N>.lock`,
  which the kernel drops when the process dies.
A second publisher of N waits for the lock (up to `wait_s`, then a clear error); publishers of
different names do not wait for each other.

Whoever holds the lock knows that every `staging` row of N belongs to a dead attempt, and
settles them before it claims a version:
- committed (its `manifest.json`, the commit point, is in the store): finished — row marked
  `published`, `latest` moved, staging files removed;
- not committed: removed — its files (staged and already promoted), its member sets and rows
  and its row; an auto-assigned version (`YYYYMMDD.N`) is handed back for reuse.
Stray files under `releases/N/.staging/` (a publisher killed after its commit, before its
clean-up) are removed too. Nothing is ever left `staging` by a finished publish.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from lgt_ops.env import StageEnv
from lgt_ops.release.errors import ReleaseError

LOCK_WAIT_S = 600.0  # default wait for a live publisher; LGT_RELEASE_LOCK_WAIT_S overrides
_POLL_S = 0.2
AUTO_VERSION = re.compile(r"^\d{8}\.\d+$")
_MEMORY_LOCKS: dict[str, threading.Lock] = {}


class ReleaseBusy(ReleaseError):
    """Another live publisher holds the release name: retrying later can succeed."""

    permanent = False


def lock_key(name: str) -> int:
    """A signed 63-bit advisory-lock key for release name `name`."""
    return int(hashlib.sha256(f"lgt-release:{name}".encode()).hexdigest()[:15], 16)


@contextmanager
def publisher_lock(env: StageEnv, name: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold release name `name` for one publish (see the module docstring for the rule)."""
    if wait_s is None:
        wait_s = float(os.environ.get("LGT_RELEASE_LOCK_WAIT_S") or LOCK_WAIT_S)
    if env.db.dialect.name == "postgresql":
        with _pg_lock(env, name, wait_s):
            yield
        return
    database = make_url(env.settings.database_url).database
    if not database or database == ":memory:":
        lock = _MEMORY_LOCKS.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=wait_s):
            raise _busy(env, name, wait_s)
        try:
            yield
        finally:
            lock.release()
        return
    with _file_lock(env, Path(database), name, wait_s):
        yield


@contextmanager
def _pg_lock(env: StageEnv, name: str, wait_s: float) -> Iterator[None]:
    key = lock_key(name)
    conn = env.db.connect()
    try:
        deadline = time.monotonic() + wait_s
        while True:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            conn.commit()  # the lock is the session's; no transaction stays open
            if got:
                break
            if time.monotonic() >= deadline:
                raise _busy(env, name, wait_s)
            time.sleep(_POLL_S)
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
    except BaseException:
        conn.invalidate()  # never return a connection that may still hold the lock to the pool
        raise
    finally:
        conn.close()


@contextmanager
def _file_lock(env: StageEnv, database: Path, name: str, wait_s: float) -> Iterator[None]:
    path = database.with_name(f"{database.name}.release-{lock_key(name):x}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _busy(env, name, wait_s) from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _busy(env: StageEnv, name: str, wait_s: float) -> ReleaseBusy:
    with env.db.connect() as conn:
        row = conn.execute(
            text("SELECT version, run_id FROM releases WHERE name = :n AND status = 'staging'"),
            {"n": name},
        ).first()
    who = f" (version {row.version}, run {row.run_id})" if row else ""
    return ReleaseBusy(
        f"release {name} is being published by another live publisher{who}; waited {wait_s:.0f}s"
    )


# -- settling dead attempts ---------------------------------------------------------------------
@dataclass
class Recovered:
    reusable: list[str] = field(default_factory=list)  # auto versions that never committed
    finished: list[str] = field(default_factory=list)  # release ids committed, now published
    removed: list[str] = field(default_factory=list)  # release ids cleaned up


def recover(env: StageEnv, name: str) -> Recovered:
    """Settle every dead attempt of `name`; call only while holding its publisher lock."""
    from lgt_ops.release import incremental
    from lgt_ops.release.pointers import mark_published, release_prefix

    out = Recovered()
    with env.db.connect() as conn:
        rows = conn.execute(
            text("SELECT release_id, version FROM releases WHERE name = :n AND status = 'staging'"),
            {"n": name},
        ).all()
    for release_id, version in sorted(rows, key=lambda r: r.version):
        prefix = release_prefix(name, version)
        key = f"{prefix}/manifest.json"
        if env.store.head(key) is not None:
            body = env.store.get(key)
            manifest: dict[str, Any] = json.loads(body)
            sha = hashlib.sha256(body).hexdigest()
            mark_published(env, release_id, name, manifest, sha, bool(manifest["simulated"]))
            out.finished.append(release_id)
            continue
        _delete_under(env, prefix + "/")
        with env.db.begin() as conn:
            incremental.delete_members(conn, release_id)
            conn.execute(text("DELETE FROM releases WHERE release_id = :r"), {"r": release_id})
        out.removed.append(release_id)
        if AUTO_VERSION.match(version):
            out.reusable.append(version)
    _delete_under(env, f"releases/{name}/.staging/")  # no live publisher owns any of it
    return out


def _delete_under(env: StageEnv, prefix: str) -> None:
    for info in list(env.store.list(prefix)):
        env.store.delete(info.key)
    local_path = getattr(env.store, "local_path", None)
    if local_path is not None:
        _sweep_local(Path(local_path(prefix.rstrip("/"))))


def _sweep_local(root: Path) -> None:
    """A local store also keeps the temp file of a write killed midway, and empty folders."""
    if not root.is_dir():
        return
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            if name.startswith(".lgt-tmp"):
                (Path(dirpath) / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(dirpath).rmdir()  # only if empty
