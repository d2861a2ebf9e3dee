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

import bisect
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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


@dataclass
class Tally:
    """The problems of a count figure, kept bounded: how many, and the first `keep` of them
    (or, `least`, the smallest), so a release of any size is judged in constant memory."""

    n: int = 0
    examples: list[str] = field(default_factory=list)
    keep: int = 3
    least: bool = False

    def add(self, problem: str) -> None:
        self.n += 1
        if self.least:
            bisect.insort(self.examples, problem)
            del self.examples[self.keep :]
        elif len(self.examples) < self.keep:
            self.examples.append(problem)

    def figure(self, metric: str, scope: str, n: int) -> Figure:
        """`count_figure` of these problems."""
        detail = None
        if self.n:
            more = f" (and {self.n - 1} more)" if self.n > 1 else ""
            detail = self.examples[0] + more
        return Figure(metric, scope, float(self.n), 0.0, n, detail)


Pick = tuple[int, int] | tuple[int, int, int]  # (position, k) or (position, k, feasible)


class Shares:
    """Picks of one scope, as running sums: how often each position holds the correct answer,
    and per position the expected share and variance a fair layout gives, added pick by pick
    (the floats a list of every pick gives, without the list)."""

    def __init__(self) -> None:
        self.n = 0
        self.k = 0
        self.at: Counter[int] = Counter()
        self.mean: list[float] = []
        self.var: list[float] = []
        self.closed = False  # some pick could not take every position (feasible < k)

    def add(self, position: int, k: int, feasible: int | None = None) -> None:
        f = k if feasible is None else feasible
        self.n += 1
        self.k = max(self.k, k)
        self.at[position] += 1
        self.closed = self.closed or f < k
        while len(self.mean) < f:
            self.mean.append(0.0)
            self.var.append(0.0)
        for pos in range(f):
            self.mean[pos] += 1 / f
            self.var[pos] += (1 / f) * (1 - 1 / f)

    def expected(self) -> tuple[list[float], list[float]]:
        """Per position 0..k-1: its fair share and that share's standard error."""
        pad = [0.0] * max(0, self.k - len(self.mean))
        n = self.n
        return [m / n for m in self.mean + pad], [math.sqrt(v) / n for v in self.var + pad]

    def figure(
        self, metric: str, scope: str, tolerance: float = TOLERANCE, judged: bool = True
    ) -> Figure:
        """`deviation_figure` of these picks."""
        n, k = self.n, self.k
        expected, se = self.expected()
        worst, at = 0.0, 0
        for pos in range(k):
            dev = abs(self.at.get(pos, 0) / n - expected[pos])
            if dev > worst:
                worst, at = dev, pos
        limit = 1.0
        if judged and n >= MIN_JUDGED and k >= 2:
            limit = max(tolerance, 3 * max(se))
        detail = None
        if worst > limit:
            detail = f"position {at + 1} of {k} holds {self.at.get(at, 0)} of {n} correct answers"
            if abs(expected[at] - 1 / k) > 1e-9:
                detail += f", {expected[at]:.1%} expected"
        return Figure(metric, scope, round(worst, 6), round(limit, 6), n, detail)


def _shares(picks: Iterable[Pick]) -> Shares:
    acc = Shares()
    for pick in picks:
        acc.add(*pick)
    return acc


def expected_shares(picks: Sequence[Pick]) -> tuple[list[float], list[float]]:
    """Per position: the share a fair layout gives it, and that share's standard error. A pick
    (position, k, f) could only be at positions 0..f-1 (1/f each); (position, k) at any."""
    return _shares(picks).expected()


def deviation_figure(
    metric: str,
    scope: str,
    picks: Sequence[Pick],
    tolerance: float = TOLERANCE,
    judged: bool = True,
) -> Figure:
    """Largest |share - expected share| over the positions 0..k-1, from (position, k) picks
    (expected 1/k) or (position, k, feasible) picks; `judged=False`: shown (max 100 %)."""
    return _shares(picks).figure(metric, scope, tolerance, judged)


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


class QuestionChecks:
    """Structural validity, and letter and value-rank uniformity per scope, fed one question
    row at a time (running counts per scope, not the rows). A stage-1 value rank is read from
    numeric options and judged against the ranks its value can take; a composed question's
    is given (the operator's own number line, see composition_checks) and every rank is open
    to it."""

    def __init__(self, n_options: int, tolerance: float = TOLERANCE) -> None:
        self.n_options, self.tolerance = n_options, tolerance
        self.n = 0
        self.invalid = Tally()
        self.letters: dict[str, Shares] = {}
        self.ranks: dict[str, Shares] = {}
        self.raw: dict[str, Shares] = {}  # the same ranks against 1/k

    def add(self, row: dict[str, Any], stage2_rank: int | None = None) -> None:
        self.n += 1
        problem = mcq_problem(row, self.n_options)
        if problem:
            self.invalid.add(f"question {row['question_id']}: {problem}")
            return
        k = len(row["options"])
        if row["stage"] == 2:
            rank, feasible = stage2_rank, k
        else:
            rank, feasible = value_rank(row), feasible_ranks(row)
        for scope in scopes(row):
            self.letters.setdefault(scope, Shares()).add(LETTERS.index(row["answer"]), k)
            if rank is not None:
                self.ranks.setdefault(scope, Shares()).add(rank, k, feasible)
                self.raw.setdefault(scope, Shares()).add(rank, k)

    def figures(self) -> list[Figure]:
        out = [self.invalid.figure("mcq_invalid", "all", self.n)]
        for scope, acc in sorted(self.letters.items(), key=lambda kv: _scope_order(kv[0])):
            out.append(acc.figure("letter_deviation", scope, self.tolerance))
        ranks = sorted(self.ranks.items(), key=lambda kv: _scope_order(kv[0]))
        for scope, acc in ranks:
            out.append(acc.figure("value_rank_deviation", scope, self.tolerance))
        for scope, acc in ranks:
            if acc.closed:  # some ranks were closed: the raw skew, shown
                raw = self.raw[scope]
                out.append(raw.figure("value_rank_raw_deviation", scope, judged=False))
        return out


def question_figures(
    questions: Iterable[dict[str, Any]],
    n_options: int,
    stage2_ranks: Mapping[str, int] | None = None,
    tolerance: float = TOLERANCE,
) -> list[Figure]:
    """`QuestionChecks` over a stream of question rows; `stage2_ranks` by question id."""
    checks = QuestionChecks(n_options, tolerance)
    for row in questions:
        checks.add(row, (stage2_ranks or {}).get(row.get("question_id") or ""))
    return checks.figures()


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
    the verified letters by question id (the questions split), given a bucket at a time
    (`next_bucket`: a row's question and traces share its image's bucket)."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.answers = answers or {}
        self.sft_rows, self.dpo_rows = 0, 0
        self.sft_bad: dict[str, Tally] = {}  # by split: the first problems in split order
        self.dpo_bad: dict[str, Tally] = {}
        self.seen: set[tuple[str, str]] = set()  # (trace id, text hash): each text judged once
        self.judged = 0  # texts judged in the buckets before this one
        self.leaked = Tally(least=True)

    def next_bucket(self, answers: dict[str, str]) -> None:
        """The next bucket's answers; the last one's texts are done with."""
        self.judged += len(self.seen)
        self.answers, self.seen = answers, set()

    def sft(self, row: dict[str, Any], split: str = "sft") -> None:
        self.sft_rows += 1
        want = self.answers.get(row["question_id"], row["answer"])
        text = reply(row["messages"])
        got = final_letter(text)
        if got != want or row["answer"] != want:
            self.sft_bad.setdefault(split, Tally()).add(
                f"sft row {row['row_id']}: ends with {got!r}, the answer is {want!r}"
            )
        self._trace(row["trace_id"], text)

    def dpo(self, row: dict[str, Any], split: str = "dpo") -> None:
        self.dpo_rows += 1
        want = self.answers.get(row["question_id"], row["answer"])
        chosen, rejected = reply(row["chosen"]), reply(row["rejected"])
        right, wrong = final_letter(chosen), final_letter(rejected)
        bad = self.dpo_bad.setdefault(split, Tally())
        if right != want:
            bad.add(f"dpo row {row['row_id']}: chosen answers {right!r}, want {want!r}")
        elif wrong is None or wrong == want:
            bad.add(f"dpo row {row['row_id']}: rejected answers {wrong!r}, not wrong")
        self._trace(row["chosen_id"], chosen)
        self._trace(row["rejected_id"], rejected)

    def _trace(self, trace_id: str, text: str) -> None:
        key = (trace_id, hashlib.sha256(text.encode("utf-8")).hexdigest())
        if key in self.seen:
            return
        self.seen.add(key)
        if hit := leaks(text):
            self.leaked.add(f"trace {trace_id}: mentions {hit!r}")

    def figures(self) -> list[Figure]:
        judged = self.judged + len(self.seen)
        return [
            _merged(self.sft_bad).figure("sft_wrong_answer", "sft", self.sft_rows),
            _merged(self.dpo_bad).figure("dpo_misordered", "dpo", self.dpo_rows),
            self.leaked.figure("leaked_traces", "all", judged),
        ]


def _merged(by_split: dict[str, Tally]) -> Tally:
    """One tally of several splits' problems, in split-name order (as a pass over the splits
    one after the other lists them)."""
    out = Tally()
    for _, t in sorted(by_split.items()):
        out.n += t.n
        out.examples += t.examples
    return out


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
