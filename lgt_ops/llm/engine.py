"""The request engine: one event loop, bounded (adaptive) windows, a failure policy per class.

Stages call `RequestEngine.run(requests)` from ordinary synchronous code and iterate the
outcomes as they complete. Behind it an asyncio loop in a worker thread pulls requests lazily
from the iterator (memory is O(window), not O(dataset)), answers what the ledger already
holds without a call, sends the rest with aiohttp, and hands outcomes back through a bounded
queue. Fresh outcomes are recorded in the ledger the moment they complete, in the loop, so
its journal can make them durable within a bounded delay whatever the consumer is doing
(see `Ledger`); the consumer's commits write what the journal has not yet.

A role may name several replicas of its endpoint (lgt_ops.llm.replicas): each request goes
to the replica with the fewest outstanding requests and room in its own window; a request
whose replica fails is retried on another, and an answer, once received, is recorded and
never asked again. One replica is the same path with a pool of one.

Why aiohttp and not `openai.AsyncClient`: on a 2-core machine the official client costs ~5 ms
of CPU per call, which caps one process near 200 req/s; this loop stays well under 1 ms and
keeps the wire format identical (see bench/endpoint_throughput.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import random
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import aiohttp

from lgt_ops import chaos
from lgt_ops.config import EndpointSettings
from lgt_ops.llm.attempts import Attempts, Slot
from lgt_ops.llm.image_cache import ImageCache, ImageUrls
from lgt_ops.llm.ledger import Ledger
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.replicas import ReplicaPool
from lgt_ops.llm.request import ChatRequest
from lgt_ops.llm.schema import SchemaCheck
from lgt_ops.llm.stats import EngineStats
from lgt_ops.llm.window import AdaptiveWindow
from lgt_ops.progress import Progress

__all__ = ["EngineStats", "ImageUrls", "RequestEngine", "run_all"]

_LOOKUP_CHUNK = 256
_DONE = object()


class _Fatal(Exception):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass
class _Run:
    """One `run()`'s state in the loop."""

    requests: Iterator[ChatRequest]
    ready: deque[ChatRequest] = field(default_factory=deque)
    completed: deque[Outcome] = field(default_factory=deque)
    followers: dict[str, list[ChatRequest]] = field(default_factory=dict)  # key -> twins
    inflight: set[asyncio.Task[Outcome]] = field(default_factory=set)
    exhausted: bool = False
    lookup: asyncio.Future[tuple[list[ChatRequest], dict[str, Outcome]]] | None = None
    fatal: BaseException | None = None

    @property
    def finished(self) -> bool:
        return (
            self.exhausted
            and self.lookup is None
            and not self.ready
            and not self.inflight
            and not self.completed
        )


class RequestEngine:
    def __init__(
        self,
        endpoint: EndpointSettings,
        ledger: Ledger | None = None,
        images: ImageUrls | None = None,
        *,
        progress: Progress | None = None,
        seed: int = 0,
        headers: dict[str, str] | None = None,
        needed_tokens: int | None = None,
        unchecked: Iterable[str] = (),
    ) -> None:
        """`needed_tokens` (the largest request) and `unchecked` (replicas down at preflight)
        go to the replica pool: what a replica must show before it gets work."""
        self.endpoint = endpoint
        self.pool = ReplicaPool.of(endpoint, needed_tokens, unchecked)
        self.ledger = ledger
        self.progress = progress
        self.stats = EngineStats()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._wake: asyncio.Event | None = None
        headers = {"Content-Type": "application/json", **(headers or {})}
        if endpoint.api_key is not None:
            headers["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
        self._headers = headers
        self._attempts = Attempts(
            endpoint,
            self.pool,
            self.stats,
            ImageCache(images) if images is not None else None,
            headers,
            backoff=lambda n: self._backoff(n),  # looked up per call: tests shorten it
            notify=self._notify,
            rng=self._rng,
            schema=SchemaCheck(),
        )

    @property
    def window(self) -> AdaptiveWindow:
        """The first replica's window (the endpoint's, when it has one replica)."""
        return self.pool.replicas[0].window

    # -- synchronous face -------------------------------------------------------------------
    def run(self, requests: Iterable[ChatRequest]) -> Iterator[Outcome]:
        """Outcomes in completion order; fresh ones are recorded in the ledger buffer."""
        out: queue.Queue[Any] = queue.Queue(maxsize=max(64, 2 * self.endpoint.max_inflight))
        self._stop.clear()
        worker = threading.Thread(
            target=self._thread_main, args=(iter(requests), out), name="lgt-requests", daemon=True
        )
        worker.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                if isinstance(item, _Fatal):
                    raise item.exc
                yield item
        finally:
            self._stop.set()
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a producer waiting on a full queue
                    out.get_nowait()
            worker.join(timeout=30)

    def _thread_main(self, requests: Iterator[ChatRequest], out: queue.Queue[Any]) -> None:
        try:
            runner = _loop_runner()
            with runner:
                runner.run(self._main(requests, out))
        except BaseException as exc:  # noqa: BLE001 - surfaced in the consumer's thread
            _put_blocking(out, _Fatal(exc), self._stop)
            return
        _put_blocking(out, _DONE, self._stop)

    # -- the loop ---------------------------------------------------------------------------
    async def _main(self, requests: Iterator[ChatRequest], out: queue.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()
        run = _Run(requests)
        wake = self._wake = asyncio.Event()
        if self.ledger is not None:  # a journal write (or failure) may unblock sending
            self.ledger.on_journal = lambda: loop.call_soon_threadsafe(wake.set)
        timeout = aiohttp.ClientTimeout(
            total=self.endpoint.timeout_s, sock_connect=self.endpoint.connect_timeout_s
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self.pool.start(session, self._headers, lambda n: self._backoff(n), wake.set)
            try:
                while not self._should_stop(run):
                    self._refill(run)
                    self._dispatch(session, run)
                    while run.completed:
                        await self._emit(run, run.completed.popleft(), out)
                    if run.finished:
                        break
                    if not run.completed:
                        await self._sleep_until_woken(wake)
            finally:
                if self.ledger is not None:
                    self.ledger.on_journal = None
                await self._cancel(run)
                await self.pool.stop()
        if run.fatal is not None:
            raise run.fatal

    def _should_stop(self, run: _Run) -> bool:
        if self.ledger is not None and self.ledger.journal_error is not None:
            # Answers can no longer be made durable: stop paying for more.
            run.fatal = run.fatal or self.ledger.journal_error
        if (
            run.ready
            and not run.inflight
            and not self.pool.any_up()
            and self.pool.silent_for() > self.endpoint.down_after_s
        ):  # work waits and no request is left on a replica to notice that all are down
            run.fatal = run.fatal or self._attempts.down_error("unreachable")
        return self._stop.is_set() or run.fatal is not None

    async def _sleep_until_woken(self, wake: asyncio.Event) -> None:
        # With every replica ejected, look again now and then (down_after_s runs out).
        limit = None if self.pool.any_up() else 0.25
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), limit)
        wake.clear()

    def _refill(self, run: _Run) -> None:
        """Keep `ready` topped up. The ledger looks a chunk up in a worker thread while the
        loop goes on sending and emitting: a lookup never leaves the windows idle."""
        if run.lookup is not None:
            if not run.lookup.done():
                return
            chunk, cached = run.lookup.result()
            run.lookup = None
            self._sort(run, chunk, cached)
        while not run.exhausted and len(run.ready) < max(_LOOKUP_CHUNK, 2 * self.pool.window_total):
            chunk = list(islice(run.requests, _LOOKUP_CHUNK))
            if not chunk:
                run.exhausted = True
            elif self.ledger is None:
                self._sort(run, chunk, {})
            else:
                run.lookup = asyncio.get_running_loop().run_in_executor(
                    None, _lookup, self.ledger, chunk
                )
                run.lookup.add_done_callback(lambda _: self._notify())
                return

    def _sort(self, run: _Run, chunk: list[ChatRequest], cached: dict[str, Outcome]) -> None:
        """Answered (from the ledger), a twin of a request already on its way, or to send."""
        for req in chunk:
            if req.key in cached:
                self.stats.cache_hits += 1
                self.stats.statuses[cached[req.key].status] += 1
                run.completed.append(cached[req.key])
            elif req.key in run.followers:
                run.followers[req.key].append(req)  # same request twice: one call
            else:
                run.followers[req.key] = []
                run.ready.append(req)

    def _dispatch(self, session: aiohttp.ClientSession, run: _Run) -> None:
        """Send ready requests while a replica has room in its window."""
        loop = asyncio.get_running_loop()
        # Tasks asleep in a backoff do not count against a window, but the number of tasks
        # stays bounded all the same.
        cap = 2 * self.pool.window_total + 16
        while (
            run.ready
            and len(run.inflight) < cap
            and not (self.ledger is not None and self.ledger.backlogged())
        ):
            replica = self.pool.pick()
            if replica is None:
                return
            slot = self._attempts.take(replica)
            task = loop.create_task(self._attempts.execute(session, run.ready.popleft(), slot))
            run.inflight.add(task)
            task.add_done_callback(functools.partial(self._on_done, run, slot))

    def _on_done(self, run: _Run, slot: Slot, task: asyncio.Task[Outcome]) -> None:
        run.inflight.discard(task)
        if task.cancelled():
            pass
        elif task.exception() is not None:
            run.fatal = run.fatal or task.exception()
        else:
            # Recorded now, before the loop sends anything else: the journal's backlog must
            # include this answer when the next send is decided.
            self._record(task.result(), len(run.inflight))
            run.completed.append(task.result())
        self._attempts.release(slot)
        self._notify()

    async def _cancel(self, run: _Run) -> None:
        for task in list(run.inflight):
            task.cancel()
        if run.inflight:
            await asyncio.gather(*run.inflight, return_exceptions=True)

    def _record(self, outcome: Outcome, inflight: int) -> None:
        """Hand a fresh outcome to the ledger the moment it completes (its journal makes it
        durable); `inflight` is what is still on the wire."""
        ledger = self.ledger
        if ledger is None or outcome.cached:
            return
        ledger.record(outcome)
        chaos.point(ledger.stage, lambda: {"in_flight": inflight, "unjournaled": ledger.pending})

    async def _emit(self, run: _Run, outcome: Outcome, out: queue.Queue[Any]) -> None:
        if not outcome.cached:  # its twins in this run get the same answer
            for twin in run.followers.pop(outcome.request.key, []):
                run.completed.append(_replay(outcome, twin))
        if self.progress is not None:
            self.progress.update(
                1,
                hits=self.stats.cache_hits,
                window=self.pool.window_total,
                errors=dict(self.stats.errors),
            )
        try:
            out.put_nowait(outcome)
        except queue.Full:
            await asyncio.to_thread(_put_blocking, out, outcome, self._stop)

    def _backoff(self, n: int) -> float:
        """~0.1 s, 0.2 s, 0.4 s ... capped at 30 s, jittered so retries do not align."""
        base = min(30.0, 0.05 * (2 ** min(n, 10)))
        return base * (0.5 + self._rng.random())

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.stats.sent,
            "fresh": self.stats.fresh,
            "cache_hits": self.stats.cache_hits,
            "statuses": dict(self.stats.statuses),
            "errors": {str(k): v for k, v in self.stats.errors.items()},
            "prompt_tokens": self.stats.prompt_tokens,
            "completion_tokens": self.stats.completion_tokens,
            "p50_ms": self.stats.percentile(50),
            "p99_ms": self.stats.percentile(99),
            "window": self.pool.window_total,
            "replicas": self.pool.summary(),
        }


def _lookup(
    ledger: Ledger, chunk: list[ChatRequest]
) -> tuple[list[ChatRequest], dict[str, Outcome]]:
    return chunk, ledger.lookup(chunk)


def _replay(outcome: Outcome, twin: ChatRequest) -> Outcome:
    return Outcome(
        request=twin,
        status=outcome.status,
        response=outcome.response,
        error_class=outcome.error_class,
        http_status=outcome.http_status,
        latency_ms=outcome.latency_ms,
        error_detail=outcome.error_detail,
        cached=True,
    )


def _put_blocking(out: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while True:
        try:
            out.put(item, timeout=0.2)
            return
        except queue.Full:
            if stop.is_set():
                return


def _loop_runner() -> asyncio.Runner:
    """uvloop when installed (it roughly halves the loop's CPU per request)."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        return asyncio.Runner()


def run_all(engine: RequestEngine, requests: Iterable[ChatRequest]) -> list[Outcome]:
    """Every outcome of a small batch, in completion order (the preflight's probes)."""
    return list(engine.run(requests))
