"""One request's attempts on an endpoint's replicas: the failure policy per class.

    overload (429/503)       back off (Retry-After), shrink that replica's window; retry
    refused connection       eject the replica; retry at once on another, no attempt used
    transient (5xx, reset,   jittered backoff, then the least loaded replica (another one if
      timeout, garbled)      any is up); failed after max_attempts
    request-specific 4xx     recorded as rejected, not retried
    truncated / off-schema   regenerated (seed perturbed) up to max_regenerations
    credentials refused      EndpointAuthError (fails the task, not retried)

A request holds a window slot on one replica while it is on the wire and gives it back while
it waits out a backoff. With no replica up it waits for one, and raises EndpointDown once no
replica has answered for down_after_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from lgt_ops.config import EndpointSettings
from lgt_ops.llm.errors import (
    REQUEST_SPECIFIC,
    EndpointAuthError,
    EndpointDown,
    FailureClass,
    classify_http,
)
from lgt_ops.llm.image_cache import ImageCache
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.replicas import Replica, ReplicaPool, public_url
from lgt_ops.llm.request import ChatRequest
from lgt_ops.llm.schema import SchemaCheck
from lgt_ops.llm.stats import EngineStats

# What a dead or dying server does to a request on the wire.
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError, OSError)
_REGENERATE = object()


def endpoint_hint(role: str) -> str:
    return (
        f"check that the server is up and LGT_{role.upper()}_BASE_URL (or the Airflow"
        f" connection lgt_{role}); a re-run resumes (answered requests are kept)"
    )


@dataclass
class Slot:
    """The replica whose window slot a request holds (None while it waits out a backoff)."""

    replica: Replica | None


@dataclass
class _Reply:
    status: int
    raw: bytes
    retry_after: str | None
    latency_s: float


@dataclass
class Attempts:
    """The engine's per-request half; `backoff` and `notify` are the engine's (a freed slot
    wakes its loop)."""

    endpoint: EndpointSettings
    pool: ReplicaPool
    stats: EngineStats
    images: ImageCache | None
    headers: dict[str, str]
    backoff: Callable[[int], float]
    notify: Callable[[], None]
    rng: random.Random
    schema: SchemaCheck

    def take(self, replica: Replica) -> Slot:
        replica.busy += 1
        return Slot(replica)

    async def execute(
        self, session: aiohttp.ClientSession, req: ChatRequest, slot: Slot
    ) -> Outcome:
        """The request's outcome; the caller gives its slot back (`release`) once the outcome
        is recorded, so nothing new is sent before the journal counts this answer."""
        outcome = Outcome(request=req, status="failed")
        try:
            urls = await self._image_urls(req)
        except Exception as exc:  # noqa: BLE001 - any failure to load the image is the image's
            return self._finish(outcome, "rejected", FailureClass.BAD_IMAGE, detail=str(exc))
        while True:
            reply = await self._post(session, slot, req, urls, outcome)
            if isinstance(reply, _Reply):
                verdict = await self._judge(slot, req, outcome, reply)
                if verdict is _REGENERATE:
                    outcome.regenerations += 1
                    continue
                reply = verdict
            if isinstance(reply, Outcome):
                return reply

    async def _post(
        self,
        session: aiohttp.ClientSession,
        slot: Slot,
        req: ChatRequest,
        urls: dict[str, str],
        outcome: Outcome,
    ) -> _Reply | Outcome | None:
        """One HTTP attempt on the slot's replica: its reply, or after a transport failure
        the final outcome (attempts used up) or None (retry, maybe on another replica)."""
        replica = slot.replica
        assert replica is not None
        payload = json.dumps(req.body(urls, outcome.regenerations)).encode("utf-8")
        headers = {**self.headers, "X-Request-Id": f"lgt-{req.key[:32]}-{outcome.attempts}"}
        outcome.attempts += 1
        self.stats.sent += 1
        replica.sent += 1
        started = time.monotonic()
        try:
            async with session.post(replica.chat_url, data=payload, headers=headers) as resp:
                raw = await resp.read()
                retry_after = resp.headers.get("Retry-After")
                return _Reply(resp.status, raw, retry_after, time.monotonic() - started)
        except _TRANSPORT_ERRORS as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, aiohttp.ClientConnectorError):
                self.raise_if_down("unreachable")
                return await self._retry(slot, outcome, detail)
            # Nobody is listening: the replica's problem, not this request's. It is ejected
            # and the request waits for a replica that is up, without using up attempts.
            outcome.error_detail = detail
            self.stats.errors[FailureClass.TRANSIENT] += 1
            self.pool.failed(replica, detail, refused=True)
            self.raise_if_down("unreachable")
            await self._move(slot, 0.0)
            return None

    async def _judge(
        self, slot: Slot, req: ChatRequest, outcome: Outcome, reply: _Reply
    ) -> Outcome | object | None:
        """What a reply means: an outcome, regenerate, or None (retried after a pause)."""
        replica = slot.replica
        assert replica is not None
        outcome.replica = replica.url
        text_head = reply.raw[:4000].decode("utf-8", "replace")
        failure = classify_http(reply.status, text_head)
        if failure is FailureClass.OVERLOAD:
            outcome.overloads += 1
            self.stats.errors[failure] += 1
            replica.window.on_overload()
            self.raise_if_down(f"overloaded (HTTP {reply.status})")
            await self._move(slot, self._retry_after(reply.retry_after, outcome.overloads))
            return None
        if failure is FailureClass.AUTH:
            ep = self.endpoint
            raise EndpointAuthError(
                f"{ep.role} endpoint {public_url(replica.url)} refused credentials (HTTP"
                f" {reply.status}); set LGT_{ep.role.upper()}_API_KEY (or the password of the"
                f" Airflow connection lgt_{ep.role}) to the key the server expects"
            )
        self.pool.answered(replica)
        outcome.http_status = reply.status
        if failure in REQUEST_SPECIFIC:
            self.stats.errors[failure] += 1
            return self._finish(outcome, "rejected", failure, detail=text_head)
        if failure is FailureClass.TRANSIENT:
            return await self._retry(slot, outcome, f"HTTP {reply.status}: {text_head[:200]}")
        try:
            data = json.loads(reply.raw)
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                raise ValueError("no choices")
        except ValueError as exc:  # garbled body: the transport, not the model
            return await self._retry(slot, outcome, f"unparseable response body: {exc}")
        self.pool.succeeded(replica)
        outcome.latency_ms = round(reply.latency_s * 1000, 2)
        self.stats.add_latency(reply.latency_s * 1000)
        replica.window.on_success(reply.latency_s)
        return self._accept(req, outcome, data)

    def _accept(self, req: ChatRequest, outcome: Outcome, data: dict[str, Any]) -> Any:
        """A well-formed answer: the outcome, or `_REGENERATE` while regenerations are left."""
        problem = self._check_output(req, data)
        if problem is not None:
            self.stats.errors[problem[0]] += 1
            if outcome.regenerations < self.endpoint.max_regenerations:
                return _REGENERATE
            outcome.response = data
            return self._finish(outcome, "invalid_output", problem[0], detail=problem[1])
        outcome.response = data
        usage = data.get("usage") or {}
        self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return self._finish(outcome, "ok", None)

    async def _retry(self, slot: Slot, outcome: Outcome, detail: str) -> Outcome | None:
        """A transient failure: the final outcome once attempts are used up, else None after
        a backoff (the retry goes to the least loaded replica, another one if any is up)."""
        assert slot.replica is not None
        self.pool.failed(slot.replica, detail)
        if self._note_transient(outcome, detail):
            return self._finish(outcome, "failed", FailureClass.TRANSIENT)
        await self._move(slot, self.backoff(outcome.transient_errors))
        return None

    # -- slots, replicas, the down limit ----------------------------------------------------
    def release(self, slot: Slot) -> None:
        if slot.replica is not None:
            slot.replica.busy -= 1
            slot.replica = None
            self.notify()

    async def _move(self, slot: Slot, seconds: float) -> None:
        """Give the slot back, sleep (without holding a window slot), and take one on the
        least loaded replica that is up, preferring another than the one just used. With
        none up, wait for one until the endpoint counts as down."""
        avoid = slot.replica
        self.release(slot)
        if seconds > 0:
            await asyncio.sleep(seconds)
        while (replica := self.pool.least_loaded(avoid)) is None:
            self.raise_if_down("unreachable")
            await self.pool.wait_up(0.25)
        replica.busy += 1
        slot.replica = replica

    def raise_if_down(self, state: str) -> None:
        """EndpointDown once no replica has answered for down_after_s."""
        if self.pool.silent_for() > self.endpoint.down_after_s:
            raise self.down_error(state)

    def down_error(self, state: str) -> EndpointDown:
        ep = self.endpoint
        return EndpointDown(
            " ".join(
                f"{self.pool.describe()} {state} for more than {ep.down_after_s:.0f}s"
                f" ({self.pool.errors_text()}); {endpoint_hint(ep.role)}".split()
            )
        )

    def _finish(
        self, outcome: Outcome, status: str, failure: FailureClass | None, detail: str | None = None
    ) -> Outcome:
        outcome.status = status
        outcome.error_class = str(failure) if failure is not None else None
        if detail is not None:
            outcome.error_detail = detail
        self.stats.fresh += 1
        self.stats.statuses[status] += 1
        return outcome

    def _note_transient(self, outcome: Outcome, detail: str) -> bool:
        """Count a transient failure; True when the request has used up its attempts."""
        outcome.transient_errors += 1
        outcome.error_detail = detail
        self.stats.errors[FailureClass.TRANSIENT] += 1
        return outcome.transient_errors >= self.endpoint.max_attempts

    def _retry_after(self, header: str | None, n: int) -> float:
        if header:
            with contextlib.suppress(ValueError):
                return min(60.0, max(0.0, float(header))) * (1 + 0.2 * self.rng.random())
        return self.backoff(n)

    def _check_output(
        self, req: ChatRequest, data: dict[str, Any]
    ) -> tuple[FailureClass, str] | None:
        choices = data.get("choices") or []
        if not choices:
            return FailureClass.INVALID_OUTPUT, "no choices in response"
        if not req.allow_truncated and int(req.sampling.get("n", 1)) == 1:
            for c in choices:
                if c.get("finish_reason") == "length":
                    return FailureClass.TRUNCATED, "finish_reason=length"
        if req.response_schema is not None:
            for c in choices:
                content = (c.get("message") or {}).get("content") or ""
                err = self.schema.check(req.response_schema, content)
                if err is not None:
                    return FailureClass.INVALID_OUTPUT, err
        return None

    async def _image_urls(self, req: ChatRequest) -> dict[str, str]:
        if not req.image_ids:
            return {}
        if self.images is None:
            raise RuntimeError("request has images but the engine has no image source")
        loop = asyncio.get_running_loop()
        urls = {}
        for image_id in req.image_ids:
            urls[image_id] = await loop.run_in_executor(None, self.images.get, image_id)
        return urls
