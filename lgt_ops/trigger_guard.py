"""Refuse an invalid trigger of an LGT DAG at Airflow's API, with the library's message.

Airflow checks each param's value against its schema when a run is triggered, but it keeps
conf keys that are not params (they are merged in without a schema), cannot check rules that
span fields, and its message ends in a dump of the schema. This ASGI middleware (registered by
plugins/lgt_trigger_guard.py) runs `RunParams.from_conf` on the conf of
`POST /api/v2/dags/<guarded dag>/dagRuns` (the UI's trigger form posts there too) and on the
`dag_run_conf` of `POST /api/v2/backfills` (and its `/dry_run`) for a guarded DAG:

- a valid conf passes through untouched;
- for an invalid one the request goes on with a conf Airflow itself refuses, so deciding who
  may trigger stays Airflow's: a caller Airflow lets through gets HTTP 400 with the library's
  message (naming each parameter and the reason) and no run is created; anyone else gets
  Airflow's own 401/403/404.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from lgt_ops.params import ParamsError, RunParams

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED_DAGS = frozenset({"lgt_synthesis"})
_TRIGGER = re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")
_BACKFILL = re.compile(r"/api/v2/backfills(?:/dry_run)?/?$")
# A conf the DAG's own Param schema refuses (dry_run must be a boolean): Airflow answers an
# authorised caller 400 (a trigger) or 422 (a backfill) before it creates anything.
_REFUSED_BY_AIRFLOW = {"dry_run": "refused-by-lgt-trigger-guard"}


@dataclass(frozen=True)
class _Request:
    """Where a run-creating request carries its conf, and how Airflow refuses a bad one."""

    conf_key: str
    refused_status: int


_RUN_TRIGGER = _Request("conf", 400)
_BACKFILL_REQUEST = _Request("dag_run_conf", 422)


def _guarded(scope: Scope, dag_ids: frozenset[str]) -> _Request | None:
    """What kind of run-creating request this is (None: not one to check here). A backfill
    names its DAG in the body: `problem_with` checks that."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope.get("path", "")
    trigger = _TRIGGER.search(path)
    if trigger is not None:
        return _RUN_TRIGGER if trigger["dag_id"] in dag_ids else None
    return _BACKFILL_REQUEST if _BACKFILL.search(path) else None


def problem_with(
    body: bytes, conf_key: str = "conf", dag_ids: frozenset[str] | None = None
) -> str | None:
    """The library's message for the request's conf, or None when it is valid (or not JSON
    at all, or, given `dag_ids`, for another DAG: Airflow answers those itself)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(data, dict) or (dag_ids is not None and data.get("dag_id") not in dag_ids):
        return None
    conf = data.get(conf_key)
    if not isinstance(conf, dict | None):
        return None
    try:
        RunParams.from_conf(conf)
    except ParamsError as exc:
        return f"Invalid run parameters: {exc}"
    return None


class TriggerGuard:
    def __init__(self, app: ASGIApp, dag_ids: frozenset[str] = GUARDED_DAGS) -> None:
        self.app = app
        self.dag_ids = dag_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _guarded(scope, self.dag_ids)
        if kind is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        by_body = None if kind is _RUN_TRIGGER else self.dag_ids  # a backfill's DAG: the body
        problem = problem_with(body, kind.conf_key, by_body)
        if problem is None:
            await self.app(scope, _replay(body), send)
            return
        refused = json.dumps({**json.loads(body), kind.conf_key: _REFUSED_BY_AIRFLOW}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(refused)).encode()))
        answer = _answer(send, problem, kind.refused_status)
        await self.app({**scope, "headers": headers}, _replay(refused), answer)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _answer(send: Send, detail: str, refused_status: int) -> Send:
    """Airflow's refusal of the substituted conf becomes our 400; any other answer (401, 403,
    404, ...) goes out as it is."""
    replaced = False

    async def wrapped(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] == refused_status:
            replaced = True
            body = json.dumps({"detail": detail}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        elif not (replaced and message["type"] == "http.response.body"):
            await send(message)

    return wrapped
