"""Multiple-choice questions: validation rules, deterministic option order, near-duplicates.

Shared by stage 1 (written from captions and boxes) and stage 2 (composed from stage 1).
Each rule returns a machine-readable reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lgt_ops.ids import content_id
from lgt_ops.reasons import QuestionReason as QR
from lgt_ops.reasons import Rejected

LETTERS = "ABCDEFGH"
SKILLS = ("existence", "counting", "attribute", "spatial", "size", "position", "text", "detail")
_SKILL_SYNONYMS = {
    "color": "attribute",
    "colour": "attribute",
    "attributes": "attribute",
    "material": "attribute",
    "count": "counting",
    "number": "counting",
    "spatial relation": "spatial",
    "spatial_relation": "spatial",
    "relation": "spatial",
    "relative size": "size",
    "relative_size": "size",
    "location": "position",
    "ocr": "text",
    "text in image": "text",
    "text_in_image": "text",
    "fine detail": "detail",
    "fine_detail": "detail",
    "presence": "existence",
    "recognition": "existence",
}
_META_OPTIONS = re.compile(
    r"^(all|none|both|neither) (of )?(the )?(above|options|answers)|^both [a-h] and [a-h]$", re.I
)
_LEAKS = re.compile(
    r"\b(caption|description|described|bounding box(es)?|annotat(ed|ion|ions)|metadata)\b", re.I
)
_NUMBER = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Question:
    question_id: str
    image_id: str
    stage: int
    skill: str
    question: str
    options: tuple[str, ...]  # presented order
    answer_letter: str
    answer_text: str
    grounding: tuple[str, ...]
    operator: str | None = None

    def options_block(self) -> str:
        return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options))


def normalise_skill(skill: str) -> str:
    s = " ".join(str(skill).lower().replace("-", " ").split())
    if s in SKILLS:
        return s
    return _SKILL_SYNONYMS.get(s, _SKILL_SYNONYMS.get(s.replace(" ", "_"), "other"))


def _kind(option: str) -> str:
    low = option.strip().lower()
    if _NUMBER.match(low):
        return "number"
    if low in ("yes", "no"):
        return "yesno"
    return "text"


def tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def check(
    question: str,
    options: Sequence[str],
    answer_letter: str,
    *,
    n_options: int,
    grounding: Sequence[str] | None = None,
    known_objects: set[str] | None = None,
) -> str:
    """Validate a raw question; returns the correct option's text or raises Rejected."""
    q = (question or "").strip()
    if len(q) < 8:
        raise Rejected(QR.EMPTY_QUESTION, f"question {question!r} is too short")
    if len(options) != n_options:
        raise Rejected(QR.WRONG_OPTION_COUNT, f"{len(options)} options, want {n_options}")
    opts = [str(o).strip() for o in options]
    letter = str(answer_letter).strip().upper().rstrip(".)").lstrip("(")
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise Rejected(QR.BAD_ANSWER_LETTER, f"answer {answer_letter!r}")
    if any(not o for o in opts):
        raise Rejected(QR.EMPTY_OPTION, "an option is empty")
    normed = [" ".join(o.lower().split()) for o in opts]
    if len(set(normed)) != len(normed):
        raise Rejected(QR.DUPLICATE_OPTIONS, f"options repeat: {opts}")
    if any(_META_OPTIONS.match(o) for o in normed):
        raise Rejected(QR.META_OPTION, "an option refers to the other options")
    if _LEAKS.search(q) or any(_LEAKS.search(o) for o in opts):
        raise Rejected(QR.MENTIONS_METADATA, "refers to the caption or annotations")
    if grounding is not None:
        if not grounding:
            raise Rejected(QR.NO_GROUNDING, "no grounding object ids")
        unknown = [g for g in grounding if g not in (known_objects or set())]
        if unknown:
            raise Rejected(QR.UNKNOWN_GROUNDING, f"unknown object ids {unknown}")
    correct = opts[LETTERS.index(letter)]
    giveaway = _giveaway(correct, [o for o in opts if o != correct])
    if giveaway:
        raise Rejected(QR.ANSWERABLE_FROM_OPTIONS, giveaway)
    return correct


def _giveaway(correct: str, distractors: list[str]) -> str | None:
    """Is the correct option recognisable without the image?"""
    kinds = {_kind(d) for d in distractors}
    if len(kinds) == 1 and _kind(correct) not in kinds:
        return f"only the correct option is a {_kind(correct)}"
    longest = max(len(d) for d in distractors)
    if len(correct) >= 2 * longest and len(correct) - longest >= 15:
        return "the correct option is much longer than every distractor"
    return None


def shuffled(
    question_id: str, correct: str, distractors: Sequence[str]
) -> tuple[tuple[str, ...], str]:
    """Options in an order seeded by the question id, and the correct letter."""
    options = [correct, *sorted(distractors)]
    random.Random(question_id).shuffle(options)
    return tuple(options), LETTERS[options.index(correct)]


def make_question(
    *,
    image_id: str,
    stage: int,
    fingerprint: str,
    skill: str,
    question: str,
    correct: str,
    distractors: Sequence[str],
    grounding: Sequence[str],
    operator: str | None = None,
    parents: Sequence[str] = (),
) -> Question:
    qid = content_id(
        "question",
        image_id,
        stage,
        fingerprint,
        list(parents),
        operator,
        question.strip(),
        correct,
        sorted(distractors),
    )
    options, letter = shuffled(qid, correct, distractors)
    return Question(
        question_id=qid,
        image_id=image_id,
        stage=stage,
        skill=skill,
        question=question.strip(),
        options=options,
        answer_letter=letter,
        answer_text=correct,
        grounding=tuple(grounding),
        operator=operator,
    )


class NearDuplicates:
    """Rejects a question whose words overlap an accepted one on the same image too much."""

    def __init__(self, threshold: float, existing: Iterable[str] = ()) -> None:
        self.threshold = threshold
        self._seen: list[set[str]] = [tokens(t) for t in existing]

    def check(self, text: str) -> None:
        toks = tokens(text)
        for other in self._seen:
            if jaccard(toks, other) >= self.threshold:
                raise Rejected(QR.NEAR_DUPLICATE, f"overlaps an earlier question ({text[:80]})")
        self._seen.append(toks)


def question_row(
    q: Question, *, fingerprint: str, item_id: str, request_key: str | None, run_id: str
) -> dict[str, Any]:
    return {
        "question_id": q.question_id,
        "image_id": q.image_id,
        "stage": q.stage,
        "fingerprint": fingerprint,
        "item_id": item_id,
        "skill": q.skill,
        "question": q.question,
        "options": json.dumps(list(q.options), ensure_ascii=False),
        "answer_letter": q.answer_letter,
        "answer_text": q.answer_text,
        "grounding": json.dumps(list(q.grounding)),
        "operator": q.operator,
        "request_key": request_key,
        "run_id": run_id,
    }


def from_row(row: Any) -> Question:
    return Question(
        question_id=row.question_id,
        image_id=row.image_id,
        stage=row.stage,
        skill=row.skill,
        question=row.question,
        options=tuple(json.loads(row.options)),
        answer_letter=row.answer_letter,
        answer_text=row.answer_text,
        grounding=tuple(json.loads(row.grounding)),
        operator=row.operator,
    )
