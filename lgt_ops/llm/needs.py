"""What each model-calling stage asks of its endpoint: the role, the largest request it sends
(prompt budget + max_tokens), and the features it relies on. The preflight checks these.

Prompt budgets are upper bounds from the settings, not averages: the template, the largest
caption and object list ingest admits, a question with its options, the simple chain of
thought (at most `cot_max_tokens`) for expand, one image at the configured size for the VLM.
Tokens are counted as 3 characters each (English prose averages ~4), to err on the safe side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lgt_ops import prompts, registry
from lgt_ops.config import ImageSpec, Settings

CHARS_PER_TOKEN = 3
OBJECT_LINE_CHARS = 40  # "o12: traffic light [120, 40, 180, 200]"
QUESTION_CHARS = 2_000  # a question and its options
IMAGE_PATCH = 28  # Qwen2-VL family: one token per 28 x 28 pixel patch


@dataclass(frozen=True)
class StageNeed:
    stage: str
    role: str
    prompt_tokens: int
    max_tokens: int
    image: bool = False  # sends an image part
    structured: bool = False  # relies on response_format json_schema
    thinking: bool = False  # reads the reasoner's thinking (reasoning_content or inline)
    bad_words: bool = False  # sends vLLM's bad_words (expand, unless its list is empty)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class RoleNeed:
    """The union of what the selected stages ask of one role's endpoint."""

    role: str
    stages: tuple[StageNeed, ...]

    @property
    def largest(self) -> StageNeed:
        return max(self.stages, key=lambda s: s.tokens)

    @property
    def image(self) -> bool:
        return any(s.image for s in self.stages)

    @property
    def structured(self) -> bool:
        return any(s.structured for s in self.stages)

    @property
    def thinking(self) -> bool:
        return any(s.thinking for s in self.stages)

    @property
    def bad_words(self) -> bool:
        return any(s.bad_words for s in self.stages)


def role_of(stage: str) -> str | None:
    """The endpoint role a stage calls (None for stages that call no model)."""
    return registry.get(stage).role


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _template(name: str) -> int:
    return _tokens(sum(len(body) for _, body in prompts.load(name).sections))


def image_tokens(spec: ImageSpec) -> int:
    side = -(-spec.max_side // IMAGE_PATCH)
    return side * side


def stage_needs(settings: Settings, stages: Iterable[str]) -> list[StageNeed]:
    """Needs of the selected model-calling stages (the LLM tagger only when it is on)."""
    m, lim = settings.method, settings.ingest
    described = _tokens(
        lim.max_caption_chars
        + max(m.annotate_max_objects, lim.max_objects_per_image) * OBJECT_LINE_CHARS
    )
    image = image_tokens(settings.image_spec)
    question = _tokens(QUESTION_CHARS)
    table = {
        "annotate": StageNeed(
            "annotate", "vlm", _template("annotate") + image, registry.Annotate.reply_tokens,
            image=True, structured=True,
        ),
        "mcq": StageNeed(
            "mcq", "llm", _template("mcq") + described, m.mcq_max_tokens, structured=True
        ),
        "blind": StageNeed(
            "blind", "llm", _template("blind") + question, registry.Blind.reply_tokens
        ),
        "compose": StageNeed(
            "compose", "llm", _template("compose") + question * 3,  # two parents + options
            registry.Compose.reply_tokens, structured=True,
        ),
        "cot": StageNeed(
            "cot", "vlm", _template("cot") + image + question, m.cot_max_tokens, image=True
        ),
        "cot2": StageNeed(  # cot's prompt and budget on a composed question
            "cot2", "vlm", _template("cot") + image + question, m.cot_max_tokens, image=True
        ),
        "expand": StageNeed(
            "expand", "reasoner",
            _template("expand") + described + question + m.cot_max_tokens,
            m.expand_max_tokens, thinking=True, bad_words=bool(m.expand_bad_words),
        ),
        "tag": StageNeed(
            "tag", "llm", _template("behaviours") + _tokens(m.trace_max_chars),
            registry.Tag.reply_tokens, structured=True,
        ),
    }  # fmt: skip
    selected = [s for s in stages if s in table]
    selected = [s for s in selected if registry.get(s).enabled(settings)]
    for name in selected:
        assert table[name].role == role_of(name), f"{name}: role disagrees with the registry"
    return [table[name] for name in selected]


def role_needs(settings: Settings, stages: Iterable[str]) -> dict[str, RoleNeed]:
    by_role: dict[str, list[StageNeed]] = {}
    for need in stage_needs(settings, stages):
        by_role.setdefault(need.role, []).append(need)
    return {role: RoleNeed(role, tuple(needs)) for role, needs in by_role.items()}
