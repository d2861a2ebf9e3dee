"""Preflight: check every endpoint the selected stages need before a run spends anything.

Per role (vlm, llm, reasoner) the selected stages call (lgt_ops.llm.needs):

1. Control plane, with the official `openai` client (once per endpoint, so its per-call CPU
   cost does not matter here; the hot path stays on the engine): the endpoint answers, the
   configured model is among `models.list()`, the model card's context (vLLM reports
   `max_model_len`) fits the largest request a stage sends, and the server version
   (vLLM's GET /version) when reported.
2. One tiny real request through the stages' own path (`RequestEngine` + `ChatRequest`): the
   VLM takes a small PNG in the configured transport (data URL or presigned URL), structured
   output (`response_format` json_schema) is honoured where a stage relies on it, `bad_words`
   is accepted where a stage sends it, and the reasoner's thinking is found where the expand
   stage reads it: `reasoning_content` (a reasoning parser) or inline before `</think>` (no
   parser). Which one is recorded; expand reads both.

The result is one row per role and replica (`RoleCheck`; every replica of a role is checked,
and a replica's problem names its URL): logged as a table, stored in the lineage DB
(`endpoint_preflight`, per pipeline run) and shown in the run summary. A replica that answers
but cannot serve the stages fails the preflight with one line naming the role, the replica,
what is wrong and what to set: `PreflightFailed` (permanent: Airflow does not retry it). A
replica that does not answer (refused, timed out, 5xx) is `down`: a warning, and the run goes
on with the others (the request engine takes it in later only once its GET /models lists the
model: lgt_ops.llm.replicas). Every replica of a role down is `EndpointDown` (transient: the
servers may still be starting).
"""

from __future__ import annotations

import json
import logging
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from lgt_ops import prompts
from lgt_ops.config import ROLES, EndpointSettings, Settings
from lgt_ops.failures import EXIT_USAGE, PermanentFailure
from lgt_ops.images import data_url, encode_for_request
from lgt_ops.llm.engine import RequestEngine, run_all
from lgt_ops.llm.errors import EndpointAuthError, EndpointDown
from lgt_ops.llm.needs import RoleNeed, role_needs
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.replicas import public_url
from lgt_ops.llm.request import CONTINUE, ChatRequest, image_part
from lgt_ops.storage import ObjectStore, S3Store

log = logging.getLogger(__name__)

PROBE_IMAGE_ID = "lgt-preflight-probe"
PROBE_IMAGE_KEY = "preflight/probe.png"
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"ready": {"type": "boolean"}},
    "required": ["ready"],
    "additionalProperties": False,
}
PROBE_BAD_WORDS = ["lgt-preflight-never-say"]
PROBE_HEADER = "X-Lgt-Probe"


class PreflightFailed(PermanentFailure, RuntimeError):
    """An endpoint cannot serve what the selected stages need; fix the setting it names."""

    exit_code = EXIT_USAGE


@dataclass
class RoleCheck:
    """One row of the preflight table."""

    role: str
    endpoint: str  # base URL without credentials
    model: str
    stages: list[str]
    server_version: str | None = None
    max_model_len: int | None = None
    needed_tokens: int | None = None  # the largest request of the selected stages
    capabilities: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None  # the probe request
    status: str = "ok"  # ok | failed | refused (credentials) | down (no answer: tolerated)
    problem: str | None = None

    def fail(self, problem: str, status: str = "failed") -> None:
        self.status = status
        self.problem = " ".join(problem.split())


@dataclass
class PreflightReport:
    checks: list[RoleCheck]

    @property
    def ok(self) -> bool:
        """Nothing to stop the run (down replicas of a role that has a good one are fine)."""
        return self.failure_line() is None

    def _all_down(self) -> list[RoleCheck]:
        """Down rows of roles where no replica passed."""
        good = {c.role for c in self.checks if c.status == "ok"}
        return [c for c in self.checks if c.status == "down" and c.role not in good]

    def _wrong(self) -> list[RoleCheck]:
        return [c for c in self.checks if c.status not in ("ok", "down")]

    def failure_line(self) -> str | None:
        problems = [c.problem for c in self._wrong() + self._all_down() if c.problem]
        return "; ".join(problems) or None

    def warnings(self) -> list[str]:
        """One line per down replica of a role that goes on with its other replicas."""
        return down_warnings(self.rows())

    def raise_if_failed(self) -> None:
        line = self.failure_line()
        if line is None:
            return
        statuses = {c.status for c in self._wrong()}
        if not statuses:  # only whole roles down: the servers may still be starting
            raise EndpointDown(line)
        if statuses == {"refused"}:
            raise EndpointAuthError(line)
        raise PreflightFailed(line)

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]


def down_warnings(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Warning lines for the down replicas of roles where another replica passed (stored
    rows or report rows)."""
    rows = list(rows)
    good = {r["role"] for r in rows if r["status"] == "ok"}
    return [
        f"warning: {r['problem']}; the run goes on with the other {r['role']} replicas"
        for r in rows
        if r["status"] == "down" and r["role"] in good and r.get("problem")
    ]


# -- running it ----------------------------------------------------------------------------------
def check(
    settings: Settings, stages: Iterable[str], store: ObjectStore | None = None
) -> PreflightReport:
    """Check each replica of each role the selected stages need; never raises for an
    endpoint's problem."""
    needs = role_needs(settings, stages)
    listings: dict[str, Any] = {}  # base URL -> control-plane answer (once per endpoint)
    checks = []
    for role, need in needs.items():
        for replica in settings.endpoint(role).replicas():  # every replica of the role
            checks.append(check_role(replica, need, settings, store, listings))
    report = PreflightReport(checks)
    log_table(report)
    return report


def check_role(
    ep: EndpointSettings,
    need: RoleNeed,
    settings: Settings,
    store: ObjectStore | None,
    listings: dict[str, Any] | None = None,
) -> RoleCheck:
    """One replica of a role (`ep` has a single base URL: see `EndpointSettings.replicas`)."""
    (url,) = ep.require_urls()
    row = RoleCheck(
        role=ep.role,
        endpoint=public_url(url),
        model=ep.model,
        stages=[s.stage for s in need.stages],
        needed_tokens=need.largest.tokens,
    )
    listings = {} if listings is None else listings
    try:
        if url not in listings:
            listings[url] = _control_plane(ep)
        served, version = listings[url]
    except EndpointDown as exc:
        row.fail(str(exc), "down")
        return row
    except EndpointAuthError as exc:
        row.fail(str(exc), "refused")
        return row
    except PreflightFailed as exc:
        row.fail(str(exc))
        return row
    row.server_version = version
    card = served.get(ep.model)
    if card is None:
        row.fail(
            f"preflight: {ep.role} endpoint {row.endpoint} does not serve model '{ep.model}'"
            f" (it serves: {', '.join(sorted(served)) or 'nothing'}); set"
            f" LGT_{ep.role.upper()}_MODEL (or the model in the extra of the Airflow connection"
            f" lgt_{ep.role}, or the run parameter {ep.role}_model) to the served name, or"
            f" point LGT_{ep.role.upper()}_BASE_URL at the server that has it"
        )
        return row
    row.capabilities["model_listed"] = True
    row.max_model_len = _int_or_none(card.get("max_model_len"))
    problems = _context_problems(ep, need, row.max_model_len)
    try:
        problems += _probe(ep, need, settings, store, row)
    except _NoAnswer as exc:
        row.fail(f"preflight: {ep.role} endpoint {row.endpoint}: {exc}", "down")
        return row
    if problems:
        row.fail(f"preflight: {ep.role} endpoint {row.endpoint}: " + "; ".join(problems))
    return row


def _context_problems(ep: EndpointSettings, need: RoleNeed, context: int | None) -> list[str]:
    big = need.largest
    if context is None or big.tokens <= context:
        return []
    return [
        f"model '{ep.model}' has a context of {context} tokens but the"
        f" {big.stage} stage sends requests of up to {big.tokens} tokens"
        f" ({big.prompt_tokens} prompt + {big.max_tokens} max_tokens); start the server"
        f" with a larger context (vLLM --max-model-len {_round_up(big.tokens)}) or serve a"
        " model that has one"
    ]


# -- control plane (official client) -------------------------------------------------------------
def _control_plane(ep: EndpointSettings) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(model id -> model card, server version or None)."""
    import openai

    (url,) = ep.require_urls()
    key = ep.api_key.get_secret_value() if ep.api_key is not None else "EMPTY"
    client = openai.OpenAI(
        base_url=url,
        api_key=key,
        max_retries=1,
        timeout=openai.Timeout(30.0, connect=ep.connect_timeout_s),
    )
    where = f"preflight: {ep.role} endpoint {public_url(url)}"
    try:
        cards = {m.id: m.model_dump() for m in client.models.list()}
    except openai.APIConnectionError as exc:
        raise EndpointDown(
            f"{where} does not answer ({type(exc).__name__}: {exc.__cause__ or exc}); check"
            f" that the server is up (it may still be loading the model) and"
            f" LGT_{ep.role.upper()}_BASE_URL (or the Airflow connection lgt_{ep.role})"
        ) from exc
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise EndpointAuthError(
            f"{where} refused credentials (HTTP {exc.status_code}); set"
            f" LGT_{ep.role.upper()}_API_KEY (or the password of the Airflow connection"
            f" lgt_{ep.role}) to the key the server expects"
        ) from exc
    except openai.InternalServerError as exc:  # 5xx: a server in trouble, not a wrong one
        raise EndpointDown(
            f"{where} does not answer (GET /models: HTTP {exc.status_code}); check that the"
            " server is up (it may still be loading the model)"
        ) from exc
    except openai.APIStatusError as exc:
        raise PreflightFailed(
            f"{where}: GET /models answered HTTP {exc.status_code}; set"
            f" LGT_{ep.role.upper()}_BASE_URL to the server's OpenAI-compatible base URL"
            " (ending in /v1)"
        ) from exc
    return cards, _server_version(client, url)


def _server_version(client: Any, url: str) -> str | None:
    """vLLM's GET /version (beside /v1); None when the server does not report one."""
    import openai

    root = url[: -len("/v1")] if url.endswith("/v1") else url
    try:
        answer = client.get(root + "/version", cast_to=object)
    except (openai.APIError, ValueError):
        return None
    version = answer.get("version") if isinstance(answer, dict) else None
    return str(version) if version else None


# -- the probe (the stages' own path) ------------------------------------------------------------
class ProbeImage:
    """A 32 x 32 PNG (the smallest side Qwen2-VL accepts is 28), as the stages send images."""

    def __init__(self, settings: Settings, store: ObjectStore | None) -> None:
        self.spec = settings.image_spec
        self.store = store

    def url_for(self, image_id: str) -> str:
        png = probe_png()
        if self.spec.transport == "presigned_url" and isinstance(self.store, S3Store):
            self.store.put(PROBE_IMAGE_KEY, png)  # the same bytes every time
            return self.store.presigned_url(PROBE_IMAGE_KEY)
        return data_url(encode_for_request(png, self.spec), self.spec)

    @property
    def transport(self) -> str:
        presigned = self.spec.transport == "presigned_url" and isinstance(self.store, S3Store)
        return "presigned_url" if presigned else "data_url"


def probe_png(side: int = 32) -> bytes:
    """A plain red square, written by hand so the probe needs no image library."""
    row = b"\x00" + b"\xff\x00\x00" * side
    raw = zlib.compress(row * side)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def probe_request(ep: EndpointSettings, need: RoleNeed, settings: Settings) -> ChatRequest:
    """One small request exercising what this role's stages rely on."""
    extra: dict[str, Any] = {}
    if need.bad_words:
        extra["bad_words"] = PROBE_BAD_WORDS
    if need.thinking:  # as expand sends it: continue the pre-filled thinking after a cue
        t = prompts.load("expand")
        messages = t.render(
            description="Image size: 32 x 32 pixels.\n\nImage description: a plain red square.",
            question="What colour is the square?",
            options="(A) red\n(B) blue",
            thinking="The description says the square is red, so the answer should be (A).",
            cue="Wait,",
        )
        return ChatRequest(
            role=ep.role,
            model=ep.model,
            template_id="preflight",
            template_version="1",
            messages=messages,
            sampling={"temperature": 0.0, "max_tokens": settings.method.expand_max_tokens},
            extra_body={**CONTINUE, **extra},
            allow_truncated=True,
        )
    ask = "This is a connectivity check."
    if need.structured:
        ask += ' Reply with the JSON object {"ready": true}.'
    else:
        ask += " Reply with one word."
    content: Any = ask
    if need.image:
        content = [image_part(PROBE_IMAGE_ID), {"type": "text", "text": ask}]
    return ChatRequest(
        role=ep.role,
        model=ep.model,
        template_id="preflight",
        template_version="1",
        messages=[{"role": "user", "content": content}],
        sampling={"temperature": 0.0, "max_tokens": 64, "seed": 0},
        response_schema=PROBE_SCHEMA if need.structured else None,
        schema_name="preflight" if need.structured else None,
        extra_body=extra,
        image_spec=settings.image_spec if need.image else None,
        allow_truncated=not need.structured,
    )


class _NoAnswer(Exception):
    """The probe got no usable answer (connection, timeout, 5xx): the replica is down."""


def _probe_endpoint(ep: EndpointSettings) -> EndpointSettings:
    """The endpoint's settings for one probe: no regeneration, few retries, short waits."""
    return ep.model_copy(
        update={
            "max_inflight": 1,
            "min_inflight": 1,
            "adaptive": False,
            "max_attempts": 2,
            "max_regenerations": 0,
            "down_after_s": min(ep.down_after_s, 30.0),
            "timeout_s": min(ep.timeout_s, 120.0),
        }
    )


def _probe(
    ep: EndpointSettings,
    need: RoleNeed,
    settings: Settings,
    store: ObjectStore | None,
    row: RoleCheck,
) -> list[str]:
    """Send the probe; fill the row's capabilities; the problems found."""
    images = ProbeImage(settings, store) if need.image else None
    # The header marks a check, not work: a server ignores it, the simulator counts it apart.
    engine = RequestEngine(_probe_endpoint(ep), images=images, headers={PROBE_HEADER: "1"})
    started = time.monotonic()
    try:
        (outcome,) = run_all(engine, [probe_request(ep, need, settings)])
    except EndpointDown as exc:
        raise _NoAnswer(f"the probe request got no answer ({exc})") from exc
    except EndpointAuthError:
        return [f"chat requests refused credentials; set LGT_{ep.role.upper()}_API_KEY"]
    row.latency_ms = round((time.monotonic() - started) * 1000, 1)
    return _read_probe(ep, need, outcome, row, images)


def _read_probe(
    ep: EndpointSettings,
    need: RoleNeed,
    outcome: Outcome,
    row: RoleCheck,
    images: ProbeImage | None,
) -> list[str]:
    caps = row.capabilities
    detail = server_message(outcome.error_detail)
    if outcome.status == "rejected" and outcome.http_status is None:  # never sent
        return [
            f"the probe image could not be prepared ({detail or outcome.error_class}); check"
            " the store (LGT_STORE_URL, LGT_S3_ENDPOINT_URL) or send images as data URLs"
        ]
    if outcome.status == "rejected":
        return _refused(ep, need, outcome, caps, images)
    if outcome.status == "failed":  # resets, timeouts, 5xx on every attempt
        raise _NoAnswer(f"the probe request failed ({outcome.error_class}: {detail})")
    if images is not None:
        caps["image"] = images.transport
    if need.bad_words:
        caps["bad_words"] = True
    if need.structured:
        caps["json_schema"] = outcome.ok
        if not outcome.ok:
            return [
                f"structured output (response_format json_schema) is not honoured ({detail});"
                f" {_GUIDED}"
            ]
    if need.thinking:
        return _read_thinking(ep, outcome, caps)
    return []


def _refused(
    ep: EndpointSettings,
    need: RoleNeed,
    outcome: Outcome,
    caps: dict[str, Any],
    images: ProbeImage | None,
) -> list[str]:
    """What a 4xx to the probe means: the part of the request the server refused, by name."""
    detail = server_message(outcome.error_detail)
    refused = f"HTTP {outcome.http_status}: {detail}"
    if need.image and "image" in detail.lower():
        caps["image"] = False
        fetch = ""
        if images is not None and images.transport == "presigned_url":
            fetch = (
                ", or make the store's presigned URLs reachable from the model server"
                " (LGT_S3_ENDPOINT_URL) or send images as data URLs"
            )
        return [
            f"model '{ep.model}' does not take image input ({refused}); serve a"
            " vision-language model there (e.g. Qwen/Qwen2.5-VL-7B-Instruct, with vLLM"
            f" --limit-mm-per-prompt allowing one image) or set LGT_{ep.role.upper()}_MODEL /"
            f" _BASE_URL to one{fetch}"
        ]
    if need.bad_words and "bad_words" in detail:
        caps["bad_words"] = False
        return [
            f"the server refuses vLLM's bad_words, which the expand stage sends ({refused});"
            " serve the reasoner with a vLLM whose sampling parameters include bad_words, or"
            " set the run parameter expand_bad_words to an empty list (none sent; the"
            " filter's leaks_metadata rule still applies)"
        ]
    if need.structured and "response_format" in detail:
        caps["json_schema"] = False
        return [
            f"structured output (response_format json_schema) is refused ({refused}); {_GUIDED}"
        ]
    return [
        f"the probe request was refused ({refused}); check LGT_{ep.role.upper()}_MODEL and the"
        " server's options"
    ]


_GUIDED = (
    "enable guided decoding on the server (vLLM: --guided-decoding-backend) or serve a model"
    " that follows it"
)


def thinking_mode(message: dict[str, Any], finish_reason: str | None) -> str:
    """Where a reasoner's thinking came back: reasoning_content | inline | none | inconclusive."""
    if message.get("reasoning_content") or message.get("reasoning"):
        return "reasoning_content"
    if "</think>" in (message.get("content") or ""):
        return "inline"
    return "inconclusive" if finish_reason == "length" else "none"


def _read_thinking(ep: EndpointSettings, outcome: Outcome, caps: dict[str, Any]) -> list[str]:
    choice = outcome.choices[0] if outcome.choices else {}
    mode = thinking_mode(choice.get("message") or {}, choice.get("finish_reason"))
    caps["thinking"] = mode
    if mode != "none":  # expand reads both places; a cut-off probe proves nothing either way
        return []
    return [
        f"model '{ep.model}' ended its reply without thinking (no reasoning_content and no"
        " closing </think>), so every expansion would be unparseable; serve a reasoning model"
        " (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, optionally with vLLM"
        f" --reasoning-parser deepseek_r1) or set LGT_{ep.role.upper()}_MODEL to one"
    ]


# -- reporting -----------------------------------------------------------------------------------
def capabilities_text(caps: dict[str, Any]) -> str:
    parts = []
    if "image" in caps:
        parts.append(f"image={caps['image'] or 'no'}")
    if "json_schema" in caps:
        parts.append(f"json_schema={'yes' if caps['json_schema'] else 'no'}")
    if "thinking" in caps:
        parts.append(f"thinking={caps['thinking']}")
    if "bad_words" in caps:
        parts.append(f"bad_words={'yes' if caps['bad_words'] else 'no'}")
    return " ".join(parts) or ("model listed" if caps.get("model_listed") else "-")


TABLE_HEADER = ("role", "endpoint", "model", "version", "context", "needed", "capabilities",
                "probe ms", "status")  # fmt: skip


def table_rows(rows: Iterable[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = [TABLE_HEADER]
    for r in rows:
        caps = r["capabilities"]
        out.append(
            (
                r["role"],
                r["endpoint"],
                r["model"],
                r.get("server_version") or "-",
                str(r["max_model_len"] or "?"),
                str(r["needed_tokens"] or "-"),
                capabilities_text(json.loads(caps) if isinstance(caps, str) else caps),
                f"{r['latency_ms']:.0f}" if r.get("latency_ms") is not None else "-",
                r["status"],
            )
        )
    return out


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    table = table_rows(rows)
    widths = [max(len(r[i]) for r in table) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def log_table(report: PreflightReport) -> None:
    if not report.checks:
        log.info("preflight: the selected stages call no endpoint")
        return
    # INFO: the CLI prints the table itself and a failure is raised as one line.
    log.info("endpoint preflight:\n%s", format_table(report.rows()))
    warned = report.warnings()
    for line in warned:
        log.warning("%s", line)
    for c in report.checks:
        if c.problem and not any(c.problem in w for w in warned):
            log.info("%s", c.problem)


def server_message(detail: str | None) -> str:
    """The message of an OpenAI-style error body (or the text itself), on one short line."""
    text = detail or ""
    try:
        body = json.loads(text)
        error = body.get("error") if isinstance(body, dict) else None
        text = (error.get("message") if isinstance(error, dict) else None) or body["message"]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return " ".join(str(text).split())[:200]


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _round_up(tokens: int) -> int:
    return -(-tokens // 1024) * 1024


# -- the lineage DB ------------------------------------------------------------------------------
_COLUMNS = ("role", "endpoint", "model", "stages", "server_version", "max_model_len",
            "needed_tokens", "capabilities", "latency_ms", "status", "problem")  # fmt: skip


def record(db: Any, run_id: str, report: PreflightReport) -> None:
    """Store the table (a row per role and replica) for this pipeline run; a repeated
    preflight (a retry) replaces it."""
    from sqlalchemy import text

    rows = [
        {
            **{k: r[k] for k in _COLUMNS},
            "stages": ",".join(r["stages"]),
            "capabilities": json.dumps(r["capabilities"], sort_keys=True),
            "run_id": run_id,
        }
        for r in report.rows()
    ]
    with db.begin() as conn:
        conn.execute(text("DELETE FROM endpoint_preflight WHERE run_id = :r"), {"r": run_id})
        if rows:
            cols = ("run_id", *_COLUMNS)
            conn.execute(
                text(
                    f"INSERT INTO endpoint_preflight ({', '.join(cols)})"
                    f" VALUES ({', '.join(':' + c for c in cols)})"
                ),
                rows,
            )


def stored(db: Any, run_id: str) -> list[dict[str, Any]]:
    """The table stored for a pipeline run (empty when no preflight ran)."""
    from sqlalchemy import text

    with db.connect() as conn:
        result = conn.execute(
            text(
                f"SELECT {', '.join(_COLUMNS)}, checked_at FROM endpoint_preflight"
                " WHERE run_id = :r"
            ),
            {"r": run_id},
        )
        rows = [dict(r._mapping) for r in result]
    order = {role: n for n, role in enumerate(ROLES)}
    return sorted(rows, key=lambda r: (order.get(r["role"], len(order)), r["endpoint"]))
