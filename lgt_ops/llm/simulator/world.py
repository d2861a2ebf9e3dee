"""The simulator's fake world: deterministic replies for each of the pipeline's prompts.

This is a test double. It reads the same prompts a real model would and writes replies of the
right shape. Every reply is a pure function of (request body, simulator seed): there is no
memory across requests, so any run, process, order or concurrency gives the same bytes.

Ground truth comes from the request itself. The world's correct option for a question is
`answer_key(seed, question, options)`, a hash choice over the option texts; when the simulator
writes a question (mcq, compose) it words it and picks its distractors so that the key agrees
with the answer the caption and boxes give, and later rollouts and expansions, which see only
the question and its options, recompute the key. Nothing here looks at pixels: annotations of
unknown images are generic and say so.
"""

from __future__ import annotations

import base64
import io
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lgt_ops.ids import canonical_json, seeded_unit, sha256_hex
from lgt_ops.llm.simulator.config import SimConfig

VOCAB = (
    "bicycle",
    "umbrella",
    "giraffe",
    "laptop",
    "teapot",
    "pineapple",
    "violin",
    "ladder",
    "suitcase",
    "kite",
    "toaster",
    "lamp",
    "chair",
    "bottle",
    "clock",
    "dog",
    "horse",
    "boat",
    "tree",
    "car",
    "book",
    "phone",
    "bench",
    "backpack",
)
COLOURS = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gray",
    "silver",
    "gold",
    "golden",
)
# Instances of a kind in one image, COCO-like: mostly one, often a few, sometimes many.
INSTANCES = (1, 1, 1, 1, 1, 1, 2, 2, 3, 4, 6, 8)
POSITIONS = ("on the left side", "in the middle", "on the right side", "along the top edge")
LETTERS = "ABCDEFGH"

_OBJ_LINE = re.compile(
    r"^([\w.\-]+): (.+?) \[([\d.\-]+), ([\d.\-]+), ([\d.\-]+), ([\d.\-]+)\]$", re.M
)
_BEHAVIOUR_WORDS = {
    "verification": ("double-check", "verify", "consistent"),
    "backtracking": ("does not look right", "reconsider"),
    "subgoal": ("pin down", "the question asks"),
    "backward": ("working backwards", "rule out"),
}
_OPT_LINE = re.compile(r"^([A-H])\. (.*)$", re.M)
# How the blind-check prompt (a text-only model, no image) announces itself.
BLIND_MARKER = "an image you cannot see"
# What a text-only model guesses for "What colour is the X?" without seeing X: the colour
# the word suggests. Right when the image agrees, wrong otherwise (a red tree).
COLOUR_PRIORS = {
    "tree": "green",
    "grass": "green",
    "leaf": "green",
    "leaves": "green",
    "sky": "blue",
    "snow": "white",
    "cloud": "white",
    "whiskers": "white",
    "space shuttle": "white",
    "rocket": "white",
    "banana": "yellow",
    "lemon": "yellow",
    "school bus": "yellow",
    "tomato": "red",
    "strawberry": "red",
    "fire truck": "red",
    "stop sign": "red",
    "coffee": "brown",
}
# How the pipeline's expansion prompts (v1, v2) announce themselves.
EXPAND_MARKERS = ("instead of the image", "Reason as someone who sees this image")
# Ways real reasoners cite the text context they were given instead of the image (METHOD.md
# "What makes the data right"); some use words vLLM can ban at decode time, some cannot be
# banned without harming visual text, which is what the filter is for.
LEAKS = (
    " According to the description, this is consistent.",
    " The caption says the same.",
    " Its bounding box is the larger one, which fits.",
    " It spans roughly 300 pixels across.",
    " In my mental image of the scene it sits there.",
    " As described, that is the case.",
    " Object c14 in the list is this one.",
    " Its box [84, 30, 592, 392] puts it on the left.",
    " The text mentions it explicitly.",
    " The user mentioned it as well.",
    " Since I can't see the image, I go by what I was told.",
    " Based on the provided information, that holds.",
)
# How real models state the final letter (Qwen2.5-VL, DeepSeek-R1 distills); first = plain.
ANSWER_STYLES = (
    "Answer: {x}",
    "**Answer: {x}**",
    "**Answer:** ({x})",
    "Answer: ({x})",
    "The answer is {x}.",
    "\\boxed{{{x}}}",
    "**Final Answer**\n\\[\n\\boxed{{{x}}}\n\\]",
    "The correct option is ({x}).",
)


@dataclass(frozen=True)
class Obj:
    id: str
    label: str
    box: tuple[float, float, float, float]

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def image_size(message: dict[str, Any]) -> tuple[int, int] | None:
    """Size of the first data-URL image in a message (the only thing we 'see')."""
    content = message.get("content")
    if not isinstance(content, list):
        return None
    for part in content:
        url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) else ""
        if url.startswith("data:") and "," in url:
            from PIL import Image

            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
                return im.size
    return None


def parse_options(text: str) -> list[tuple[str, str]]:
    block = text.split("Options:", 1)[-1]
    return [(m.group(1), m.group(2).strip()) for m in _OPT_LINE.finditer(block)]


def parse_question(text: str) -> str:
    m = re.search(r"^Question: (.*)$", text, re.M)
    return m.group(1).strip() if m else ""


class World:
    """Replies per prompt kind: a pure function of (request body, seed), no state."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg

    # -- dispatch ---------------------------------------------------------------------------
    def reply(self, body: dict[str, Any], index: int) -> tuple[str, str | None]:
        """(content, reasoning_content) for choice `index` of a request.

        Honours vLLM's `bad_words`: a banned word never appears in the reply (the failure
        modes below choose phrasings without it, and a last pass removes any left).
        """
        content, reasoning = self._reply(body, index)
        banned = [w for w in body.get("bad_words") or () if isinstance(w, str) and w]
        if banned:
            return scrub(content, banned), scrub(reasoning, banned) if reasoning else reasoning
        return content, reasoning

    def _reply(self, body: dict[str, Any], index: int) -> tuple[str, str | None]:
        messages = body.get("messages") or []
        schema_name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
        rng = random.Random(
            sha256_hex(
                canonical_json(
                    [
                        "reply",
                        self.cfg.seed,
                        canonical_messages(messages),
                        body.get("seed"),
                        index,
                        schema_name,
                    ]
                )
            )
        )
        last = messages[-1] if messages else {}
        prefill = text_of(last) if last.get("role") == "assistant" else ""
        user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        if schema_name == "mcq":
            return canonical_json(self.mcq(text_of(user), rng)), None
        if schema_name == "compose":
            return canonical_json(self.compose(text_of(user), rng)), None
        if schema_name == "annotate":
            return canonical_json(self.annotate(user, rng)), None
        if schema_name == "behaviours":
            return canonical_json(self.behaviours(text_of(user))), None
        if schema_name is not None:  # any other schema: its smallest valid instance
            schema = body["response_format"]["json_schema"].get("schema") or {}
            return canonical_json(schema_instance(schema)), None
        if prefill.startswith("<think>") and any(m in text_of(user) for m in EXPAND_MARKERS):
            return self.expand(text_of(user), prefill, body, index, rng)
        if prefill.startswith("<think>"):
            return self.rollout(text_of(user), body, index, rng), None
        if messages and BLIND_MARKER in text_of(messages[0]):
            return self.blind(text_of(user), rng), None
        return self.generic(rng), None

    # -- stage 1 ----------------------------------------------------------------------------
    def mcq(self, text: str, rng: random.Random) -> dict[str, Any]:
        objs = [
            Obj(m.group(1), m.group(2), tuple(float(m.group(i)) for i in range(3, 7)))  # type: ignore[arg-type]
            for m in _OBJ_LINE.finditer(text)
        ]
        count = int(_search(r"Write (\d+) multiple-choice", text, "4"))
        n_opt = int(_search(r"Give exactly (\d+) options", text, "4"))
        width = float(_search(r"Image size: (\d+) x", text, "640"))
        caption = text.split("Dense caption:", 1)[-1].split("Annotated objects", 1)[0]
        makers = [_existence, _counting, _spatial, _size, _position, _colour]
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for attempt in range(count * 6):
            if len(out) >= count or not objs:
                break
            maker = makers[(attempt + rng.randrange(len(makers))) % len(makers)]
            draft = maker(objs, rng, n_opt, width, caption)
            if draft is None or draft.ident in seen:
                continue
            q = _settle(draft, n_opt, rng, self.cfg.seed)
            if q is None:
                continue
            seen.add(draft.ident)
            out.append(q)
        questions = []
        for q in out:
            options = list(q["options"])
            correct = options[0]
            rng.shuffle(options)
            item = {
                "question": q["question"],
                "options": options,
                "answer": LETTERS[options.index(correct)],
                "skill": q["skill"],
                "grounding": q["grounding"],
            }
            if rng.random() < self.cfg.bad_question_rate:
                item = _spoil(item, rng)
            questions.append(item)
        return {"questions": questions}

    # -- stage 2 ----------------------------------------------------------------------------
    def compose(self, text: str, rng: random.Random) -> dict[str, Any]:
        operator = _search(r"Composition: (\w+)\.", text, "conjunction")
        answer = _search(r'correct answer to the composed question is: "(.*)"', text, "")
        suggested = _search(r"Suggested options \(the correct one included\): (.*)", text, "")
        options = [s.strip() for s in suggested.split(" | ") if s.strip()]
        parents = re.findall(r"^\d+\. (.*?) -> (.*)$", text, re.M)
        avoid = [n for n in _search(r"Never name it: (.*?)\.\s*$", text, "").split(", ") if n]
        stems = _compose_stems(operator, parents, avoid)
        rng.shuffle(stems)
        # Word the question so that the world's answer key agrees with the given answer; if no
        # wording does, the "model" marks the option its world holds right (a realistic
        # disagreement with the parents, which the stage rejects as answer_mismatch).
        question = next(
            (s for s in stems if answer_key(self.cfg.seed, s, options) == answer), stems[0]
        )
        rng.shuffle(options)
        marked = answer_key(self.cfg.seed, question, options)
        letter = LETTERS[options.index(marked)] if marked in options else "A"
        return {"question": question, "options": options, "answer": letter}

    # -- annotation -------------------------------------------------------------------------
    def annotate(self, user: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        size = image_size(user) or (640, 480)
        w, h = size
        labels = rng.sample(VOCAB, k=rng.randint(3, 6))
        counts = [rng.choice(INSTANCES) for _ in labels]
        objects = []
        for label, count in zip(labels, counts, strict=True):
            scale = 0.3 if count == 1 else 0.15  # several of a kind: smaller each
            for _ in range(count):
                x0 = rng.uniform(0, w * 0.7)
                y0 = rng.uniform(0, h * 0.7)
                x1 = min(w, x0 + rng.uniform(w * scale / 3, w * scale))
                y1 = min(h, y0 + rng.uniform(h * scale / 3, h * scale))
                box = [round(x0), round(y0), round(x1), round(y1)]
                if not objects and rng.random() < self.cfg.bad_question_rate:
                    box = [round(w * 0.8), round(h * 0.8), round(w * 1.3), round(h * 1.2)]
                objects.append({"label": label, "box": box})
        kinds = zip(labels, counts, strict=True)
        listed = ", ".join(f"a {label}" if c == 1 else f"{c} {label}s" for label, c in kinds)
        firsts = [next(o for o in objects if o["label"] == label) for label in labels]
        caption = (
            f"[simulated annotation of a {w}x{h} image, not a model's description] "
            f"The scene contains {listed}. "
            + " ".join(
                f"A {a['label']} is {'left of' if a['box'][0] < b['box'][0] else 'right of'}"
                f" a {b['label']}."
                for a, b in zip(firsts, firsts[1:], strict=False)
            )
        )
        return {"caption": caption, "objects": objects}

    # -- reasoning traces -------------------------------------------------------------------
    def _truth(self, text: str) -> tuple[str, list[tuple[str, str]], str | None]:
        question = parse_question(text)
        options = parse_options(text)
        answer = answer_key(self.cfg.seed, question, [opt for _, opt in options])
        letter = next((ltr for ltr, opt in options if answer is not None and opt == answer), None)
        return question, options, letter

    def accuracy(self, question: str) -> float:
        """The mean chance a rollout answers this question right: 1 - its skill's error rate."""
        rate = self.cfg.skill_error.get(skill_of(question))
        return self.cfg.accuracy if rate is None else 1.0 - rate

    def rollout(self, text: str, body: dict[str, Any], index: int, rng: random.Random) -> str:
        question, options, truth = self._truth(text)
        if not options:
            return self.generic(rng)
        # Each skill its mean accuracy, each question its own difficulty around it, each
        # rollout its own draw against that.
        p = min(
            1.0,
            max(0.0, self.accuracy(question) + (seeded_unit("difficulty", question) - 0.5) * 1.4),
        )
        right = truth is not None and rng.random() < p
        wrong = [ltr for ltr, _ in options if ltr != truth]
        letter = truth if right else rng.choice(wrong or [options[0][0]])
        chosen = dict(options)[letter]
        steps = [
            f"The question asks: {question}",
            rng.choice(
                [
                    "I look at the relevant part of the image.",
                    "Let me find the objects the question mentions in the image.",
                    "I scan the image for the objects involved.",
                ]
            ),
            f'Comparing the options, "{chosen}" fits what I see best.',
            f"So the answer should be ({letter}).",
        ]
        thinking = "\n".join(steps)
        return "\n" + self._ending(thinking, letter, options, rng)

    def expand(
        self, text: str, prefill: str, body: dict[str, Any], index: int, rng: random.Random
    ) -> tuple[str, str | None]:
        question, options, truth = self._truth(text)
        prior = re.findall(r"\(([A-H])\)", prefill)
        before = prior[-1] if prior else None
        if truth is None:
            letter = before or (options[0][0] if options else "A")
        elif before == truth:
            letter = truth if rng.random() < self.cfg.expand_keep else _other(options, truth, rng)
        else:
            letter = truth if rng.random() < self.cfg.expand_fix else (before or truth)
        chosen = dict(options).get(letter, "")
        moves = [
            " let me double-check this before answering.",
            f' I should verify the option "{chosen}" against the image again.',
        ]
        if before and before != letter:
            moves.append(f" Actually, ({before}) does not look right; let me reconsider.")
            moves.append(" First, I need to pin down which object the question refers to.")
        if rng.random() < 0.4:
            moves.append(" Working backwards from the options, I can rule out the others.")
        leak = (
            planted_leak(rng, body.get("bad_words")) if rng.random() < self.cfg.leak_rate else None
        )
        moves.append(f" Yes, the answer is ({letter}).")
        if leak:  # anywhere: first sentence after the cue, middle, or last
            moves.insert(rng.randrange(len(moves) + 1), leak)
        thinking = "\n".join(moves)
        if self.cfg.thinking == "none":  # not a reasoner: answers without closing its thinking
            return f"The answer is ({letter}).", None
        if rng.random() < self.cfg.degenerate_rate:
            thinking += "\n" + " ".join(["Let me check again."] * 40)
        reply = self._ending(thinking, letter, options, rng)
        if self.cfg.split_reasoning:  # like vLLM's reasoning parser
            if "\n</think>\n\n" not in reply:
                return "", reply  # no `</think>`: all of it is reasoning
            thought, _, answer = reply.partition("\n</think>\n\n")
            return answer, thought
        return reply, None

    def _ending(
        self, thinking: str, letter: str, options: list[tuple[str, str]], rng: random.Random
    ) -> str:
        """Close the thinking and state the answer, with the failure modes real models show
        (each at its configured rate): no answer, two letters, no `</think>`, other styles."""
        c = self.cfg
        draw = rng.random()
        if draw < c.unparseable_rate:
            return f"{thinking}\n</think>\n\nI am not sure."
        draw -= c.unparseable_rate
        if draw < c.conflicting_rate:
            other = _other(options, letter, rng)
            return f"{thinking}\n</think>\n\nAnswer: {letter}\nThe answer is {other}."
        draw -= c.conflicting_rate
        if draw < c.no_think_close_rate:
            return f"{thinking}\nAnswer: {letter}"
        style = ANSWER_STYLES[0]
        if rng.random() < c.answer_style_rate:
            style = rng.choice(ANSWER_STYLES[1:])
        return f"{thinking}\n</think>\n\n{style.format(x=letter)}"

    def blind(self, text: str, rng: random.Random) -> str:
        """A text-only answer: at chance, unless the wording gives the answer away."""
        question, options, _ = self._truth(text)
        if not options:
            return self.generic(rng)
        letter = prior_answer(question, options) or rng.choice([ltr for ltr, _ in options])
        return f"Answer: {letter}"

    # -- behaviour tagging -------------------------------------------------------------------
    def behaviours(self, text: str) -> dict[str, int]:
        """Counts by the simulator's own keyword lists (a stand-in for a classifier)."""
        thinking = text.split("</think>", 1)[0].lower()
        return {
            name: sum(thinking.count(w) for w in words) for name, words in _BEHAVIOUR_WORDS.items()
        }

    def generic(self, rng: random.Random) -> str:
        words = ["simulated", "reply", "from", "the", "lgt", "test", "double"]
        out, size = [], 0
        while size < self.cfg.completion_chars:
            out.append(rng.choice(words))
            size += len(out[-1]) + 1
        return " ".join(out)


def schema_instance(schema: dict[str, Any]) -> Any:
    """The smallest instance of a JSON schema (first enum value, required properties only)."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: schema_instance(props.get(k) or {}) for k in schema.get("required", [])}
    if kind == "array":
        return [schema_instance(schema.get("items") or {})] * int(schema.get("minItems", 0))
    return {"boolean": True, "integer": 0, "number": 0, "string": "ok"}.get(str(kind))


# -- the answer key: ground truth derivable from a question and its options ----------------
def answer_key(seed: int, question: str, options: Sequence[str]) -> str | None:
    """The option the world holds correct: a pure function of (seed, question, option set)."""
    if not options:
        return None
    q = norm(question)
    if _consecutive_counts(options):
        # A count among consecutive options: the one at the question's residue, so the key
        # is the same for every window of counts the pipeline may lay out around it.
        at = int(sha256_hex(canonical_json(["count", seed, q])), 16) % len(options)
        return next(o for o in options if int(o) % len(options) == at)
    return min(options, key=lambda o: sha256_hex(canonical_json(["answer", seed, q, norm(o)])))


def _consecutive_counts(options: Sequence[str]) -> bool:
    if not all(re.fullmatch(r"[0-9]+", o.strip()) for o in options):
        return False
    values = sorted(int(o) for o in options)
    return values == list(range(values[0], values[0] + len(values)))


def canonical_messages(messages: Any) -> Any:
    """Messages with each image reduced to its identity (not how it was sent).

    A data URL becomes the hash of its bytes; an http(s) URL its path, without the host (a
    store's port) or the query (a presigned URL's signature and expiry, new on every send).
    """
    if not isinstance(messages, list):
        return messages
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) else ""
                if url:
                    part = {**part, "image_url": {"url": image_identity(url)}}
                parts.append(part)
            msg = {**msg, "content": parts}
        out.append(msg)
    return out


def image_identity(url: str) -> str:
    if url.startswith("data:"):
        return "sha256:" + sha256_hex(url)
    if url.startswith(("http://", "https://")):
        return "path:" + urlsplit(url).path
    return url


@dataclass
class Draft:
    """A question before wording: `stems` are equivalent wordings, `pool` the distractors."""

    ident: str  # what the question asks, independent of wording (one per image)
    stems: list[str]
    correct: str
    pool: list[str]
    skill: str
    grounding: list[str]
    option_ids: dict[str, str] = field(default_factory=dict)  # options that ground objects


SETTLE_TRIES = 32


def _settle(draft: Draft, n_opt: int, rng: random.Random, seed: int) -> dict[str, Any] | None:
    """Word the draft and pick distractors so that the answer key names the correct option."""
    k = n_opt - 1
    pool = list(dict.fromkeys(p for p in draft.pool if p != draft.correct))
    if len(pool) < k:
        return None
    for _ in range(SETTLE_TRIES):
        stem = rng.choice(draft.stems)
        distractors = rng.sample(pool, k)
        options = [draft.correct, *distractors]
        if answer_key(seed, stem, options) == draft.correct:
            extra = [draft.option_ids[d] for d in distractors if d in draft.option_ids]
            return {
                "question": stem,
                "options": options,
                "skill": draft.skill,
                "grounding": [*draft.grounding, *extra],
            }
    return None


# -- question makers -------------------------------------------------------------------------
EXISTENCE_STEMS = (
    "Which of these objects can be seen in the image?",
    "Which of these objects appears in the image?",
    "Which of these objects is present in the image?",
    "Which one of these objects is in the image?",
    "Which of these objects does the image show?",
    "Which of these objects can you find in the image?",
)
COUNTING_STEMS = (
    "How many {} are visible in the image?",
    "How many {} can be seen in the image?",
    "How many {} are there in the image?",
    "How many {} does the image show?",
    "How many {} appear in the image?",
    "How many {} can you see in the image?",
    "How many {} does the picture show?",
    "How many {} are visible in the picture?",
    "How many {} can be seen in the picture?",
    "How many {} are in the picture?",
)
SPATIAL_STEMS = (
    "Which object is to the left of the {}?",
    "Which object is left of the {}?",
    "What is to the left of the {}?",
    "Which object can be seen to the left of the {}?",
)
SIZE_STEMS = (
    "Which of these takes up the most space in the image?",
    "Which of these objects is the largest in the image?",
    "Which of these covers the largest area of the image?",
    "Which of these objects looks biggest in the image?",
    "Which of these occupies the most space in the image?",
)
POSITION_STEMS = (
    "Where in the image is the {}?",
    "Where is the {} in the image?",
    "In which part of the image is the {}?",
    "Where can the {} be found in the image?",
    "Where in the picture is the {}?",
    "Whereabouts in the image is the {}?",
    "In what part of the image is the {} located?",
    "Where is the {} located in the image?",
)
COLOUR_STEMS = (
    "What colour is the {}?",
    "What is the colour of the {}?",
    "Which colour is the {}?",
    "What colour does the {} have?",
)


def _absent(objs: list[Obj]) -> list[str]:
    present = {o.label for o in objs}
    return [v for v in VOCAB if v not in present]


def _existence(objs, rng, n_opt, width, caption):  # noqa: ANN001, ANN202, ARG001
    obj = rng.choice(objs)
    return Draft(
        "existence", list(EXISTENCE_STEMS), obj.label, _absent(objs), "existence", [obj.id]
    )


def _counting(objs, rng, n_opt, width, caption):  # noqa: ANN001, ANN202, ARG001
    counts = Counter(o.label for o in objs)
    label = rng.choice(sorted(counts))
    n = counts[label]
    # Like a real writer: consecutive counts with the true one at or near the bottom (the
    # pipeline lays counting options out again; the answer key survives any such window).
    low = max(1, n - 1)
    pool = [str(v) for v in range(low, low + n_opt) if v != n]
    noun = label if label.endswith("s") else label + "s"
    return Draft(
        f"counting:{label}",
        [s.format(noun) for s in COUNTING_STEMS],
        str(n),
        pool,
        "counting",
        [o.id for o in objs if o.label == label],
    )


def _spatial(objs, rng, n_opt, width, caption):  # noqa: ANN001, ANN202, ARG001
    counts = Counter(o.label for o in objs)
    unique = [o for o in objs if counts[o.label] == 1]
    pairs = [(a, b) for a in unique for b in unique if a.label != b.label and a.box[2] < b.box[0]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    left_of_b = {o.label for o in objs if o.cx < b.cx}
    others = [o.label for o in unique if o.label not in left_of_b and o.label != b.label]
    # Objects of the image first (plausible), then a few absent ones.
    pool = [*others, *rng.sample(_absent(objs), n_opt + 1)]
    return Draft(
        f"spatial:{b.label}",
        [s.format(b.label) for s in SPATIAL_STEMS],
        a.label,
        pool,
        "spatial",
        [a.id, b.id],
    )


def _size(objs, rng, n_opt, width, caption):  # noqa: ANN001, ANN202, ARG001
    counts = Counter(o.label for o in objs)
    unique = [o for o in objs if counts[o.label] == 1]
    if len(unique) < n_opt:
        return None
    big = rng.choice(unique)
    smaller = [o for o in unique if 1.2 * o.area <= big.area]  # clearly smaller, by eye
    return Draft(
        "size",
        list(SIZE_STEMS),
        big.label,
        [o.label for o in smaller],
        "size",
        [big.id],
        {o.label: o.id for o in smaller},
    )


def _position(objs, rng, n_opt, width, caption):  # noqa: ANN001, ANN202, ARG001
    counts = Counter(o.label for o in objs)
    unique = [o for o in objs if counts[o.label] == 1 and (o.box[2] - o.box[0]) < width / 3]
    if not unique or n_opt != 4:
        return None
    o = rng.choice(unique)
    third = min(2, int(3 * o.cx / width))
    correct = POSITIONS[third]
    return Draft(
        f"position:{o.label}",
        [s.format(o.label) for s in POSITION_STEMS],
        correct,
        [p for p in POSITIONS if p != correct],
        "position",
        [o.id],
    )


def _colour(objs, rng, n_opt, width, caption):  # noqa: ANN001, ANN202, ARG001
    low = caption.lower()
    found = []
    for o in objs:
        m = re.search(
            r"\b(" + "|".join(COLOURS) + r")\s+(?:[a-z-]+\s+)?" + re.escape(o.label) + r"\b", low
        )
        if m:
            found.append((o, m.group(1)))
    if not found:
        return None
    o, colour = rng.choice(found)
    others = [c for c in COLOURS if c not in (colour, "gray" if colour == "grey" else "grey")]
    return Draft(
        f"colour:{o.label}",
        [s.format(o.label) for s in COLOUR_STEMS],
        colour,
        others,
        "attribute",
        [o.id],
    )


def _spoil(item: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A realistic model mistake, so validation paths run in every demo."""
    kind = rng.choice(["duplicate_options", "unknown_grounding", "bad_letter", "giveaway"])
    item = dict(item)
    if kind == "duplicate_options":
        item["options"] = [item["options"][0]] * 2 + item["options"][2:]
    elif kind == "unknown_grounding":
        item["grounding"] = ["o99"]
    elif kind == "bad_letter":
        item["answer"] = "Z"
    else:
        idx = LETTERS.index(item["answer"])
        opts = list(item["options"])
        opts[idx] = opts[idx] + ", which is clearly and unmistakably the right answer here"
        item["options"] = opts
    return item


def planted_leak(rng: random.Random, bad_words: Any) -> str | None:
    """A leak phrasing the decoder allows: none containing a banned word (vLLM `bad_words`)."""
    banned = [w for w in bad_words or () if isinstance(w, str) and w]
    allowed = [p for p in LEAKS if not any(w in p for w in banned)]
    return rng.choice(allowed) if allowed else None


def scrub(text: str, banned: Sequence[str]) -> str:
    """The text with every banned word gone (longest first), as banned decoding leaves it."""
    for w in sorted(banned, key=len, reverse=True):
        text = text.replace(w, "")
    return text


def _other(options: list[tuple[str, str]], truth: str, rng: random.Random) -> str:
    wrong = [ltr for ltr, _ in options if ltr != truth]
    return rng.choice(wrong) if wrong else truth


_COMPOSED_SKILLS = (
    ("count_over", re.compile(r"altogether|in total|total number|counted together", re.I)),
    ("compare", re.compile(r"more numerous|there more of|\bmore \w.* or more\b", re.I)),
    ("chain", re.compile(r"\banswers? (?:to )?\"", re.I)),  # refers to hop 1 by its question
    ("conjunction", re.compile(r"(?:pair|combination) of answers", re.I)),
)
_STEM_SKILLS = (
    ("counting", COUNTING_STEMS),
    ("spatial", SPATIAL_STEMS),
    ("position", POSITION_STEMS),
    ("attribute", COLOUR_STEMS),
    ("existence", EXISTENCE_STEMS),
    ("size", SIZE_STEMS),
)


def skill_of(question: str) -> str:
    """The skill a question tests, from the wordings the simulator writes (its per-skill error
    rates key on it); `other` for a wording it does not know."""
    q = question.strip()
    for skill, rx in _COMPOSED_SKILLS:
        if rx.search(q):
            return skill
    for skill, stems in _STEM_SKILLS:
        for stem in stems:
            head, _, tail = stem.partition("{}")
            if q.startswith(head) and q.endswith(tail) and len(q) >= len(head) + len(tail):
                return skill
    return "other"


def _count_noun(question: str) -> str:
    """The counted noun of any counting wording ("How many cups are visible ..." -> cups)."""
    q = question.strip().rstrip("?")
    for stem in COUNTING_STEMS:
        head, tail = stem.rstrip("?").split("{}")
        if q.startswith(head) and q.endswith(tail) and len(q) > len(head) + len(tail):
            return q[len(head) : len(q) - len(tail)]
    return q


def prior_answer(question: str, options: list[tuple[str, str]]) -> str | None:
    """The letter a text-only model picks from the wording alone, if the wording suggests one:
    the usual colour of the thing a colour question names (COLOUR_PRIORS)."""
    q = question.strip()
    for stem in COLOUR_STEMS:
        head, tail = stem.split("{}")
        if q.startswith(head) and q.endswith(tail) and len(q) > len(head) + len(tail):
            thing = q[len(head) : len(q) - len(tail)].lower()
            colour = COLOUR_PRIORS.get(thing) or COLOUR_PRIORS.get(thing.split()[-1])
            return next((ltr for ltr, opt in options if opt.lower() == colour), None)
    return None


def _unname(question: str, names: Sequence[str]) -> str:
    """The question with every forbidden name (and its article) replaced by "that object"."""
    for name in sorted(names, key=len, reverse=True):
        pattern = rf"\b(?:the |a |an )?{re.escape(name)}\b"
        question = re.sub(pattern, "that object", question, flags=re.I)
    return question


def _compose_stems(
    operator: str, parents: list[tuple[str, str]], avoid: Sequence[str] = ()
) -> list[str]:
    """Equivalent wordings of the composed question (the answer key picks among them)."""
    qs = [q.rstrip("?") for q, _ in parents]
    leads = ("", "Looking at the image, ", "In this image, ", "Based on the image, ")
    if operator in ("count_over", "compare") and len(qs) >= 2:
        a, b = (_count_noun(q) for q in qs[:2])
        if operator == "count_over":
            bodies = (
                f"how many {a} and {b} are visible in the image altogether?",
                f"how many {a} and {b} are there in total?",
                f"what is the total number of {a} and {b}?",
                f"how many {a} and {b} can be seen, counted together?",
            )
        else:
            bodies = (
                f"are there more {a} or more {b} in the image, and how many more?",
                f"which are more numerous, the {a} or the {b}, and by how many?",
                f"does the image show more {a} or more {b}, and by how many?",
                f"which is there more of, {a} or {b}, and how many more?",
            )
    elif operator == "chain" and len(qs) >= 2:
        # The second question asks about the object the first one resolves: refer to it
        # through the first question and never by the names the prompt forbids.
        first = qs[0][0].lower() + qs[0][1:]
        second = _unname(qs[1], avoid)
        bodies = (
            f'take the answer to "{first}". {second}?',
            f'consider the object that answers "{first}". {second}?',
            f'first answer "{first}". Then: {second}?',
            f'think of the answer to "{first}". {second}?',
        )
    else:
        lowered = "; and ".join(q[0].lower() + q[1:] for q in qs if q)
        bodies = (
            f"which pair of answers is correct: {lowered}?",
            f"which combination of answers is right: {lowered}?",
            f"which pair of answers holds: {lowered}?",
            f"select the correct pair of answers: {lowered}?",
        )
    return [_capitalise(lead + body) for lead in leads for body in bodies]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _search(pattern: str, text: str, default: str) -> str:
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else default
