"""What a model stage asks of its endpoint (`StageNeed`), and the request size estimates the
stage classes (lgt_ops.registry) declare it with. The preflight checks these
(lgt_ops.llm.needs, lgt_ops.llm.preflight).

Prompt budgets are upper bounds from the settings, not averages: the template, the largest
caption and object list ingest admits, a question with its options, the simple chain of
thought (at most `cot_max_tokens`) for expand, one image at the configured size for the VLM.
Tokens are counted as 3 characters each (English prose averages ~4), to err on the safe side.

Imported by the registry when the DAG file is parsed: only the light lgt_ops modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lgt_ops import prompts

if TYPE_CHECKING:
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


def tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def template_tokens(name: str | None) -> int:
    """A prompt template's own text (0 for no template)."""
    if name is None:
        return 0
    return tokens(sum(len(body) for _, body in prompts.load(name).sections))


def image_tokens(spec: ImageSpec) -> int:
    side = -(-spec.max_side // IMAGE_PATCH)
    return side * side


def question_tokens() -> int:
    return tokens(QUESTION_CHARS)


def described_tokens(settings: Settings) -> int:
    """The largest image description: a caption and an object list as ingest admits them."""
    m, lim = settings.method, settings.ingest
    objects = max(m.annotate_max_objects, lim.max_objects_per_image)
    return tokens(lim.max_caption_chars + objects * OBJECT_LINE_CHARS)
