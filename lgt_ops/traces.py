"""Reading reasoning traces: strict final answers, the thinking part, and what a trace does.

Format (both stages): `<think>\\n...reasoning...\\n</think>\\n\\nAnswer: X`. Parsing is strict
on purpose: exactly one `</think>`, and after it an answer line naming one option letter.
Anything else is unparseable, with a reason, and counts as wrong.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

_ANSWER = re.compile(r"^\s*answer\s*[:：]\s*\(?([A-H])\)?(?:[\s.,:;)\-].*)?$", re.I)
_LEAKS = re.compile(
    r"\b(?:the|this|an?|given|provided)\s+(?:image\s+)?(?:description|caption|annotations?|"
    r"metadata|object list|bounding box(?:es)?)\b|\bdescription (?:says|states|mentions|notes)\b"
    r"|\baccording to the (?:description|caption|text)\b|\bas described\b",
    re.I,
)
_BEHAVIOURS = {
    "verification": re.compile(
        r"\b(?:let me (?:double[- ]?check|verify|check|confirm)|double[- ]?check|verify|"
        r"to confirm|checking again|check again|make sure)\b",
        re.I,
    ),
    "backtracking": re.compile(
        r"\b(?:actually|wait|i was wrong|that'?s not right|does not look right|reconsider|"
        r"on second thought|let me re-?(?:think|examine|evaluate)|scratch that|no, )",
        re.I,
    ),
    "subgoal": re.compile(
        r"\b(?:first,|first i need|to answer this,? i (?:need|should)|step \d|next,|"
        r"then i (?:need|will)|"
        r"the question asks|i need to (?:find|identify|determine|pin down))",
        re.I,
    ),
    "backward": re.compile(
        r"\b(?:working backwards?|from the options|rule out|eliminate|if the answer were|"
        r"starting from the answer|by elimination)\b",
        re.I,
    ),
}
BEHAVIOURS = tuple(_BEHAVIOURS)


@dataclass(frozen=True)
class Parsed:
    thinking: str | None  # text inside <think>...</think>
    letter: str | None
    error: str | None  # why the answer could not be read


def parse(text: str, n_options: int, *, truncated: bool = False) -> Parsed:
    """Thinking and final letter of a full reply (prefill included)."""
    body = text.strip()
    if body.startswith("<think>"):
        body = body[len("<think>") :]
    closes = body.count("</think>")
    if closes == 0:
        return Parsed(None, None, "truncated" if truncated else "no_think_close")
    if closes > 1:
        return Parsed(None, None, "multiple_think_blocks")
    thinking, _, after = body.partition("</think>")
    thinking = thinking.strip()
    lines = [ln for ln in after.strip().splitlines() if ln.strip()]
    answers = [m.group(1).upper() for m in (_ANSWER.match(ln) for ln in lines) if m]
    if not answers:
        return Parsed(thinking, None, "truncated" if truncated else "no_answer")
    if len(set(answers)) > 1:
        return Parsed(thinking, None, "conflicting_answers")
    letter = answers[0]
    if "ABCDEFGH".index(letter) >= n_options:
        return Parsed(thinking, None, "answer_not_an_option")
    return Parsed(thinking, letter, None)


def assemble(
    thinking: str, cue: str, continuation: str, answer_letter: str | None, answer_text: str
) -> str:
    """The long trace: simple CoT + cue + continuation, closed, then the answer line."""
    think = f"{thinking}\n\n{cue}{continuation}".rstrip()
    tail = f"Answer: {answer_letter}" if answer_letter else answer_text.strip()
    return f"<think>\n{think}\n</think>\n\n{tail}"


def leaks(text: str) -> str | None:
    """The phrase that reveals the text-only context the reasoner was given, if any."""
    m = _LEAKS.search(text)
    return m.group(0) if m else None


def degenerate(text: str, *, max_share: float = 0.3, n: int = 6) -> bool:
    """A trace stuck in a loop: one n-word sequence makes up too much of it."""
    words = text.lower().split()
    if len(words) < 40:
        return False
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    top = grams.most_common(1)[0][1]
    return top * n / len(words) > max_share and top >= 5


def behaviours(text: str) -> dict[str, int]:
    """Counts of the four cognitive behaviours (Gandhi et al., 2025), lexical heuristics."""
    thinking = text.split("</think>", 1)[0]
    return {name: len(rx.findall(thinking)) for name, rx in _BEHAVIOURS.items()}


@dataclass(frozen=True)
class Trace:
    """A rollout or an expansion, as the filter, the pairs and the release see it."""

    trace_id: str
    kind: str  # rollout | expansion
    question_id: str
    text: str
    letter: str | None
    correct: bool
    parse_error: str | None
    parent_id: str | None  # the rollout an expansion continues
    request_key: str | None

    @classmethod
    def from_rollout(cls, r: Any) -> Trace:
        return cls(
            r.rollout_id,
            "rollout",
            r.question_id,
            r.text,
            r.final_letter,
            bool(r.correct),
            r.parse_error,
            None,
            r.request_key,
        )

    @classmethod
    def from_expansion(cls, e: Any) -> Trace:
        return cls(
            e.expansion_id,
            "expansion",
            e.question_id,
            e.trace,
            e.final_letter,
            bool(e.correct),
            e.parse_error,
            e.rollout_id,
            e.request_key,
        )
