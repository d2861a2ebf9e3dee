"""Test-only crash points for the chaos suite (tests/test_chaos.py, bench/chaos.py).

With `LGT_CHAOS_KILL=<point>:<n>` in its environment, a process SIGKILLs itself at the n-th
event of <point>; without it every call here is a no-op (one global check). Points:
- a model stage's name (`mcq`, `cot`, ...): a fresh answer handed to the ledger;
- `filter`, `pairs`: a batch of finished items committed;
- `ingest`: a batch of images committed;
- `release`: an object written under `releases/` (parts, copies, report, card, manifest).
Before dying it appends one JSON line to `LGT_CHAOS_REPORT` (if set): the point, n, and what
the caller knew, e.g. requests in flight and answers not yet journaled.
`LGT_CHAOS_COUNT=<file>` instead counts every point's events and writes them at exit, so a
harness can draw kill points inside the range a run really reaches.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any


def _target() -> tuple[str, int] | None:
    raw = os.environ.get("LGT_CHAOS_KILL", "")
    name, sep, n = raw.rpartition(":")
    if not sep or not name or not n.isdigit() or int(n) < 1:
        return None
    return name, int(n)


_TARGET = _target()
_COUNT_FILE = os.environ.get("LGT_CHAOS_COUNT") or None
_ACTIVE = _TARGET is not None or _COUNT_FILE is not None
_counts: Counter[str] = Counter()


def point(name: str, info: Callable[[], dict[str, Any]] | None = None) -> None:
    """One event of crash point `name`."""
    if not _ACTIVE:
        return
    _counts[name] += 1
    if _TARGET is None or (name, _counts[name]) != _TARGET:
        return
    report = os.environ.get("LGT_CHAOS_REPORT")
    if report:
        line = {"point": name, "n": _counts[name], **(info() if info else {})}
        with open(report, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _write_counts() -> None:
    if _COUNT_FILE:
        with open(_COUNT_FILE, "w", encoding="utf-8") as fh:
            json.dump(dict(_counts), fh, sort_keys=True)


if _COUNT_FILE:
    atexit.register(_write_counts)
