"""A rollout's thinking, read once for all the traces that repeat it.

An expansion starts with its rollout's thinking verbatim (`<think>\\n{thinking}\\n\\n{cue}...`,
traces.assemble), and a rollout's own text starts with it too: about two thirds of the text
the filter scans is a copy. What the rules find in that shared start (the *head*:
`<think>\\n{thinking}\\n`): behaviour counts, the n-grams of the repetition rule, the
near-duplicate words and the leak prefilter's literals, is computed once per rollout and
combined with what they find in each trace's rest (the rollout's own text shares the head
when its thinking is written that way too). The leak search itself still reads the whole
text (its number phrasings may span lines), over the phrasings the combined findings allow.

Exact, not approximate: the head ends with a newline, and no behaviour phrasing, word, token,
leak literal or id shape can contain one (tests/test_trace_heads.py checks both the patterns
and the results against the plain functions), so every match lies wholly in the head or
wholly in the rest, and the newline before the rest is what a word boundary sees at either
side. Only ASCII texts take this path (`str.lower` of a concatenation is then the
concatenation of the lowers);
anything else, a trace that does not start with its head, or a head shorter than
`MIN_HEAD_CHARS`, is read whole.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from lgt_ops import traces
from lgt_ops.questions import tokens

NGRAM = traces.DEGENERATE_N
# Sharing pays when the head is long: each rule then makes two passes (head, rest) with a fixed
# cost each. Measured (judge, CPU): no change at ~200 and ~1,100 characters a trace, 1.9x at
# ~3,700 (docs/performance.md, stage loop round 4).
MIN_HEAD_CHARS = 1_000


@dataclass(frozen=True)
class Head:
    text: str  # `<think>\n{the rollout's thinking}\n`
    ngrams: Counter[tuple[str, ...]]
    words: int  # how many words the head has
    last_words: list[str]  # its last NGRAM - 1 words (n-grams across the join start there)
    tokens: set[str]

    # Read on first use: where the filter has trace_scan's batch reads it needs neither.
    @functools.cached_property
    def behaviours(self) -> dict[str, int]:
        return traces.behaviour_counts(self.text)

    @functools.cached_property
    def leak_hints(self) -> traces.LeakHints:
        return traces.leak_hints(self.text)


def head_of(rollout_text: str) -> Head | None:
    """The head a rollout's expansions start with (`<think>\n{its thinking}\n`, as
    traces.assemble writes it), or None when it has none this module can share or it is too
    short to be worth sharing."""
    if not rollout_text.isascii():
        return None
    body, closed, _ = traces.after_prefill(rollout_text).partition("</think>")
    if not closed or len(body) < MIN_HEAD_CHARS:
        return None
    head = f"<think>\n{body.strip()}\n"
    words = head.lower().split()
    return Head(
        text=head,
        ngrams=Counter(_ngrams(words)),
        words=len(words),
        last_words=words[-(NGRAM - 1) :],
        tokens=tokens(head),
    )


def _ngrams(words: list[str]) -> zip[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(NGRAM)), strict=False)


def _rest(text: str, head: Head | None) -> str | None:
    """What follows the head in `text`, or None when the text cannot share it."""
    if head is None or not text.isascii() or not text.startswith(head.text):
        return None
    return text[len(head.text) :]


def behaviours(text: str, cue: str | None, head: Head | None) -> dict[str, int]:
    """traces.behaviours(text, cue), the head's part counted once."""
    rest = _rest(text, head)
    if rest is None or head is None:
        return traces.behaviours(text, cue)
    own = traces.behaviour_counts(rest.split("</think>", 1)[0])
    counts = {name: head.behaviours[name] + own[name] for name in own}
    return traces.less_cue(counts, cue)


def degenerate(text: str, head: Head | None) -> bool:
    """traces.degenerate(text), the head's n-grams counted once."""
    rest = _rest(text, head)
    if rest is None or head is None:
        return traces.degenerate(text)
    more = rest.lower().split()
    n_words = head.words + len(more)
    if n_words < traces.DEGENERATE_MIN_WORDS:
        return False
    counts = head.ngrams.copy()
    counts.update(_ngrams(head.last_words + more))
    return traces.too_repetitive(max(counts.values(), default=0), n_words, NGRAM)


def words(text: str, head: Head | None) -> set[str]:
    """questions.tokens(text), the head's part read once."""
    rest = _rest(text, head)
    if rest is None or head is None:
        return tokens(text)
    return head.tokens | tokens(rest)


def leaks(text: str, head: Head | None) -> str | None:
    """traces.leaks(text), the prefilter's scan of the head's part done once."""
    rest = _rest(text, head)
    if rest is None or head is None:
        return traces.leaks(text)
    return traces.leak_search(text, head.leak_hints | traces.leak_hints(rest))
