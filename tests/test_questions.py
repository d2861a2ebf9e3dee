"""Stage-1 question rules: each defect has its own reason; options shuffle reproducibly."""

from __future__ import annotations

from collections import Counter

import pytest

from lgt_ops.questions import (
    NearDuplicates,
    check,
    make_question,
    normalise_skill,
)
from lgt_ops.reasons import Rejected

OBJ = {"o1", "o2"}


def _check(
    question="What colour is the cup?",
    options=("red", "blue", "green", "white"),
    answer="A",
    grounding=("o1",),
):
    return check(
        question, list(options), answer, n_options=4, grounding=list(grounding), known_objects=OBJ
    )


def test_valid_question_returns_correct_text():
    assert _check(answer="C") == "green"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"question": "Cup?"}, "empty_question"),
        ({"options": ("red", "blue", "green")}, "wrong_option_count"),
        ({"answer": "E"}, "bad_answer_letter"),
        ({"options": ("red", "Red", "green", "white")}, "duplicate_options"),
        ({"options": ("red", "blue", "green", "all of the above")}, "meta_option"),
        ({"question": "According to the caption, what colour is the cup?"}, "mentions_metadata"),
        ({"grounding": ()}, "no_grounding"),
        ({"grounding": ("o9",)}, "unknown_grounding"),
        ({"options": ("3", "blue", "green", "white")}, "answerable_from_options"),
        (
            {"options": ("a bright red ceramic cup with a golden rim", "blue", "green", "white")},
            "answerable_from_options",
        ),
    ],
)
def test_each_defect_has_its_reason(kwargs, reason):
    with pytest.raises(Rejected) as exc:
        _check(**kwargs)
    assert exc.value.reason == reason


def test_option_order_is_seeded_by_question_and_balanced():
    letters = Counter()
    for i in range(400):
        q = make_question(
            image_id="img",
            stage=1,
            fingerprint="fp",
            skill="counting",
            question=f"How many cups are on table {i}?",
            correct="2",
            distractors=["1", "3", "4"],
            grounding=["o1"],
        )
        again = make_question(
            image_id="img",
            stage=1,
            fingerprint="fp",
            skill="counting",
            question=f"How many cups are on table {i}?",
            correct="2",
            distractors=["4", "3", "1"],
            grounding=["o1"],
        )
        assert q == again  # same question, same id, same order, whatever the input order
        assert q.options[" ABCD".index(q.answer_letter) - 1] == "2"
        letters[q.answer_letter] += 1
    assert set(letters) == set("ABCD") and min(letters.values()) > 60


def test_near_duplicates_on_one_image():
    d = NearDuplicates(0.8)
    d.check("What colour is the cup? red")
    with pytest.raises(Rejected):
        d.check("What colour is the cup? red")
    d.check("How many spoons are there? 2")


def test_skill_synonyms():
    assert normalise_skill("Color") == "attribute"
    assert normalise_skill("spatial relation") == "spatial"
    assert normalise_skill("astrology") == "other"
