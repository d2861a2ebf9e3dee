"""The filter's per-trace rules (traces.leaks, traces.behaviours) give exactly the answers of
their first, slower form, kept here as the reference: the same leak phrase (the rejection's
detail) and the same behaviour counts, over simulated traces with every leak phrasing the
simulator plants, the leak corpus, and case and Unicode variants of them."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lgt_ops import traces
from lgt_ops.config import MethodParams
from lgt_ops.llm.simulator.world import LEAKS
from lgt_ops.stages.filter import judge
from tests.regex_cover import alternatives, covered
from tests.sim_traces import simulated

CORPUS = json.loads((Path(__file__).parent / "data" / "leak_corpus.json").read_text())


# -- the reference: the rules as first written (one regex search over the whole text) ---------
def _reference_leaks_rx() -> re.Pattern[str]:
    words = [
        r"descriptions?|captions?|captioned|meta-?data|annotations?|annotated",
        r"as (?:was |is |it was |it is )?(?:described|mentioned|noted|stated|listed|given)",
        r"(?:is|are|was|were) (?:described|mentioned|stated)\b",
        r"described (?:in|by|above|earlier|here|as)",
        r"(?:the |an? |this )?(?:object|objects) (?:list|ids?|labels?)|list of objects",
        r"(?:listed|given|provided) (?:objects|information|details|context|data)",
        r"(?:the )?(?:given|provided|available) (?:information|details|context|data|text|list)",
        r"the information (?:given|provided)",
        r"the (?:scene|image) (?:says|states|mentions|notes|lists)",
        r"the (?:given |provided )?text (?:mentions?|mentioned|describes|described|lists|listed"
        r"|notes|noted|states|stated|specifies|indicates|provides|provided|gives|gave)",
        r"(?:according to|based on|from|in) the (?:given |provided )?text"
        r"(?! (?:on|of|in|at|printed|written|painted|near|above|below))",
        r"the user(?:'s)? (?:mentioned|mentions|said|says|described|describes|provided|provides"
        r"|gave|gives|wrote|writes|stated|states|told|listed|lists|noted|notes|description|text)",
        r"as the user",
        r"bounding[- ]?box(?:es)?|bbox(?:es)?|(?:its|the) box (?:coordinates|spans|extends|goes"
        r"|starts|ends|covers|is at|is from)|box coordinates",
        r"coordinates?|x[- ]?coordinates?|y[- ]?coordinates?|[xy][01]",
        r"pixels?|px",
        r"(?:object|obj|id)\s*#\s*\d+",
        r"mental (?:image|picture|model of the (?:image|scene))",
        r"(?:can ?not|can't|cannot|unable to|not able to|don't|do not) (?:actually )?see the "
        r"(?:image|picture|photo)",
        r"without (?:seeing|looking at|viewing) the (?:image|picture|photo)",
        r"(?:let me |i(?:'ll| will| can| need to)? )(?:visuali[sz]e|imagine|picture)"
        r" (?:the|this|it|what)",
        r"since i (?:only )?have (?:the )?text",
    ]
    numbers = [
        r"[\[(]\s*\d+(?:\.\d+)?\s*(?:,\s*\d+(?:\.\d+)?\s*){1,3}[\])]",
        r"\b\d{2,5}\s*[x×]\s*\d{2,5}\b",
        r"\b[xy]\s*=\s*\d",
    ]
    ident = r"\b[a-z]{1,3}_?\d{1,4}\b"
    worded = r"\b(?:" + "|".join(f"(?:{w})" for w in words) + r")\b"
    return re.compile("|".join([f"(?i:{worded})", *(f"(?:{n})" for n in numbers), f"(?:{ident})"]))


_REF_LEAKS = _reference_leaks_rx()
_REF_BEHAVIOURS = {
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


def reference_leaks(text: str) -> str | None:
    m = _REF_LEAKS.search(text)
    return m.group(0) if m else None


def reference_behaviours(text: str, cue: str | None = None) -> dict[str, int]:
    thinking = text.split("</think>", 1)[0]
    counts = {name: len(rx.findall(thinking)) for name, rx in _REF_BEHAVIOURS.items()}
    if cue:
        for name, rx in _REF_BEHAVIOURS.items():
            counts[name] = max(0, counts[name] - len(rx.findall(cue)))
    return counts


# -- the texts ---------------------------------------------------------------------------------
# Characters that match an ASCII letter ignoring case but are not ASCII (İ ı ſ K), and
# ordinary non-ASCII text (quotes, dashes, the multiplication sign, accents).
_FOLDS = {"i": "\u0130", "I": "\u0131", "s": "\u017f", "k": "\u212a"}
_PUNCT = {"'": "\u2019", "-": "\u2013", "x": "\u00d7", "e": "\u00e9"}


def _variants(text: str, rng: random.Random) -> list[str]:
    fold = "".join(_FOLDS.get(c, c) if rng.random() < 0.3 else c for c in text)
    punct = "".join(_PUNCT.get(c, c) if rng.random() < 0.3 else c for c in text)
    return [text, text.upper(), text.title(), text.swapcase(), fold, punct]


# One phrase per leak alternative, and near misses.
LEAK_PHRASES = [
    "The descriptions agree.", "Per the captions.", "It is captioned so.", "The meta-data",
    "The metadata.", "As annotated.", "The annotations.", "As was described.", "As it is given.",
    "As listed.", "They were mentioned.", "It is stated.", "Described by them.",
    "Described earlier.", "The object list.", "An object id.", "This objects labels.",
    "A list of objects.", "Listed objects.", "Given details.", "Provided context.",
    "The available data.", "Given text.", "Provided list.", "The information given.",
    "The information provided.", "The scene says so.", "The image lists it.",
    "The image notes it.", "The given text states it.", "The provided text gave it.",
    "The text specifies it.", "According to the text.", "Based on the given text, red.",
    "From the provided text, red.", "In the text on the sign.", "Based on the text printed.",
    "The user said so.", "The user's description.", "The users text.", "As the user put it.",
    "The bounding-box.", "Two bboxes.", "Its box spans it.", "The box is from here.",
    "The box coordinates.", "The x-coordinate.", "The y coordinates.", "At x0.", "Y1 here.",
    "40 px wide.", "One pixel.", "Object #3.", "obj# 12", "id #4", "A mental picture.",
    "A mental model of the scene.", "I can't see the photo.", "I cannot actually see the image.",
    "I do not see the picture.", "Without looking at the image.", "Without seeing the photo.",
    "Let me visualise the cup.", "I'll imagine what it is.", "I need to picture it.",
    "Since I only have the text.", "Since I have text.", "At (84, 30).", "Box [1, 2, 3, 4].",
    "At (1.5,2.5,3).", "640x480.", "320 \u00d7 200.", "x = 12.", "y=3.", "X = 12.", "Item c14.",
    "Item obj_2.", "Item O3.", "Item abcd12.", "Step 2.", "(2)", "x-ray", "the text on it",
]  # fmt: skip
# One phrase per behaviour alternative, planted alone (no other behaviour literal near it).
BEHAVIOUR_PHRASES = [
    "Let me double check.", "Let me verify it.", "To confirm, it is red.", "Checking again.",
    "I check again.", "Make sure it is.", "Actually it is blue.", "Wait. It is blue.",
    "I was wrong.", "That's not right.", "Thats not right.", "It does not look right.",
    "I reconsider.", "On second thought, blue.", "Let me rethink.", "Let me re-examine.",
    "Let me reevaluate.", "Scratch that.", "No, blue.", "First, the cup.",
    "First I need the cup.", "To answer this, I need the cup.", "To answer this I should look.",
    "Step 2 is the cup.", "Next, the cup.", "Then I need the cup.", "Then I will look.",
    "The question asks for a cup.", "I need to find it.", "I need to identify it.",
    "I need to determine it.", "I need to pin down it.", "Working backward, blue.",
    "Working backwards, blue.", "From the options, blue.", "Rule out red.", "Eliminate red.",
    "If the answer were red.", "Starting from the answer, blue.", "By elimination, blue.",
]  # fmt: skip


def _texts() -> list[tuple[str, str | None]]:
    """(trace text, cue) pairs: simulated traces, each simulator leak and each corpus sentence
    planted in one, and their variants."""
    rng = random.Random(0)
    sim = [t for q in simulated(1000, seed=1) for t in q]
    base = [(t.text, t.cue) for t in sim]
    planted = [*LEAKS, *CORPUS["leaks"], *CORPUS["clean"], *LEAK_PHRASES, *BEHAVIOUR_PHRASES]
    base += [(p, None) for p in planted]  # alone
    base += [(p, p.split()[0]) for p in BEHAVIOUR_PHRASES]  # its first word as the cue
    for i, phrase in enumerate(planted):
        t = sim[(7 * i) % len(sim)]
        head, sep, tail = t.text.partition("</think>")
        base.append((f"{head.rstrip()}{phrase}\n{sep}{tail}", t.cue))
    out = []
    for text, cue in base:
        out += [(v, cue) for v in _variants(text, rng)[: 6 if rng.random() < 0.3 else 2]]
    return out


def test_leaks_and_behaviours_are_those_of_the_reference():
    texts = _texts()
    assert len(texts) >= 8000
    leaked = 0
    for text, cue in texts:
        want = reference_leaks(text)
        assert traces.leaks(text) == want, text
        assert traces.behaviours(text, cue) == reference_behaviours(text, cue), text
        leaked += want is not None
    # both verdicts are well represented, and non-ASCII texts are among them
    assert 0.15 * len(texts) < leaked < 0.85 * len(texts), leaked
    assert sum(not t.isascii() for t, _ in texts) > 500


def test_filter_verdicts_name_the_reference_leak():
    m = MethodParams()
    verdicts = [v for q in simulated(300, seed=2) for v in judge(q, m)]
    leaks = [v for v in verdicts if v.reason == "leaks_metadata"]
    assert leaks and len(leaks) < len(verdicts)
    for v in leaks:
        assert v.detail == f"mentions {reference_leaks(v.trace.text)!r}"
    for v in verdicts:
        assert v.behaviours == reference_behaviours(v.trace.text, v.trace.cue)


# -- the prefilters' literals ------------------------------------------------------------------
# `traces.leaks` and `traces.behaviours` search a phrasing only in a text holding one of the
# literals listed with it: each alternative of each phrasing must need one of them (else it
# would silently never be searched), and each number phrasing a digit (`_DIGIT` gate).
def _rules() -> list[tuple[str, str, tuple[str, ...]]]:
    out = [(f"_LEAK_WORDS[{i}]", p, lits) for i, (p, lits) in enumerate(traces._LEAK_WORDS)]
    out += [(f"_LEAK_NUMBERS[{i}]", p, lits) for i, (p, lits) in enumerate(traces._LEAK_NUMBERS)]
    return out + [(name, p, lits) for name, (p, lits) in traces._BEHAVIOUR_RULES.items()]


def _uncovered(rules, *, digits: bool = False) -> list[str]:
    out = []
    for name, pattern, lits in rules:
        need = tuple("0123456789") if digits else lits
        for alt in alternatives(pattern):
            if not covered(alt, need, digit="0" if digits else None):
                out.append(f"{name}: {alt!r} can match without any of {need}")
    return out


def test_every_phrasing_needs_one_of_its_prefilter_literals():
    rules = _rules()
    assert sum(len(alternatives(p)) for _, p, _ in rules) > 40  # it sees them all
    assert not _uncovered(rules), "\n".join(_uncovered(rules))
    numbers = [r for r in rules if r[0].startswith("_LEAK_NUMBERS")]
    assert not _uncovered(numbers, digits=True), "\n".join(_uncovered(numbers, digits=True))


def test_the_literal_check_finds_a_phrasing_edited_without_its_literals():
    """The check proves what holds and only that: an alternative added or edited without
    its literal, a literal only some matches hold, a number phrasing without a digit."""
    assert _uncovered([("w", r"descriptions?|subtitles?", ("description",))]) == [
        "w: 'subtitles?' can match without any of ('description',)"
    ]
    assert _uncovered([("w", r"[xy][01]", ("x0", "x1", "y0"))])  # "y1" is missed
    assert _uncovered([("w", r"(?:object|obj|id)\s*#\s*\d+", ("obj",))])  # "id #4"
    assert _uncovered([("n", r"\b[xy]\s*=\s*\w", ("=",))], digits=True)
    # a literal anywhere in the sequence, in each branch, through optional parts and case
    assert not _uncovered([("w", r"(?:object|obj|id)\s*#\s*\d+", ("#",))])
    assert not _uncovered([("w", r"(?:let me |I )(?:visuali[sz]e|imagine) it", ("visuali", "ima"))])
    assert not _uncovered([("w", r"the (?:given )?TEXT (?:says|lists)", ("text ",))])
    assert not _uncovered([("n", r"[\[(]\s*\d+(?:\.\d+)?[\])]", ("[", "("))], digits=True)
    assert not _uncovered([("w", r"\bfoo\d{1,4}", ("",))])  # "" holds always: always searched


# Pieces of behaviour phrases glued to word characters, spaces and punctuation: the counts
# must not depend on how the rules find word starts (a phrase inside a word is no match).
_GLUE_PIECES = [
    "wait", "actually", "check", "double-check", "verify", "make sure", "no, ", "step 2",
    "next,", "first,", "then i will", "rule out", "eliminate", "let me re", "think", "re",
    "un", "x", "_", "1", " ", " ", ", ", ". ", "'", "-", "\n", "é", "by elimination",
]  # fmt: skip


def test_behaviour_counts_at_word_starts_only():
    rng = random.Random(7)
    for _ in range(4000):
        text = "".join(rng.choice(_GLUE_PIECES) for _ in range(rng.randint(1, 30)))
        for variant in (text, text.upper(), text.replace("é", "e")):
            assert traces.behaviours(variant) == reference_behaviours(variant), variant


# Pieces around object ids (c14, obj_2, O3): letters, digits and `_` glued or apart, so the
# id check ahead of the search meets both "there may be one" and "there is none".
_ID_PIECES = [
    "c", "obj", "Item ", "x", "O", "abcd", "_", "1", "14", "2024", " ", ", ", ".", "(", ")",
    "-", "step ", "the cup", "\n", "é",
]  # fmt: skip


def test_leaks_with_and_without_object_ids_are_those_of_the_reference():
    rng = random.Random(11)
    for _ in range(6000):
        text = "".join(rng.choice(_ID_PIECES) for _ in range(rng.randint(1, 25)))
        for variant in (text, text.replace("é", "e"), text.upper()):
            assert traces.leaks(variant) == reference_leaks(variant), variant
