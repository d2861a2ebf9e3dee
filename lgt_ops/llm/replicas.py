"""The replicas of one role's endpoint: least-outstanding balancing, ejection, probing back.

Every base URL of a role is a `Replica` with its own adaptive window (lgt_ops.llm.window) and
count of outstanding requests (window slots taken). A request goes to the replica with the
fewest outstanding requests that still has room in its window. A replica that refuses
connections, or fails `EJECT_AFTER` times in a row (resets, timeouts, 5xx, garbled bodies),
is ejected: it gets no requests until a probe (GET /models, with backoff) finds it answering
again and listing the configured model (with a context that fits the stage's largest request,
when the pool knows it), and it comes back with a fresh window (a restarted server starts
cold). A replica the preflight found down starts out ejected, so it too is probed before it
gets work: a server restarted with the wrong model never joins a run. The task fails
only when no replica has answered for `down_after_s` (the engine asks `silent_for`). One
replica is the same code with a pool of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from lgt_ops.config import EndpointSettings
from lgt_ops.llm.window import AdaptiveWindow

log = logging.getLogger(__name__)

EJECT_AFTER = 5  # failures in a row: at 10% random faults, 1e-5 per request


def new_window(ep: EndpointSettings) -> AdaptiveWindow:
    return AdaptiveWindow(
        limit=ep.max_inflight if not ep.adaptive else min(16, ep.max_inflight),
        min_limit=min(ep.min_inflight, ep.max_inflight),
        max_limit=ep.max_inflight,
        adaptive=ep.adaptive,
    )


@dataclass(eq=False)
class Replica:
    url: str  # base URL, e.g. http://vllm-0:8000/v1
    window: AdaptiveWindow
    busy: int = 0  # window slots taken (a request asleep in a backoff gives its slot back)
    streak: int = 0  # failures since the last good answer
    ejected_at: float | None = None
    ejections: int = 0
    readmissions: int = 0
    last_error: str | None = None
    sent: int = 0
    answered: int = 0
    kept_out: str | None = None  # why the last probe answered but did not take it back

    @property
    def chat_url(self) -> str:
        return self.url + "/chat/completions"

    @property
    def up(self) -> bool:
        return self.ejected_at is None


@dataclass
class ReplicaPool:
    endpoint: EndpointSettings
    replicas: list[Replica] = field(default_factory=list)
    last_answer: float = field(default_factory=time.monotonic)
    _probes: set[asyncio.Task[None]] = field(default_factory=set)
    _up: asyncio.Event | None = None
    _probe_with: tuple | None = None  # (session, headers, delay, on_back) of the running loop

    needed_tokens: int | None = None  # the largest request sent: a probed context must fit

    @classmethod
    def of(
        cls, ep: EndpointSettings, needed_tokens: int | None = None, unchecked: Iterable[str] = ()
    ) -> ReplicaPool:
        """`unchecked`: base URLs nobody has checked (down at preflight); they start ejected,
        to be probed in."""
        held = {public_url(u.rstrip("/")) for u in unchecked}
        now = time.monotonic()
        replicas = [
            Replica(url, new_window(ep), ejected_at=now if public_url(url) in held else None)
            for url in ep.require_urls()
        ]
        if held and not any(r.up for r in replicas):  # a caller's mistake: keep it working
            for r in replicas:
                r.ejected_at = None
        return cls(ep, replicas, needed_tokens=needed_tokens)

    # -- choosing ---------------------------------------------------------------------------
    def pick(self) -> Replica | None:
        """The up replica with the fewest outstanding requests and room in its window."""
        room = [r for r in self.replicas if r.up and r.busy < r.window.size]
        return min(room, key=_load, default=None)

    def least_loaded(self, avoid: Replica | None = None) -> Replica | None:
        """The up replica with the fewest outstanding requests, window full or not (a retry
        takes its slot back at once, as with one endpoint); `avoid` only if it is the last."""
        up = [r for r in self.replicas if r.up]
        others = [r for r in up if r is not avoid] or up
        return min(others, key=_load, default=None)

    def any_up(self) -> bool:
        return any(r.up for r in self.replicas)

    @property
    def window_total(self) -> int:
        return sum(r.window.size for r in self.replicas if r.up) or self.replicas[0].window.size

    # -- what happened ----------------------------------------------------------------------
    def answered(self, replica: Replica) -> None:
        """The replica answered (any HTTP answer but overload): it is alive."""
        self.last_answer = time.monotonic()
        replica.answered += 1

    def succeeded(self, replica: Replica) -> None:
        replica.streak = 0

    def failed(self, replica: Replica, detail: str, *, refused: bool = False) -> bool:
        """Count a failure; eject the replica on a refusal or a run of failures. True when
        this call ejected it."""
        replica.streak += 1
        replica.last_error = detail
        if replica.up and (refused or replica.streak >= EJECT_AFTER):
            replica.ejected_at = time.monotonic()
            replica.ejections += 1
            log.info(  # INFO: a task log line; the CLI's failure stays one line
                "%s replica %s ejected (%s); probing it until it answers",
                self.endpoint.role,
                public_url(replica.url),
                " ".join(detail.split())[:200],
            )
            if self._up is not None and not any(r.up for r in self.replicas):
                self._up.clear()
            self._start_probe(replica)
            return True
        return False

    def silent_for(self) -> float:
        return time.monotonic() - self.last_answer

    def errors_text(self) -> str:
        """The last error of each replica that has one, for a one-line message."""
        errs = [(public_url(r.url), r.last_error) for r in self.replicas if r.last_error]
        if len(self.replicas) == 1:
            return f"last error: {errs[0][1]}" if errs else "no answer"
        return "last errors: " + (", ".join(f"{u}: {e}" for u, e in errs) or "none")

    def describe(self) -> str:
        """`llm endpoint http://a/v1` or `llm endpoint replicas http://a/v1, http://b/v1`."""
        urls = ", ".join(public_url(r.url) for r in self.replicas)
        kind = "endpoint replicas" if len(self.replicas) > 1 else "endpoint"
        return f"{self.endpoint.role} {kind} {urls}"

    # -- waiting for a replica, probing ejected ones back -----------------------------------
    def start(
        self,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        delay: Callable[[int], float],
        on_back: Callable[[], None],
    ) -> None:
        """Bind to the running loop (each `RequestEngine.run` has its own); replicas ejected
        in an earlier run are probed again."""
        self._up = asyncio.Event()
        self._probe_with = (session, headers, delay, on_back)
        if any(r.up for r in self.replicas):
            self._up.set()
        for r in self.replicas:
            if not r.up:
                self._start_probe(r)

    async def wait_up(self, timeout: float) -> None:
        """Until some replica is up, or `timeout` seconds."""
        assert self._up is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)

    def _start_probe(self, replica: Replica) -> None:
        if self._probe_with is None:
            return
        task = asyncio.get_running_loop().create_task(self._probe(replica, *self._probe_with))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(
        self,
        replica: Replica,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        delay: Callable[[int], float],
        on_back: Callable[[], None],
    ) -> None:
        attempt = 0
        while not replica.up:
            attempt += 1
            await asyncio.sleep(delay(min(attempt, 6)))
            try:
                async with session.get(replica.url + "/models", headers=headers) as resp:
                    body = await resp.read()
                    alive = resp.status == 200
            except (aiohttp.ClientError, TimeoutError, OSError):
                alive = False
            if not alive:
                continue
            reason = self.unfit(body)
            if reason is None:
                self._readmit(replica)
                on_back()
            elif reason != replica.kept_out:  # once per reason, not once per probe
                replica.kept_out = reason
                log.warning(
                    "%s replica %s answers but stays out: %s",
                    self.endpoint.role,
                    public_url(replica.url),
                    reason,
                )

    def unfit(self, models_body: bytes) -> str | None:
        """Why a replica answering GET /models with this body must not get work, or None."""
        model = self.endpoint.model
        try:
            cards = {c["id"]: c for c in json.loads(models_body)["data"]}
        except (ValueError, KeyError, TypeError):
            return "its GET /models answer is not an OpenAI model list"
        card = cards.get(model)
        if card is None:
            served = ", ".join(sorted(map(str, cards))) or "nothing"
            return f"it does not serve model '{model}' (it serves: {served})"
        context = card.get("max_model_len")
        need = self.needed_tokens
        if need is not None and isinstance(context, int) and context < need:
            return (
                f"model '{model}' has a context of {context} tokens but requests of up to"
                f" {need} tokens are sent"
            )
        return None

    def _readmit(self, replica: Replica) -> None:
        replica.ejected_at = None
        replica.streak = 0
        replica.kept_out = None
        replica.readmissions += 1
        replica.window = new_window(self.endpoint)
        log.info("%s replica %s is back", self.endpoint.role, public_url(replica.url))
        if self._up is not None:
            self._up.set()

    async def stop(self) -> None:
        self._probe_with = None
        for task in list(self._probes):
            task.cancel()
        if self._probes:
            await asyncio.gather(*self._probes, return_exceptions=True)

    def summary(self) -> list[dict[str, object]]:
        return [
            {
                "url": r.url,
                "up": r.up,
                "window": r.window.size,
                "sent": r.sent,
                "answered": r.answered,
                "ejections": r.ejections,
                "readmissions": r.readmissions,
            }
            for r in self.replicas
        ]


def _load(r: Replica) -> tuple[float, int]:
    # Fewest outstanding first; among equals, the one with the most room in its window.
    return (r.busy, -r.window.size)


def public_url(url: str) -> str:
    """The URL without credentials or query (a key may ride in either)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
