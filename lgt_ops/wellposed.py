"""Is a composed question well posed? (METHOD.md, "What makes the data right".)

A chain asks about the entity its first hop resolves, and never names it:
- hop 1 singles out one object: exactly one of its grounded objects is named like its answer,
  and it is grounded on at least one other object that none of its options names (the anchor
  it is found by: "left of the bowl"); a question that picks among its options ("which of
  these is in the image / the largest?") singles out nothing once its options are gone, and
  its options would name the object;
- hop 2 is grounded on exactly that object, so its answer depends on hop 1's;
- the composed question names the object neither by its label, its plural, hop 1's answer
  text, nor a synonym the annotations give (`synonyms` of the object).

`check_well_posed` is what the compose stage applies to every composed question and what a
release validator can call on a stored question and its parents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lgt_ops.questions import Question
from lgt_ops.reasons import ComposeReason, Rejected

_ARTICLE = re.compile(r"^(the|a|an)\s+")


def _norm(text: str) -> str:
    return _ARTICLE.sub("", " ".join(str(text).lower().split()))


def plural(word: str) -> str:
    """An English plural good enough for object labels ("bus" -> "buses")."""
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def object_names(obj: Mapping[str, Any]) -> list[str]:
    """The object's label and its synonyms as the annotations give them."""
    names = [obj.get("label", ""), *(obj.get("synonyms") or ())]
    return [n for n in (_norm(x) for x in names if isinstance(x, str)) if n]


def names_object(answer: str, obj: Mapping[str, Any] | None) -> bool:
    """Does an answer name this object ("the cup" names a cup; synonyms count)?"""
    return obj is not None and _norm(answer) in object_names(obj)


def bridge(p: Question, q: Question, objects: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The object the chain p -> q asks about; raises Rejected(chain_not_bridged) if none."""
    by_id = {o["id"]: o for o in objects}
    resolved = [g for g in dict.fromkeys(p.grounding) if names_object(p.answer_text, by_id.get(g))]
    if len(resolved) != 1:
        raise Rejected(
            ComposeReason.CHAIN_NOT_BRIDGED,
            f"hop 1's answer {p.answer_text!r} names {len(resolved)} of its grounded objects,"
            " not one",
        )
    anchors = [
        g
        for g in p.grounding
        if g != resolved[0] and not any(names_object(o, by_id.get(g)) for o in p.options)
    ]
    if not anchors:
        raise Rejected(
            ComposeReason.CHAIN_NOT_BRIDGED,
            "hop 1 has no anchor object besides its answer and its options: without its"
            " options it singles out nothing",
        )
    if tuple(dict.fromkeys(q.grounding)) != (resolved[0],):
        raise Rejected(
            ComposeReason.CHAIN_NOT_BRIDGED,
            f"hop 2 is grounded on {list(q.grounding)}, not on the one object hop 1 resolves"
            f" ({resolved[0]})",
        )
    return by_id[resolved[0]]


def entity_names(obj: Mapping[str, Any], hop1: Question) -> tuple[str, ...]:
    """Every way the text could name the bridging object: label, synonyms, hop 1's answer,
    and their plurals."""
    base = [*object_names(obj), _norm(hop1.answer_text)]
    return tuple(dict.fromkeys(n for b in base if b for n in (b, plural(b))))


def named_in(text: str, names: Sequence[str]) -> str | None:
    """The first of `names` the text contains as whole words (case and spacing ignored)."""
    low = " ".join(text.lower().split())
    for name in sorted(names, key=len, reverse=True):
        words = r"\s+".join(re.escape(w) for w in name.split())
        if re.search(rf"(?<![\w-]){words}(?![\w-])", low):
            return name
    return None


def check_chain_text(text: str, names: Sequence[str]) -> None:
    """Raises Rejected(names_bridge_entity) if the composed text names the bridging object."""
    found = named_in(text, names)
    if found is not None:
        raise Rejected(
            ComposeReason.NAMES_BRIDGE_ENTITY,
            f"the question names {found!r}, the object the first hop must resolve",
        )


def check_well_posed(
    composed: Question, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
) -> None:
    """Raises Rejected (a ComposeReason) if a composed question is ill posed.

    `composed` and `parents` are questions as stored (`questions.from_row` of the rows;
    parents in `question_parents.position` order); `objects` the image's object annotations
    (dicts with `id`, `label`, optional `synonyms`). Only chains have conditions beyond the
    derived answer (`composition.expected_answer`); other operators pass.
    """
    if composed.operator != "chain":
        return
    if len(parents) != 2:
        raise Rejected(ComposeReason.CHAIN_NOT_BRIDGED, f"{len(parents)} parents, a chain has 2")
    hop1, hop2 = parents
    obj = bridge(hop1, hop2, objects)
    check_chain_text(composed.question, entity_names(obj, hop1))


def ill_posed(
    composed: Question, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
) -> Rejected | None:
    """`check_well_posed` as a value: the rejection (reason and detail), or None if well posed
    (for a validator that counts rather than stops)."""
    try:
        check_well_posed(composed, parents, objects)
    except Rejected as exc:
        return exc
    return None
