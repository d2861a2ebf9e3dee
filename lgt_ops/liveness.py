"""Is the process that left a row `running` still alive?

Every `pipeline_runs` / `stage_runs` row records the host, pid and (on Linux) the process
start time of the process that runs it. A row stays `running` only while that process lives:
a SIGKILL, an OOM kill or a lost node leaves it behind. Two rules close such rows as
`abandoned` (lgt_ops.stages.base), each correct on its own:

1. Superseded: a new attempt of the same run, stage and shard. The orchestrator runs one try
   of a task instance at a time (Airflow starts a retry only after the previous try ended or
   was declared a zombie), so an older attempt still `running` is dead, whatever host ran it.
2. Gone: a row recorded on *this* host whose pid no longer exists, is a zombie, or is now a
   different process (same pid, other start time). Only this host can tell, so rows of other
   hosts are left to rule 1 and to the DAG's `finish` task, which closes every row of its run
   that is still `running` (all tasks before it are done by then).

The host name is the container's in Docker and Kubernetes (one pid namespace per name).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    started: int | None  # clock ticks since boot (Linux), None where unknown

    def as_row(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "pid_started": self.started}

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...], None if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[-1].split()  # the name may hold spaces and ')'


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat


@cache
def _host() -> str:
    return socket.gethostname()


def current() -> ProcessId:
    pid = os.getpid()
    return ProcessId(_host(), pid, _start_ticks(pid))


def is_gone(host: str | None, pid: int | None, started: int | None) -> bool:
    """True when the recorded process is certainly dead; False when alive or unknown
    (another host, or a row written before processes were recorded)."""
    if host != _host() or pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat_fields(pid)
    if fields is None:  # no /proc (not Linux): the pid exists, trust it
        return False
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    return started is not None and _start_ticks(pid) != started
