"""Reading reasoning traces: final answers, the thinking part, leaks, and what a trace does.

Format (both stages): `<think>\\n...reasoning...\\n</think>\\n\\nAnswer: X`.

Answer parsing accepts the unambiguous ways real models state a letter (Qwen2.5-VL and the
DeepSeek-R1 distills write all of these), with markdown emphasis and `$` ignored:

    Answer: B   **Answer: B**   **Answer:** (B)   Final answer: B. red
    The answer is B.   The correct option is (B)   \\boxed{B}   $\\boxed{\\text{B}}$
    a line that is only the letter: `B`, `(B)`, `**B**`; the first answer line `B. red`

A letter must be a capital (so "the answer is a red cup" names no option). Every answer
statement after `</think>` is read; two different letters are `conflicting_answers`.

A reply without `</think>` (rule, see README "Answer parsing"): when the model stopped by
itself and its LAST line is an explicit answer statement (any form above except the bare
letter), the letter counts and the thinking is everything before that line; the filter still
keeps such a text out of SFT/DPO as it stands (`unparseable`, `no_think_close`), since its
thinking and answer are not marked. Cut off (`finish_reason = length`) it is `truncated`;
otherwise `no_think_close`.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lgt_ops.reasons import TraceReason

# Bump when parsing, leak or behaviour rules change: stage fingerprints include it, so the
# verdicts are recomputed (the model replies come from the ledger, never paid twice).
RULES_VERSION = 2

_LETTER = r"\(?\s*([A-H])\s*\)?"
_END = r"(?=\s*$|\s*[.,:;!)\]]|\s+[-–—(])"  # the letter ends the statement
# "Answer: B", "Final answer - (B)": a label, then the letter (case-insensitive label only).
_LABELLED = re.compile(
    r"^(?i:(?:the\s+)?final\s+answer|answer)\s*(?:[:：\-–]|is\b)\s*"
    r"(?:\(?\s*([A-H])\b|\(?\s*([a-h])\s*\)?" + _END + ")"  # lower case only on its own
)
# "The answer is B.", "so the correct option is (B)".
_STATED = re.compile(
    r"\b(?i:the\s+(?:(?:correct|right|best|final)\s+)?(?:answer|option|choice))"
    r"\s+(?i:is|would\s+be|should\s+be|must\s+be)\s*:?\s*(?i:option\s+)?" + _LETTER + _END
)
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?\s*([A-H])\s*\)?\s*\}?\s*\}")
_BARE = re.compile(r"^" + _LETTER + r"\.?$")
_LEAD = re.compile(r"^" + _LETTER + r"[.):]\s+\S")  # "B. red" (first answer line only)
_MARKUP = re.compile(r"[*`$#>]|^\s*[-•]\s+")


def _clean(line: str) -> str:
    return _MARKUP.sub("", line).strip()


def _explicit(line: str) -> list[str]:
    """Letters named by the explicit answer statements of one line."""
    c = _clean(line)
    found = [m.group(1) for m in _BOXED.finditer(line)]
    m = _LABELLED.match(c)
    if m:
        found.append((m.group(1) or m.group(2)).upper())
    found += [m.group(1) for m in _STATED.finditer(c)]
    return found


def answer_letters(after: str) -> list[str]:
    """Every letter the answer part (text after `</think>`) states, in order."""
    lines = [ln for ln in after.strip().splitlines() if ln.strip()]
    out: list[str] = []
    for i, ln in enumerate(lines):
        letters = _explicit(ln)
        c = _clean(ln)
        if not letters and (m := _BARE.match(c) or (_LEAD.match(c) if i == 0 else None)):
            letters = [m.group(1)]
        out += letters
    return out


# Phrasings that reveal the text-only context (caption, objects, boxes) the reasoner saw.
# Tuned on tests/data/leak_corpus.json: visual wording ("the left side of the image", "the box
# on the shelf", "the text on the sign says", counts) must not match. Each comes with the
# lower-case literals one of which any match contains (the prefilter in `leaks`); an edit
# that breaks this fails tests/test_filter_rules.py, which proves it for every alternative
# from the pattern's parse tree (and that each of _LEAK_NUMBERS needs a digit).
_LEAK_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the context itself
    (
        r"descriptions?|captions?|captioned|meta-?data|annotations?|annotated",
        ("description", "caption", "meta", "annotat"),
    ),
    (
        r"as (?:was |is |it was |it is )?(?:described|mentioned|noted|stated|listed|given)",
        ("described", "mentioned", "noted", "stated", "listed", "given"),
    ),
    (r"(?:is|are|was|were) (?:described|mentioned|stated)\b", ("described", "mentioned", "stated")),
    (r"described (?:in|by|above|earlier|here|as)", ("described",)),
    (
        r"(?:the |an? |this )?(?:object|objects) (?:list|ids?|labels?)|list of objects",
        ("object list", "objects list", "object id", "objects id", "object label")
        + ("objects label", "list of objects"),
    ),
    (
        r"(?:listed|given|provided) (?:objects|information|details|context|data)",
        ("listed", "given", "provided"),
    ),
    (
        r"(?:the )?(?:given|provided|available) (?:information|details|context|data|text|list)",
        ("given", "provided", "available"),
    ),
    (r"the information (?:given|provided)", ("information",)),
    (
        r"the (?:scene|image) (?:says|states|mentions|notes|lists)",
        tuple(f"{w} {v}" for w in ("scene", "image") for v in ("says", "states", "mentions"))
        + tuple(f"{w} {v}" for w in ("scene", "image") for v in ("notes", "lists")),
    ),
    # text and user
    (
        r"the (?:given |provided )?text (?:mentions?|mentioned|describes|described|lists|listed"
        r"|notes|noted|states|stated|specifies|indicates|provides|provided|gives|gave)",
        ("text ",),
    ),
    (
        r"(?:according to|based on|from|in) the (?:given |provided )?text"
        r"(?! (?:on|of|in|at|printed|written|painted|near|above|below))",
        ("the text", "given text", "provided text"),
    ),
    (
        r"the user(?:'s)? (?:mentioned|mentions|said|says|described|describes|provided|provides"
        r"|gave|gives|wrote|writes|stated|states|told|listed|lists|noted|notes|description|text)",
        ("user",),
    ),
    (r"as the user", ("user",)),
    # boxes, coordinates, pixels, ids
    (
        r"bounding[- ]?box(?:es)?|bbox(?:es)?|(?:its|the) box (?:coordinates|spans|extends|goes"
        r"|starts|ends|covers|is at|is from)|box coordinates",
        ("bounding", "bbox", "its box ", "the box ", "box coordinates"),
    ),
    (
        r"coordinates?|x[- ]?coordinates?|y[- ]?coordinates?|[xy][01]",
        ("coordinate", "x0", "x1", "y0", "y1"),
    ),
    (r"pixels?|px", ("pixel", "px")),
    (r"(?:object|obj|id)\s*#\s*\d+", ("#",)),
    # not seeing
    (r"mental (?:image|picture|model of the (?:image|scene))", ("mental",)),
    (
        r"(?:can ?not|can't|cannot|unable to|not able to|don't|do not) (?:actually )?see the "
        r"(?:image|picture|photo)",
        ("see the",),
    ),
    (r"without (?:seeing|looking at|viewing) the (?:image|picture|photo)", ("without",)),
    (
        r"(?:let me |i(?:'ll| will| can| need to)? )(?:visuali[sz]e|imagine|picture)"
        r" (?:the|this|it|what)",
        ("visuali", "imagine", "picture"),
    ),
    (r"since i (?:only )?have (?:the )?text", ("since i",)),
)
# Case-sensitive, each needs a digit: coordinate tuples [84, 30, 592, 392] or (84, 30); 640x480;
# x=12; object ids like c14, o3, obj_2 (lower case only).
_LEAK_NUMBERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"[\[(]\s*\d+(?:\.\d+)?\s*(?:,\s*\d+(?:\.\d+)?\s*){1,3}[\])]", ("[", "(")),
    (r"\b\d{2,5}\s*[x×]\s*\d{2,5}\b", ("x", "×")),
    (r"\b[xy]\s*=\s*\d", ("=",)),
    (r"\b[a-z]{1,3}_?\d{1,4}\b", ("",)),
)


def _leaks_rx(words: tuple[int, ...], numbers: tuple[int, ...]) -> re.Pattern[str]:
    """One alternation of the chosen phrasings, in their order (the full one: all of them)."""
    alts = []
    if words:
        worded = "|".join(f"(?:{_LEAK_WORDS[i][0]})" for i in words)
        alts.append(rf"(?i:\b(?:{worded})\b)")
    alts += [f"(?:{_LEAK_NUMBERS[i][0]})" for i in numbers]
    return re.compile("|".join(alts))


_LEAKS = _leaks_rx(tuple(range(len(_LEAK_WORDS))), tuple(range(len(_LEAK_NUMBERS))))
# literal -> the phrasings (("w", i) in _LEAK_WORDS, ("n", i) in _LEAK_NUMBERS) it may start
_LEAK_LITERALS: dict[str, list[tuple[str, int]]] = {}
for _kind, _table in (("w", _LEAK_WORDS), ("n", _LEAK_NUMBERS)):
    for _i, (_, _lits) in enumerate(_table):
        for _x in _lits:
            _LEAK_LITERALS.setdefault(_x, []).append((_kind, _i))
_DIGIT = re.compile(r"\d")
# An ASCII text with its letters a-z as "a", digits as "0", "_" kept and the rest blank: an
# object id (the last of _LEAK_NUMBERS: a lower-case letter, then `_?` and a digit) shows
# as "a0" or "a_0". Most texts with digits have none, and that search is the slowest.
_ID = len(_LEAK_NUMBERS) - 1
_ID_SHAPE = bytearray(b" " * 256)
_ID_SHAPE[ord("a") : ord("z") + 1] = b"a" * 26
_ID_SHAPE[ord("0") : ord("9") + 1] = b"0" * 10
_ID_SHAPE[ord("_")] = ord("_")
_leaks_among = functools.lru_cache(maxsize=1024)(_leaks_rx)  # the same few sets recur


# The only non-ASCII characters `re.IGNORECASE` matches to an ASCII letter (İ ı ſ K), which
# `str.lower` does not map to it: a text with one skips the prefilter.
_FOLDS_TO_ASCII = ("\u0130", "\u0131", "\u017f", "\u212a")
# Each behaviour: its pattern (lower case; matched ignoring case) and the literals one of
# which any match contains (a text with none of them counts 0 without a search; proved as
# for the leak phrasings).
_BEHAVIOUR_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "verification": (
        r"\b(?:let me (?:double[- ]?check|verify|check|confirm)|double[- ]?check|verify|"
        r"to confirm|checking again|check again|make sure)\b",
        ("check", "verify", "confirm", "make sure"),
    ),
    "backtracking": (
        r"\b(?:actually|wait|i was wrong|that'?s not right|does not look right|reconsider|"
        r"on second thought|let me re-?(?:think|examine|evaluate)|scratch that|no, )",
        ("actually", "wait", "i was wrong", "s not right", "does not look right", "reconsider")
        + ("on second thought", "let me re", "scratch that", "no, "),
    ),
    "subgoal": (
        r"\b(?:first,|first i need|to answer this,? i (?:need|should)|step \d|next,|"
        r"then i (?:need|will)|"
        r"the question asks|i need to (?:find|identify|determine|pin down))",
        ("first,", "first i need", "to answer this", "step ", "next,", "then i ")
        + ("the question asks", "i need to "),
    ),
    "backward": (
        r"\b(?:working backwards?|from the options|rule out|eliminate|if the answer were|"
        r"starting from the answer|by elimination)\b",
        ("working backward", "from the options", "rule out", "eliminat", "if the answer were")
        + ("starting from the answer",),
    ),
}
_BEHAVIOURS = {name: re.compile(p, re.I) for name, (p, _) in _BEHAVIOUR_RULES.items()}
# On an ASCII text, matching ignoring case = matching the lower-cased text case-sensitively
# (the patterns are lower case), which the regex engine does about twice as fast. Without
# the leading `\b` the engine also skips ahead to the letters an alternative starts with
# (another 2x); `_count_at_words` puts the boundary test back (every alternative starts with
# a letter, so `\b` there means "no word character before").
_BEHAVIOURS_LOWER = {
    name: (re.compile(p.removeprefix(r"\b")), lits) for name, (p, lits) in _BEHAVIOUR_RULES.items()
}
_WORD_CHAR = re.compile(r"\w")
BEHAVIOURS = tuple(_BEHAVIOURS)


@dataclass(frozen=True)
class Parsed:
    thinking: str | None  # text inside <think>...</think>
    letter: str | None
    error: str | None  # why the answer could not be read


def parse(text: str, n_options: int, *, truncated: bool = False) -> Parsed:
    """Thinking and final letter of a full reply (prefill included)."""
    body = after_prefill(text)
    closes = body.count("</think>")
    if closes > 1:
        return Parsed(None, None, TraceReason.MULTIPLE_THINK_BLOCKS)
    if closes == 0:
        return _unclosed(body, n_options, truncated)
    thinking, _, after = body.partition("</think>")
    answers = answer_letters(after)
    if not answers:
        return Parsed(
            thinking.strip(), None, TraceReason.TRUNCATED if truncated else TraceReason.NO_ANSWER
        )
    return _verdict(thinking.strip(), answers, n_options)


def after_prefill(text: str) -> str:
    """A reply, stripped, without its leading `<think>`: the prefill, and a server that
    echoes it."""
    body = text.strip()
    while body.startswith("<think>"):
        body = body[len("<think>") :].lstrip()
    return body


def _unclosed(body: str, n_options: int, truncated: bool) -> Parsed:
    """No `</think>`: only a final line that explicitly states the answer counts (see top)."""
    if truncated:
        return Parsed(None, None, TraceReason.TRUNCATED)
    lines = body.rstrip().splitlines()
    letters = _explicit(lines[-1]) if lines else []
    if not letters:
        return Parsed(None, None, TraceReason.NO_THINK_CLOSE)
    return _verdict("\n".join(lines[:-1]).strip(), letters, n_options)


def _verdict(thinking: str, answers: list[str], n_options: int) -> Parsed:
    if len(set(answers)) > 1:
        return Parsed(thinking, None, TraceReason.CONFLICTING_ANSWERS)
    letter = answers[0]
    if "ABCDEFGH".index(letter) >= n_options:
        return Parsed(thinking, None, TraceReason.ANSWER_NOT_AN_OPTION)
    return Parsed(thinking, letter, None)


def canonical_answer(text: str, letter: str | None) -> str:
    """A parsed reply with its answer part in the one training format (`Answer: X`): a DPO
    pair then differs in its reasoning, never in answer style (`\\boxed{B}` vs `Answer: C`).
    The thinking keeps its bytes; an unparsed or unclosed reply is returned as it is."""
    if not letter or "</think>" not in text:
        return text
    return f"{text.partition('</think>')[0].rstrip()}\n</think>\n\nAnswer: {letter}"


def format_problem(text: str) -> str | None:
    """Why a parsed trace is still not in the training format (its answer may count)."""
    return None if "</think>" in text else TraceReason.NO_THINK_CLOSE


def reply_text(message: dict[str, Any]) -> str:
    """A chat reply as one text: a reasoning parser's `reasoning_content` becomes the
    thinking again, closed by `</think>`, before the `content` (the answer)."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")  # vLLM names vary
    if reasoning and content.strip():
        return f"{reasoning.rstrip()}\n</think>\n\n{content.strip()}"
    # A parser that found no `</think>` returns everything as reasoning: an unclosed reply.
    return reasoning or content


def split_continuation(cont: str, parsed: Parsed) -> tuple[str, str]:
    """(more thinking, answer part) of an expansion's continuation; without `</think>` the
    final answer line (which `parse` accepted) is the answer part."""
    if "</think>" in cont:
        more, _, after = cont.partition("</think>")
        return more.rstrip(), after
    lines = cont.rstrip().splitlines()
    if parsed.letter and lines:
        return "\n".join(lines[:-1]).rstrip(), lines[-1]
    return cont.rstrip(), ""


def pick_cue(key: str, j: int, cues: tuple[str, ...]) -> str:
    """The j-th cue for one rollout: a seeded order of the cue set, so a rollout's first
    len(cues) expansions get different cues (siblings to compare, X->O>X->X pairs)."""
    order = list(cues)
    random.Random(key).shuffle(order)
    return order[j % len(order)]


def assemble(
    thinking: str, cue: str, continuation: str, answer_letter: str | None, answer_text: str
) -> str:
    """The long trace: simple CoT + cue + continuation, closed, then the answer line."""
    think = f"{thinking}\n\n{cue}{continuation}".rstrip()
    tail = f"Answer: {answer_letter}" if answer_letter else answer_text.strip()
    return f"<think>\n{think}\n</think>\n\n{tail}"


def leaks(text: str) -> str | None:
    """The phrase that reveals the text-only context the reasoner was given, if any.

    Same answer as searching the full alternation (`_LEAKS`), cheaper: a phrasing none of
    whose literals occurs in the text cannot match anywhere, so it is left out of the search;
    at any position the others keep their order, hence the same first match.
    """
    if not text.isascii() and any(c in text for c in _FOLDS_TO_ASCII):
        m = _LEAKS.search(text)
        return m.group(0) if m else None
    return leak_search(text, leak_hints(text))


@dataclass(frozen=True)
class LeakHints:
    """What the prefilter of `leaks` found in a text. No literal, digit or id shape spans a
    newline, so the hints of a text split after a newline are the union of its parts'."""

    found: frozenset[tuple[str, int]]  # the phrasings one of whose literals occurs
    digit: bool
    no_id: bool  # an ASCII text where no object id can occur

    def __or__(self, other: LeakHints) -> LeakHints:
        return LeakHints(
            self.found | other.found, self.digit or other.digit, self.no_id and other.no_id
        )


def leak_hints(text: str) -> LeakHints:
    """The prefilter's findings (for a text without the characters of `_FOLDS_TO_ASCII`)."""
    low = text.lower()
    found = frozenset(ki for x, kis in _LEAK_LITERALS.items() if x in low for ki in kis)
    digit = _DIGIT.search(text) is not None
    return LeakHints(found, digit, text.isascii() and not (digit and _may_hold_id(text)))


def leak_search(text: str, hints: LeakHints) -> str | None:
    """The first leak in `text`, searching only the phrasings its hints leave possible."""
    words = tuple(sorted(i for k, i in hints.found if k == "w"))
    numbers = tuple(sorted(i for k, i in hints.found if k == "n")) if hints.digit else ()
    if numbers and numbers[-1] == _ID and hints.no_id:
        numbers = numbers[:-1]
    if not words and not numbers:
        return None
    m = _leaks_among(words, numbers).search(text)
    return m.group(0) if m else None


def _may_hold_id(ascii_text: str) -> bool:
    """Whether an object id (`\\b[a-z]{1,3}_?\\d{1,4}\\b`) may occur: some letter a-z right
    before a digit or `_` and a digit (one C pass, where the regex tries every letter)."""
    shape = ascii_text.encode("ascii").translate(_ID_SHAPE)
    return b"a0" in shape or b"a_0" in shape


DEGENERATE_MIN_WORDS = 40  # shorter traces are never called degenerate
DEGENERATE_N = 6  # the n of the n-grams a loop repeats


def degenerate(text: str, *, max_share: float = 0.3, n: int = DEGENERATE_N) -> bool:
    """A trace stuck in a loop: one n-word sequence makes up too much of it."""
    words = text.lower().split()
    if len(words) < DEGENERATE_MIN_WORDS:
        return False
    # The n-grams from n shifted views (zip stops at the shortest: len - n + 1 of them),
    # the same tuples without a slice per position.
    top = max(Counter(zip(*(words[i:] for i in range(n)), strict=False)).values())
    return too_repetitive(top, len(words), n, max_share)


def too_repetitive(top: int, n_words: int, n: int, max_share: float = 0.3) -> bool:
    """Whether an n-gram seen `top` times makes up too much of `n_words` words."""
    return top * n / n_words > max_share and top >= 5


def behaviours(text: str, cue: str | None = None) -> dict[str, int]:
    """Counts of the four cognitive behaviours (Gandhi et al., 2025), lexical heuristics.

    The reflection cue the pipeline injected ("Wait,") is not the model's doing: what the cue
    alone would count is subtracted, so cues compare fairly.
    """
    return less_cue(behaviour_counts(text.split("</think>", 1)[0]), cue)


def less_cue(counts: dict[str, int], cue: str | None) -> dict[str, int]:
    """Behaviour counts less what the injected cue alone counts (in place)."""
    if cue:
        for name, n in _cue_counts(cue):
            counts[name] = max(0, counts[name] - n)
    return counts


@functools.lru_cache(maxsize=256)
def _cue_counts(cue: str) -> tuple[tuple[str, int], ...]:
    """A cue's own counts: the same few cues recur on every expansion (read only)."""
    return tuple(behaviour_counts(cue).items())


def behaviour_counts(text: str) -> dict[str, int]:
    """How often each behaviour phrasing occurs in a text (no cue taken off)."""
    if not text.isascii():
        return {name: len(rx.findall(text)) for name, rx in _BEHAVIOURS.items()}
    low = text.lower()
    return {
        name: _count_at_words(rx, low) if any(x in low for x in lits) else 0
        for name, (rx, lits) in _BEHAVIOURS_LOWER.items()
    }


def _count_at_words(rx: re.Pattern[str], low: str) -> int:
    """`len(re.findall(r"\b" + rx.pattern, low))`: a match not at a word start is skipped
    by one character (where `findall` would try next), a counted one by its length."""
    n = pos = 0
    while m := rx.search(low, pos):
        start = m.start()
        if start and _WORD_CHAR.match(low, start - 1):
            pos = start + 1
        else:
            n += 1
            pos = m.end()
    return n


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
    cue: str | None = None  # an expansion's injected cue

    # A row of these columns is what from_rollout / from_expansion read, by position (a
    # named lookup per field was two thirds of building a shard's traces): not the
    # thinking, continuation or reasoning texts a full row also holds.
    ROLLOUT_COLUMNS = (
        "rollout_id, question_id, text, final_letter, correct, parse_error, request_key"
    )
    EXPANSION_COLUMNS = (
        "expansion_id, rollout_id, question_id, cue, trace, final_letter, correct,"
        " parse_error, request_key"
    )

    @classmethod
    def from_rollout(cls, row: Sequence[Any]) -> Trace:
        """A Trace of a rollouts row of ROLLOUT_COLUMNS."""
        rollout_id, question_id, text, letter, correct, parse_error, request_key = row
        return cls(
            rollout_id,
            "rollout",
            question_id,
            canonical_answer(text, letter),
            letter,
            bool(correct),
            parse_error,
            None,
            request_key,
        )

    @classmethod
    def from_expansion(cls, row: Sequence[Any]) -> Trace:
        """A Trace of an expansions row of EXPANSION_COLUMNS."""
        expansion_id, rollout_id, question_id, cue, trace, letter, correct, parse_error, key = row
        return cls(
            expansion_id,
            "expansion",
            question_id,
            trace,
            letter,
            bool(correct),
            parse_error,
            rollout_id,
            key,
            cue,
        )
