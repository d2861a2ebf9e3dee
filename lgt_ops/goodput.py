"""Goodput: what the model requests of a run or a release bought, stage by stage.

Definitions (the SQL views of sql/migrations/0008_goodput_views.sql compute the same):

- requests: distinct model requests. For a run, the ledger rows (`model_requests`) its
  stage made: answered, invalid or failed, each once however often it was retried. For a
  release, the requests under the release's stage fingerprints for its image set: those
  behind its outputs and behind its rejections, whichever run paid for them.
- http attempts / ledger hits (runs only): HTTP calls that reached an endpoint (retries and
  regenerations included) / requests answered from the ledger instead of paid again.
- tokens in / out: the prompt / completion tokens the endpoint reported for those requests.
- accepted: outputs the stage committed (a run: `stage_runs.items_out`, all attempts; a
  release: the stage's outputs for its image set). For the whole release: its rows.
- rejected: rejections the stage recorded; a stage's decided output is accepted + rejected.
- per 1k requests = 1000 * accepted / requests; per 1M tokens = 1e6 * accepted / tokens;
  undefined (shown as "-") when nothing was asked, e.g. a re-run answered from the ledger.
- removal share of a filter (rejection reason) = its rejections / the stage's decided output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from sqlalchemy import Connection, text

from lgt_ops.params import SHARD_STAGES

_ORDER = {stage: n for n, stage in enumerate(("ingest", *SHARD_STAGES))}
FIGURES = ("requests", "prompt_tokens", "completion_tokens", "accepted", "rejected")


@dataclass
class StageGoodput:
    stage: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted: int = 0
    rejected: int = 0
    http_attempts: int | None = None  # runs only
    ledger_hits: int | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def per_1k_requests(self) -> float | None:
        return per(1000, self.accepted, self.requests)

    @property
    def per_m_tokens(self) -> float | None:
        return per(1_000_000, self.accepted, self.tokens)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "stage"}
        return d | {
            "accepted_per_1k_requests": _round(self.per_1k_requests),
            "accepted_per_m_tokens": _round(self.per_m_tokens),
        }


def per(scale: int, accepted: int, spent: int) -> float | None:
    """accepted per `scale` units spent; None when nothing was spent (no division by 0)."""
    return scale * accepted / spent if spent else None


def share(removed: int, decided: int) -> float | None:
    return removed / decided if decided else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# -- a run -------------------------------------------------------------------------------------
def run_goodput(conn: Connection, run_id: str) -> list[StageGoodput]:
    """Per stage of `run_id`, from v_run_goodput, in pipeline order."""
    rows = conn.execute(
        text("SELECT * FROM v_run_goodput WHERE run_id = :r AND stage <> 'scan'"), {"r": run_id}
    ).mappings()
    rows = sorted(rows, key=lambda r: (_ORDER.get(r["stage"], len(_ORDER)), r["stage"]))
    return [
        StageGoodput(
            r["stage"],
            **{k: int(r[k]) for k in FIGURES},
            http_attempts=int(r["http_attempts"]),
            ledger_hits=int(r["ledger_hits"]),
        )
        for r in rows
    ]


def run_removals(conn: Connection, run_id: str) -> list[tuple[str, str, int, int]]:
    """(stage, reason, removed, decided) of `run_id`, from v_run_removals."""
    rows = conn.execute(
        text(
            "SELECT stage, reason, removed, decided FROM v_run_removals WHERE run_id = :r"
            " ORDER BY stage, removed DESC, reason"
        ),
        {"r": run_id},
    ).all()
    return [(r[0], r[1], int(r[2]), int(r[3])) for r in rows]


def total(stages: list[StageGoodput], accepted: int, name: str = "total") -> StageGoodput:
    """All stages' requests and tokens, against `accepted` final rows."""
    t = StageGoodput(name, accepted=accepted)
    for s in stages:
        t.requests += s.requests
        t.prompt_tokens += s.prompt_tokens
        t.completion_tokens += s.completion_tokens
        t.rejected += s.rejected
        if s.http_attempts is not None:
            t.http_attempts = (t.http_attempts or 0) + s.http_attempts
            t.ledger_hits = (t.ledger_hits or 0) + (s.ledger_hits or 0)
    return t


# -- text and Markdown -------------------------------------------------------------------------
def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table_rows(stages: list[StageGoodput], with_calls: bool) -> list[tuple[str, ...]]:
    head = ("stage", "requests")
    head += ("http attempts", "ledger hits") if with_calls else ()
    head += ("tokens in", "tokens out", "accepted", "rejected", "per 1k requests", "per 1M tokens")
    rows = [head]
    for s in stages:
        row = (s.stage, f"{s.requests:,}")
        if with_calls:
            row += (f"{s.http_attempts or 0:,}", f"{s.ledger_hits or 0:,}")
        row += (
            f"{s.prompt_tokens:,}",
            f"{s.completion_tokens:,}",
            f"{s.accepted:,}",
            f"{s.rejected:,}",
            fmt_ratio(s.per_1k_requests),
            fmt_ratio(s.per_m_tokens),
        )
        rows.append(row)
    return rows


def removal_rows(removals: list[tuple[str, str, int, int]]) -> list[tuple[str, ...]]:
    rows = [("stage", "filter (reason)", "removed", "of output", "share")]
    rows += [(s, r, f"{n:,}", f"{d:,}", fmt_share(share(n, d))) for s, r, n, d in removals]
    return rows


def markdown(rows: list[tuple[str, ...]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first `text_columns` columns left-aligned, numbers right."""
    rule = "|" + "---|" * text_columns + "---:|" * (len(rows[0]) - text_columns)
    out = ["| " + " | ".join(rows[0]) + " |", rule]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return out


def write_summary(
    conn: Connection,
    run_id: str,
    manifest: dict[str, Any] | None,
    out: TextIO,
    table: Callable[[list[tuple[str, ...]], TextIO], None],
) -> None:
    """The goodput sections of the end-of-run summary (`table` prints aligned rows): the
    run's, and the release's when the run published one."""
    stages = run_goodput(conn, run_id)
    if stages:
        out.write("\ngoodput (this run; requests = distinct model requests it made)\n\n")
        rows = sum(v["rows"] for v in manifest["splits"].values()) if manifest else 0
        label = "total (release rows)" if manifest else "total"
        lines = table_rows([*stages, total(stages, rows, label)], with_calls=True)
        if manifest is None:  # no release: no final rows to rate the whole run by
            last = lines[-1]
            lines[-1] = (*last[:-4], "", last[-3], "-", "-")
        table(lines, out)
        removals = run_removals(conn, run_id)
        if removals:
            out.write("\nshare of each stage's output removed, by filter (this run)\n\n")
            table(removal_rows(removals), out)
    release = release_stages(manifest) if manifest else []
    if release:
        out.write(
            f"\ngoodput of release {manifest['release_id']} (requests behind its image set"
            " under its fingerprints, rejected work included; 'release': all its rows)\n\n"
        )
        table(table_rows(release, with_calls=False), out)


def release_stages(manifest: dict[str, Any]) -> list[StageGoodput]:
    figures = (manifest.get("counts") or {}).get("goodput") or {}
    return [
        StageGoodput(stage, **{k: int(v.get(k, 0)) for k in FIGURES})
        for stage, v in (figures.get("stages") or {}).items()
    ]


def card_section(manifest: dict[str, Any]) -> list[str]:
    """The dataset card's "Goodput" section, from the manifest's counts."""
    stages = release_stages(manifest)
    if not stages:
        return []
    counts = manifest.get("counts") or {}
    lines = [
        "## Goodput",
        "",
        "Per stage: the model requests made under this release's stage fingerprints for its"
        " images (including the requests behind rejected items), the tokens the endpoints"
        " reported for them, the stage's accepted outputs and rejections; `release` is the"
        " whole: every request and token against the release's rows.",
    ]
    if manifest.get("simulated"):
        lines += ["Token counts are the simulator's (a test double), not a model's."]
    lines += ["", *markdown(table_rows(stages, with_calls=False)), ""]
    decided = {s.stage: s.accepted + s.rejected for s in stages}
    removals = [
        (stage, reason, n, decided.get(stage, 0))
        for stage, reasons in sorted((counts.get("rejections") or {}).items())
        for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    if removals:
        lines += ["Share of each stage's output (accepted + rejected) each filter removed:", ""]
        lines += [*markdown(removal_rows(removals), text_columns=2), ""]
    return lines
