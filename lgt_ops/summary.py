"""The end-of-run summary printed by `lgt run` and `lgt demo`."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from sqlalchemy import text

from lgt_ops import goodput

if TYPE_CHECKING:
    from lgt_ops.env import StageEnv
    from lgt_ops.params import RunParams
    from lgt_ops.pipeline import RunSummary


def _table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out.write(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + "\n"
        )
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _preflight_section(env: StageEnv, run_id: str, out: TextIO) -> None:
    """What the endpoint preflight found for this run (lgt_ops.llm.preflight)."""
    from lgt_ops.llm import preflight

    rows = preflight.stored(env.db, run_id)
    if rows:
        out.write("\nendpoints (preflight)\n\n")
        out.write(preflight.format_table(rows) + "\n")
        for line in preflight.down_warnings(rows):
            out.write(line + "\n")


def _checks_section(env: StageEnv, run_id: str, out: TextIO) -> None:
    """Questions this run's checks removed: answerable without the image (blind) and
    composed questions not harder than their parents (harden)."""
    with env.db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT stage, COUNT(*), SUM(CASE WHEN kept THEN 0 ELSE 1 END)"
                " FROM question_checks WHERE run_id = :r GROUP BY stage ORDER BY stage"
            ),
            {"r": run_id},
        ).all()
    if rows:
        out.write("\nquestion checks (this run)\n\n")
        table = [("check", "checked", "rejected", "rate")]
        for stage, n, bad in rows:
            table.append((stage, str(n), str(bad or 0), f"{(bad or 0) / n:.1%}"))
        _table(table, out)


def print_summary(
    env: StageEnv, params: RunParams, summary: RunSummary, out: TextIO | None = None
) -> None:
    import sys

    out = out or sys.stdout
    out.write(f"\nrun {summary.run_id}\n\n")
    rows = [("stage", "in", "skipped", "out", "rejected", "requests", "ledger hits", "tokens")]
    scan = summary.scan
    if scan:
        rows.append(
            (
                "scan",
                str(scan.get("listed", 0)),
                "",
                str(scan.get("pending", 0)),
                str(scan.get("problems", 0)),
                "",
                "",
                "",
            )
        )
    with env.db.connect() as conn:
        for r in conn.execute(
            text(
                "SELECT stage, SUM(items_in), SUM(items_skipped), SUM(items_out),"
                " SUM(items_rejected), SUM(requests_sent), SUM(cache_hits),"
                " SUM(prompt_tokens + completion_tokens), MIN(started_at) AS first"
                " FROM stage_runs WHERE run_id = :r AND stage <> 'scan'"
                " GROUP BY stage ORDER BY first"
            ),
            {"r": summary.run_id},
        ):
            rows.append(tuple(str(v or 0) for v in r[:8]))
        reasons = conn.execute(
            text(
                "SELECT stage, reason, COUNT(*) FROM rejections WHERE run_id = :r"
                " GROUP BY stage, reason ORDER BY stage, COUNT(*) DESC"
            ),
            {"r": summary.run_id},
        ).all()
    _table(rows, out)
    if reasons:
        out.write("\nrejected by reason (this run)\n\n")
        _table([("stage", "reason", "count")] + [(s, r, str(n)) for s, r, n in reasons], out)
    _checks_section(env, summary.run_id, out)
    _preflight_section(env, summary.run_id, out)
    rel = summary.release
    with env.db.connect() as conn:
        goodput.write_summary(conn, summary.run_id, rel.manifest if rel else None, out, _table)
    if rel is not None:
        flag = "  (SIMULATED: test data only)" if rel.manifest["simulated"] else ""
        out.write(f"\nrelease {rel.release_id}{flag}\n")
        out.write(f"  location: {rel.uri}\n")
        out.write(f"  content sha256: {rel.content_sha256}\n")
        for split, n in sorted(rel.counts.items()):
            out.write(f"  {split}: {n} rows\n")
    elif params.dry_run:
        out.write("\ndry run: nothing was called or published\n")
