"""A release's quality figures: what makes the data right (METHOD.md), measured on its rows.

Each check is a small function over the release's rows (as the Parquet files hold them) and,
for stage 2, the parent questions and object labels from the lineage DB. A check gives a
`Figure`: the measured value, the largest value it may take, the population it was measured
on, and, when it fails, the first offending item and why. `lgt_ops.release.validate` loads
the rows and runs every check; the figures go into the manifest, the card's "Quality" section
and the `release_quality` table.

Counts (invalid questions, ill-posed chains, leaked traces, ...) must be 0. Uniformity (the
correct letter, and the correct value's rank among numeric options) is the largest deviation
of a share from the share expected of a fair layout; it may reach `tolerance` (2 %), or, on a
sample too small to show 2 %, three standard errors of that share (so a 50-question demo is
not failed by chance); under 30 questions a scope is shown but not judged. A fair letter is
1/k; a fair value rank is 1/f over the f ranks the correct value can take (a count of 1 among
non-negative options is 1st or 2nd), so stage-1 counts are judged against that expectation,
and their raw deviation from 1/k is shown, not judged (`value_rank_raw_deviation`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection

from lgt_ops.db.repo import insert_ignore
from lgt_ops.questions import LETTERS
from lgt_ops.traces import leaks

TOLERANCE = 0.02
MIN_JUDGED = 30  # fewer draws than this cannot tell a skew from chance: shown, not judged
_FINAL = re.compile(r"</think>\s*Answer:\s*([A-H])\s*$")


def unjudged(metric: str, max_allowed: float) -> bool:
    """A deviation allowed to reach 100 % is shown, not judged (too few questions, or a raw
    figure): the card and `lgt release validate` say so instead of printing the limit."""
    return metric.endswith("_deviation") and max_allowed >= 1.0


@dataclass(frozen=True)
class Figure:
    metric: str
    scope: str  # all | stage1 | stage2 | skill:<skill> | op:<operator> | a split name
    value: float
    max_allowed: float
    n: int  # the rows (questions, traces, ...) it was measured on
    detail: str | None = None  # the first offending item and why, when it fails

    @property
    def passed(self) -> bool:
        return self.value <= self.max_allowed + 1e-12

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Figure:
        return cls(d["metric"], d["scope"], d["value"], d["max_allowed"], d["n"], d.get("detail"))


def count_figure(metric: str, scope: str, n: int, problems: list[str]) -> Figure:
    """A count that must be zero; the detail names the first problem and how many there are."""
    detail = None
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        detail = problems[0] + more
    return Figure(metric, scope, float(len(problems)), 0.0, n, detail)


Pick = tuple[int, int] | tuple[int, int, int]  # (position, k) or (position, k, feasible)


def expected_shares(picks: Sequence[Pick]) -> tuple[list[float], list[float]]:
    """Per position: the share a fair layout gives it, and that share's standard error. A pick
    (position, k, f) could only be at positions 0..f-1 (1/f each); (position, k) at any."""
    n = len(picks)
    k = max((p[1] for p in picks), default=0)
    mean, var = [0.0] * k, [0.0] * k
    for pick in picks:
        f = pick[2] if len(pick) > 2 else pick[1]  # type: ignore[misc]
        for pos in range(f):
            mean[pos] += 1 / f
            var[pos] += (1 / f) * (1 - 1 / f)
    return [m / n for m in mean], [math.sqrt(v) / n for v in var]


def deviation_figure(
    metric: str,
    scope: str,
    picks: Sequence[Pick],
    tolerance: float = TOLERANCE,
    judged: bool = True,
) -> Figure:
    """Largest |share - expected share| over the positions 0..k-1, from (position, k) picks
    (expected 1/k) or (position, k, feasible) picks; `judged=False`: shown (max 100 %)."""
    n = len(picks)
    k = max((p[1] for p in picks), default=0)
    shares = Counter(p[0] for p in picks)
    expected, se = expected_shares(picks)
    worst, at = 0.0, 0
    for pos in range(k):
        dev = abs(shares.get(pos, 0) / n - expected[pos])
        if dev > worst:
            worst, at = dev, pos
    limit = 1.0
    if judged and n >= MIN_JUDGED and k >= 2:
        limit = max(tolerance, 3 * max(se))
    detail = None
    if worst > limit:
        detail = f"position {at + 1} of {k} holds {shares.get(at, 0)} of {n} correct answers"
        if abs(expected[at] - 1 / k) > 1e-9:
            detail += f", {expected[at]:.1%} expected"
    return Figure(metric, scope, round(worst, 6), round(limit, 6), n, detail)


# -- questions ---------------------------------------------------------------------------------
def mcq_problem(row: dict[str, Any], n_options: int) -> str | None:
    """Why a question row is not a valid multiple-choice question, if it is not."""
    opts = [str(o).strip() for o in row.get("options") or []]
    if len(opts) != n_options:
        return f"{len(opts)} options, want {n_options}"
    if any(not o for o in opts):
        return "an option is empty"
    if len({" ".join(o.lower().split()) for o in opts}) != len(opts):
        return "options repeat"
    letter = row.get("answer") or ""
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        return f"answer letter {letter!r} is not one of {LETTERS[:n_options]}"
    if opts[LETTERS.index(letter)] != str(row.get("answer_text") or "").strip():
        return f"option {letter} is not the answer {row.get('answer_text')!r}"
    return None


def number(text: str) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def value_rank(row: dict[str, Any]) -> int | None:
    """The correct value's rank (0 = smallest) among numeric options; None if not numeric."""
    values = [number(o) for o in row.get("options") or []]
    if not values or any(v is None for v in values) or len(set(values)) != len(values):
        return None
    correct = number(row.get("answer_text") or "")
    return sorted(values).index(correct) if correct in values else None  # type: ignore[arg-type]


def feasible_ranks(row: dict[str, Any]) -> int:
    """How many ranks the correct value can take among the options: among k distinct
    non-negative integers a value v has at most v below it (a count of 1 is 1st or 2nd)."""
    k = len(row.get("options") or [])
    values = [number(o) for o in [*(row.get("options") or []), row.get("answer_text") or ""]]
    if any(v is None or v < 0 or v != int(v) for v in values):
        return k
    return min(int(values[-1]), k - 1) + 1  # type: ignore[arg-type]


def scopes(row: dict[str, Any]) -> list[str]:
    """The groups a question counts in: all, its stage, and its operator (stage 2) or its
    skill (stage 1), so a shortcut is traced to what makes it."""
    out = ["all", f"stage{row['stage']}"]
    if row.get("operator"):
        out.append(f"op:{row['operator']}")
    elif row.get("skill"):
        out.append(f"skill:{row['skill']}")
    return out


def question_figures(
    questions: Iterable[dict[str, Any]],
    n_options: int,
    stage2_ranks: Mapping[str, int] | None = None,
    tolerance: float = TOLERANCE,
) -> list[Figure]:
    """Structural validity, and letter and value-rank uniformity per scope. A stage-1 value
    rank is read from numeric options and judged against the ranks its value can take; a
    composed question's comes from `stage2_ranks` (the operator's own number line, see
    composition_checks) and every rank is open to it."""
    invalid = []
    letters: dict[str, list[Pick]] = {}
    ranks: dict[str, list[Pick]] = {}
    n = 0
    for row in questions:  # one pass: a stream of rows will do
        n += 1
        problem = mcq_problem(row, n_options)
        if problem:
            invalid.append(f"question {row['question_id']}: {problem}")
            continue
        k = len(row["options"])
        if row["stage"] == 2:
            rank, feasible = (stage2_ranks or {}).get(row["question_id"]), k
        else:
            rank, feasible = value_rank(row), feasible_ranks(row)
        for scope in scopes(row):
            letters.setdefault(scope, []).append((LETTERS.index(row["answer"]), k))
            if rank is not None:
                ranks.setdefault(scope, []).append((rank, k, feasible))
    out = [count_figure("mcq_invalid", "all", n, invalid)]
    for scope, picks in sorted(letters.items(), key=lambda kv: _scope_order(kv[0])):
        out.append(deviation_figure("letter_deviation", scope, picks, tolerance))
    for scope, picks in sorted(ranks.items(), key=lambda kv: _scope_order(kv[0])):
        out.append(deviation_figure("value_rank_deviation", scope, picks, tolerance))
    for scope, picks in sorted(ranks.items(), key=lambda kv: _scope_order(kv[0])):
        if any(p[2] < p[1] for p in picks):  # some ranks were closed: the raw skew, shown
            raw = [(p[0], p[1]) for p in picks]
            out.append(deviation_figure("value_rank_raw_deviation", scope, raw, judged=False))
    return out


def _scope_order(scope: str) -> tuple[int, str]:
    return (
        {"all": 0, "stage1": 1, "stage2": 2}.get(scope, 4 if scope.startswith("op:") else 3),
        scope,
    )


# -- traces ------------------------------------------------------------------------------------
def final_letter(trace: str) -> str | None:
    """The letter of the release's answer line (`</think>` then `Answer: X` at the end)."""
    m = _FINAL.search(trace or "")
    return m.group(1) if m else None


def reply(messages: Sequence[dict[str, Any]] | None) -> str:
    """The text of a conversation's last assistant turn."""
    for m in reversed(list(messages or [])):
        if m.get("role") == "assistant":
            return "".join(p.get("text") or "" for p in m.get("content") or [])
    return ""


class TraceChecks:
    """SFT rows end with their question's verified answer; DPO pairs have a right chosen and a
    wrong rejected trace; no trace (SFT target, DPO side) cites the reasoner's text context.
    Rows are fed one at a time, so a release's traces need not fit in memory; `answers` are
    the verified letters by question id (the questions split)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.sft_rows, self.dpo_rows = 0, 0
        self.sft_bad: list[str] = []
        self.dpo_bad: list[str] = []
        self.seen: set[tuple[str, str]] = set()  # (trace id, text hash): each text judged once
        self.leaked: list[str] = []

    def sft(self, row: dict[str, Any]) -> None:
        self.sft_rows += 1
        want = self.answers.get(row["question_id"], row["answer"])
        text = reply(row["messages"])
        got = final_letter(text)
        if got != want or row["answer"] != want:
            self.sft_bad.append(
                f"sft row {row['row_id']}: ends with {got!r}, the answer is {want!r}"
            )
        self._trace(row["trace_id"], text)

    def dpo(self, row: dict[str, Any]) -> None:
        self.dpo_rows += 1
        want = self.answers.get(row["question_id"], row["answer"])
        chosen, rejected = reply(row["chosen"]), reply(row["rejected"])
        right, wrong = final_letter(chosen), final_letter(rejected)
        if right != want:
            self.dpo_bad.append(f"dpo row {row['row_id']}: chosen answers {right!r}, want {want!r}")
        elif wrong is None or wrong == want:
            self.dpo_bad.append(f"dpo row {row['row_id']}: rejected answers {wrong!r}, not wrong")
        self._trace(row["chosen_id"], chosen)
        self._trace(row["rejected_id"], rejected)

    def _trace(self, trace_id: str, text: str) -> None:
        key = (trace_id, hashlib.sha256(text.encode("utf-8")).hexdigest())
        if key in self.seen:
            return
        self.seen.add(key)
        if hit := leaks(text):
            self.leaked.append(f"trace {trace_id}: mentions {hit!r}")

    def figures(self) -> list[Figure]:
        return [
            count_figure("sft_wrong_answer", "sft", self.sft_rows, self.sft_bad),
            count_figure("dpo_misordered", "dpo", self.dpo_rows, self.dpo_bad),
            count_figure("leaked_traces", "all", len(self.seen), sorted(self.leaked)),
        ]


def passed(figures: Iterable[Figure]) -> bool:
    return all(f.passed for f in figures)


# -- the lineage DB ------------------------------------------------------------------------------
def db_rows(release_id: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """release_quality rows from a manifest (none for a release published without them)."""
    figures = (manifest.get("quality") or {}).get("figures") or []
    return [
        {
            "release_id": release_id,
            "metric": f["metric"],
            "scope": f["scope"],
            "value": float(f["value"]),
            "max_allowed": float(f["max_allowed"]),
            "n": int(f["n"]),
            "passed": bool(f["passed"]),
            "detail": f.get("detail"),
        }
        for f in figures
    ]


def record(conn: Connection, release_id: str, manifest: dict[str, Any]) -> None:
    """Store the release's quality figures (in the caller's transaction; idempotent)."""
    rows = db_rows(release_id, manifest)
    if rows:
        insert_ignore(conn, "release_quality", rows)
