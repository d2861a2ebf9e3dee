"""An OpenAI-compatible chat-completions server that stands in for vLLM in tests and demos.

A test double: its replies carry `model: "lgt-simulator:<requested model>"` and a
`system_fingerprint` starting with `lgt-simulator`, it logs that it is a simulator, and a
release built from its output is marked simulated. It has a known capacity (slots x latency,
queueing beyond that like vLLM), injects faults at configurable rates, and counts what it
served so tests can assert exactly-once behaviour.

Determinism: a 200 reply's body (id, created, choices, usage) is a pure function of (request
body, seed) -- same request, same bytes, in any run, process, order or concurrency. Injected
faults are drawn from (request body, seed, attempt), the attempt being the engine's
X-Request-Id suffix (or, for other clients, how often this process has seen that body), so a
retry draws again. Only the test-control switches (`down`, `down_after_served`), the
counters and, without `served_models`, the model list (the defaults plus the names asked for,
sorted) depend on history.

Endpoints: POST /v1/chat/completions, GET /v1/models (with vLLM's `max_model_len`),
GET /version, GET /health, and for tests GET /sim/stats, POST /sim/reset, GET|POST /sim/config.
Configured as a misconfigured server (a model it does not serve, a text-only model, a
reasoner that does not think, a small context, no guided decoding, `bad_words` refused), it
answers as such a server would, so the preflight
(lgt_ops/llm/preflight.py) can be tested against each failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from typing import Any

from aiohttp import web

from lgt_ops.config import DEFAULT_MODELS
from lgt_ops.ids import canonical_json, seeded_unit, sha256_hex
from lgt_ops.llm.simulated import MODEL_PREFIX
from lgt_ops.llm.simulator.config import SimConfig
from lgt_ops.llm.simulator.world import World, canonical_messages, image_size, text_of

log = logging.getLogger("lgt.simulator")
FINGERPRINT = "lgt-simulator-1"
PROBE_HEADER = "X-Lgt-Probe"  # set by the preflight's requests (lgt_ops/llm/preflight.py)
VERSION = "0.0.0+lgt-simulator"  # GET /version, where vLLM reports its release
CREATED_BASE = 1_700_000_000  # 2023-11-14: `created` is a plausible time, not the clock's
CREATED_SPAN = 50_000_000


class Simulator:
    def __init__(self, cfg: SimConfig | None = None) -> None:
        self.cfg = cfg or SimConfig()
        self.world = World(self.cfg)
        self._slots: asyncio.Semaphore | None = None
        self._slot_count = self.cfg.slots
        self.reset()

    def reset(self) -> None:
        # Requests that began before a reset (e.g. a stalled "timeout" whose client gave up
        # long ago) still get their answer, but no longer count.
        self._generation = getattr(self, "_generation", 0) + 1
        self.received = 0
        self.served = 0
        self.admitted = 0
        # Preflight probes (header X-Lgt-Probe) are counted here by HTTP status, not in the
        # counters above: a test can tell the stages' requests from the endpoint checks.
        self.probes: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.served_by_key: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight_seen = 0
        self.image_transports: Counter[str] = Counter()  # data | http(s)
        self.max_image_side = 0
        self._seen_bodies: Counter[str] = Counter()  # attempts of header-less clients
        # Without served_models the server answers any model name; GET /v1/models lists the
        # stack's defaults and the names it has answered, as a server of those models would.
        self.asked_models: dict[str, None] = {}

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "probes": dict(self.probes),
            "served": self.served,
            "outcomes": dict(self.outcomes),
            "served_by_key": dict(self.served_by_key),
            "max_concurrent": self.max_inflight_seen,
            "image_transports": dict(self.image_transports),
            "max_image_side": self.max_image_side,
            "config": self.cfg.model_dump(),
        }

    def _slots_sem(self) -> asyncio.Semaphore:
        if self._slots is None or self._slot_count != self.cfg.slots:
            self._slots = asyncio.Semaphore(self.cfg.slots)
            self._slot_count = self.cfg.slots
        return self._slots

    # -- HTTP handlers ------------------------------------------------------------------------
    async def health(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "simulator": True})

    def served_models(self) -> list[str] | None:
        """Model ids served, or None when any name is answered."""
        raw = self.cfg.served_models
        return [m.strip() for m in raw.split(",") if m.strip()] if raw else None

    async def models(self, req: web.Request) -> web.Response:
        if self.cfg.api_key and req.headers.get("Authorization") != f"Bearer {self.cfg.api_key}":
            return self._error(401, "invalid API key", "authentication_error", Counter())
        # The names asked for sorted: the same list whatever order the requests came in.
        ids = self.served_models() or list(
            dict.fromkeys([*DEFAULT_MODELS.values(), *sorted(self.asked_models)])
        )
        card = {
            "object": "model",
            "created": CREATED_BASE,
            "owned_by": "lgt-simulator",
            "max_model_len": self.cfg.max_model_len,
        }
        return web.json_response(
            {"object": "list", "data": [{"id": i, "root": i, **card} for i in ids]}
        )

    async def version(self, _req: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def get_stats(self, _req: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def post_reset(self, _req: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def config(self, req: web.Request) -> web.Response:
        if req.method == "POST":
            patch = await req.json()
            for key, value in patch.items():
                if key not in SimConfig.model_fields:
                    return web.json_response({"error": f"unknown setting {key}"}, status=400)
                setattr(self.cfg, key, value)
        return web.json_response(self.cfg.model_dump())

    async def chat(self, req: web.Request) -> web.StreamResponse:
        generation = self._generation
        probe = PROBE_HEADER in req.headers  # no injected faults, counted apart
        tally = self.probes if probe else self.outcomes
        if not probe:
            self.received += 1
        key, attempt = _request_key(req.headers.get("X-Request-Id", ""))
        body, refused = await self._admit(req, probe, tally)
        if refused is not None:
            return refused
        if self.cfg.served_models is None and isinstance(body.get("model"), str):
            self.asked_models[body["model"]] = None
        if probe:
            payload = self._complete(body, self.digest(body))
            self.probes["200"] += 1
            return web.json_response(payload)
        self.admitted += 1  # counted on admission, so a limit holds with requests in flight
        self._note_images(body)
        digest = self.digest(body)
        if attempt is None:
            attempt = self._seen_bodies[digest]
            self._seen_bodies[digest] += 1
        fault = self._draw_fault(digest, attempt)
        failed = await self._fault_before_reply(req, fault)
        if failed is not None:
            return failed
        payload = await self._generate(body, digest)
        failed = self._fault_in_reply(fault, body, payload)
        if failed is not None:
            return failed
        # Served = answered on a connection still open, and not across a reset: a request
        # whose connection was cut (a crash, see BackgroundSimulator.crash) never reached
        # its client.
        open_ = req.transport is not None and not req.transport.is_closing()
        if generation == self._generation and open_:
            self._count_served(key)
        return web.json_response(payload)

    # -- helpers ------------------------------------------------------------------------------
    async def _admit(
        self, req: web.Request, probe: bool, tally: Counter[str]
    ) -> tuple[dict[str, Any], web.Response | None]:
        """The request body, or the error a server answers before generating anything."""
        try:
            body = await req.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}, self._error(400, "request body is not JSON", "bad_request", tally)
        if not isinstance(body.get("messages"), list) or not body.get("model"):
            return body, self._error(
                400, "'model' and 'messages' are required", "bad_request", tally
            )
        if self.cfg.api_key and req.headers.get("Authorization") != f"Bearer {self.cfg.api_key}":
            return body, self._error(401, "invalid API key", "authentication_error", tally)
        limit = self.cfg.down_after_served
        if self.cfg.down or (not probe and limit is not None and self.admitted >= limit):
            return body, self._error(503, "service unavailable", "overload", tally)
        return body, self._refusal(body, tally)

    async def _fault_before_reply(self, req: web.Request, fault: str | None) -> web.Response | None:
        """Faults that replace the reply (429, 500, a dropped connection); a timeout stalls."""
        if fault == "429":
            self.outcomes["429"] += 1
            return web.json_response(
                {"error": {"message": "rate limited", "type": "overload"}},
                status=429,
                headers={"Retry-After": str(self.cfg.retry_after_s)},
            )
        if fault == "500":
            return self._error(500, "internal error (injected)", "server_error")
        if fault == "drop":
            self.outcomes["drop"] += 1
            if req.transport is not None:
                req.transport.abort()
            return web.Response(status=500)
        if fault == "timeout":  # a stall on the way in: the client gives up first
            self.outcomes["timeout"] += 1
            await asyncio.sleep(self.cfg.timeout_sleep_s)
        return None

    async def _generate(self, body: dict[str, Any], digest: str) -> dict[str, Any]:
        """The reply, taking one of the server's slots for its latency and token time."""
        async with self._slots_sem():
            self.inflight += 1
            self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)
            try:
                payload = self._complete(body, digest)
                delay = self.cfg.latency_ms / 1000.0
                if self.cfg.tokens_per_s > 0:
                    delay += payload["usage"]["completion_tokens"] / self.cfg.tokens_per_s
                await asyncio.sleep(delay)
            finally:
                self.inflight -= 1
        return payload

    def _fault_in_reply(
        self, fault: str | None, body: dict[str, Any], payload: dict[str, Any]
    ) -> web.Response | None:
        """Faults that damage a generated reply: cut JSON (returned), or the payload changed in
        place (content truncated at `length`, or prose where a JSON schema was asked for)."""
        if fault == "malformed":
            self.outcomes["malformed"] += 1
            return web.Response(text=json.dumps(payload)[:40], content_type="application/json")
        if fault == "truncated":
            self.outcomes["truncated"] += 1
            for choice in payload["choices"]:
                content = choice["message"]["content"] or ""
                choice["message"]["content"] = content[: max(1, len(content) // 2)]
                choice["finish_reason"] = "length"
        elif fault == "invalid_json" and body.get("response_format"):
            self.outcomes["invalid_json"] += 1
            for choice in payload["choices"]:
                choice["message"]["content"] = "Sure! Here are the questions you asked for."
        return None

    def _count_served(self, key: str) -> None:
        self.served += 1
        self.outcomes["200"] += 1
        if key:
            self.served_by_key[key] += 1

    def _refusal(self, body: dict[str, Any], tally: Counter[str]) -> web.Response | None:
        """vLLM's 4xx for a request this server cannot take (model, modality, context)."""
        served = self.served_models()
        if served is not None and body["model"] not in served:
            return self._error(
                404, f"The model `{body['model']}` does not exist.", "NotFoundError", tally
            )
        if self.cfg.bad_words == "rejected" and "bad_words" in body:
            return self._error(
                400, "bad_words: Extra inputs are not permitted", "BadRequestError", tally
            )
        messages = json.dumps(body["messages"])  # serialised once: images and the marker
        images = messages.count('"image_url"')
        if images and self.cfg.modality == "text":
            return self._error(
                400, "At most 0 image(s) may be provided in one prompt.", "BadRequestError", tally
            )
        limit = self.cfg.max_model_len
        marker = self.cfg.context_too_long_marker
        if marker and marker in messages:
            return self._error(
                400,
                f"This model's maximum context length is {limit} tokens. However, you"
                " requested more tokens in the messages.",
                "BadRequestError",
                tally,
            )
        prompt = sum(len(text_of(m)) for m in body["messages"]) // 4 + 256 * images
        completion = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        if prompt + completion > limit:
            return self._error(
                400,
                f"This model's maximum context length is {limit} tokens. However, you"
                f" requested {prompt + completion} tokens ({prompt} in the messages,"
                f" {completion} in the completion). Please reduce the length of the"
                " messages or completion.",
                "BadRequestError",
                tally,
            )
        return None

    def _note_images(self, body: dict[str, Any]) -> None:
        for msg in body["messages"]:
            if not isinstance(msg.get("content"), list):
                continue
            for part in msg["content"]:
                url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) else ""
                if not url:
                    continue
                self.image_transports[url.split(":", 1)[0]] += 1
                size = image_size({"content": [part]})
                if size:
                    self.max_image_side = max(self.max_image_side, *size)

    def digest(self, body: dict[str, Any]) -> str:
        """What a reply is a function of: the body (images by identity) and the seed."""
        canonical = {**body, "messages": canonical_messages(body.get("messages"))}
        return sha256_hex(canonical_json(["lgt-simulator", self.cfg.seed, canonical]))

    def _draw_fault(self, digest: str, attempt: int) -> str | None:
        c = self.cfg
        u = seeded_unit("fault", digest, attempt)
        for name, rate in (
            ("429", c.fault_429),
            ("500", c.fault_500),
            ("timeout", c.fault_timeout),
            ("drop", c.fault_drop),
            ("malformed", c.fault_malformed),
            ("truncated", c.fault_truncated),
            ("invalid_json", c.fault_invalid_json),
        ):
            if u < rate:
                return name
            u -= rate
        return None

    def _error(
        self, status: int, message: str, kind: str, tally: Counter[str] | None = None
    ) -> web.Response:
        (self.outcomes if tally is None else tally)[str(status)] += 1
        return web.json_response(
            {"error": {"message": message, "type": kind, "code": status}, "object": "error"},
            status=status,
        )

    def _complete(self, body: dict[str, Any], digest: str) -> dict[str, Any]:
        if self.cfg.structured_output == "ignored":  # the reply as if none had been asked for
            body = {k: v for k, v in body.items() if k != "response_format"}
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 4096)
        prompt_chars = sum(len(text_of(m)) for m in body["messages"])
        messages = json.dumps(body["messages"])  # serialised once: images and the marker
        images = messages.count('"image_url"')
        choices, completion_tokens = [], 0
        for i in range(n):
            content, reasoning = self.world.reply(body, i)
            tokens = max(1, (len(content) + len(reasoning or "")) // 4)
            finish = "stop"
            if tokens > max_tokens:
                content = content[: max_tokens * 4]
                tokens, finish = max_tokens, "length"
            completion_tokens += tokens
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choices.append(
                {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            )
        prompt_tokens = prompt_chars // 4 + 256 * images
        return {
            "id": f"chatcmpl-sim-{digest[:32]}",
            "object": "chat.completion",
            # Derived from the request, not the clock: a replayed request gives the same bytes.
            "created": CREATED_BASE + int(digest[32:40], 16) % CREATED_SPAN,
            "model": MODEL_PREFIX + str(body["model"]),
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/version", self.version)
        app.router.add_get("/health", self.health)
        app.router.add_get("/sim/stats", self.get_stats)
        app.router.add_post("/sim/reset", self.post_reset)
        app.router.add_route("*", "/sim/config", self.config)
        return app


def _request_key(header: str) -> tuple[str, int | None]:
    """(request key, attempt) from the engine's X-Request-Id: lgt-<32 hex of the key>-<attempt>."""
    parts = header.split("-")
    if len(parts) == 3 and parts[0] == "lgt" and parts[2].isdigit():
        return parts[1], int(parts[2])
    return (parts[1] if len(parts) >= 3 and parts[0] == "lgt" else ""), None


def serve(host: str = "127.0.0.1", port: int = 8000, cfg: SimConfig | None = None) -> None:
    """Run the simulator in the foreground (`lgt sim serve`)."""
    sim = Simulator(cfg)
    log.warning(
        "LGT SIMULATOR on http://%s:%d/v1 — a test double, not a model; its output must not "
        "be published as model output",
        host,
        port,
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(sim.app(), host=host, port=port, access_log=None, print=None)


class BackgroundSimulator:
    """The simulator on a free localhost port in a daemon thread (demo, tests, benchmarks)."""

    def __init__(
        self, cfg: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.sim = Simulator(cfg)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lgt-simulator", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.sim.app(), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = self._site = web.TCPSite(self._runner, self.host, self.port)
        self._loop.run_until_complete(site.start())
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def crash(self) -> None:
        """What a killed server looks like to its clients: the port stops listening (new
        connections are refused) and every open connection is reset, so requests in flight
        get no answer (and are not counted). The counters stay readable; `revive` listens
        again on the same port."""

        async def _crash() -> None:
            assert self._runner is not None and self._site is not None
            await self._site.stop()
            for handler in self._runner.server.connections if self._runner.server else []:
                if handler.transport is not None:
                    handler.transport.abort()

        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(_crash(), self._loop).result(10)

    def revive(self) -> None:
        """Listen again on the same port after `crash` (same counters and settings)."""

        async def _listen() -> None:
            assert self._runner is not None
            self._site = web.TCPSite(self._runner, self.host, self.port)
            await self._site.start()

        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(_listen(), self._loop).result(10)

    def start(self) -> BackgroundSimulator:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("simulator did not start within 10s")
        log.warning("LGT SIMULATOR (test double, not a model) at %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
