"""The stage registry: every stage is one class here, and `PIPELINE` names them in order.

A stage class declares its name, version, endpoint role (or None for a rule stage), prompt
template, upstream stages and a typed `Config` that forbids unknown fields. Everything else
is derived from `PIPELINE`: the run parameters and the trigger form (lgt_ops.params), the
Airflow pools (`lgt_<role>`), the CLI subcommands, the DAG's task group, the preflight's
role needs, the dry run, the method settings (`config.MethodParams` is the union of the
stage configs) and every stage's fingerprint (`fingerprints`).

This module is imported when the DAG file is parsed, so it imports only pydantic and the
light lgt_ops modules (ids, prompts, request_size); a stage's work lives in its
implementation module (`impl`), imported when the stage runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lgt_ops import prompts
from lgt_ops import request_size as size
from lgt_ops.ids import canonical_json, fingerprint
from lgt_ops.request_size import StageNeed

if TYPE_CHECKING:
    from lgt_ops.config import Settings


class StageConfig(BaseModel):
    """A stage's method knobs. Field names are global (they are also run parameters and
    `MethodParams` fields), so each is prefixed with its stage, except the shared `seed`."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _non_empty(v: tuple[str, ...]) -> tuple[str, ...]:
    if not v:
        raise ValueError("must not be empty")
    return v


# An annotated type, not a per-class validator: MethodParams inherits every stage config, and
# same-named validators of two bases would shadow each other there. `minItems` puts the rule
# in the JSON schema too, so the trigger form (the Param schema) refuses an empty list.
def _non_empty_tuple(item: Any) -> Any:
    """A tuple of `item` that must not be empty (validated, and `minItems` in the schema)."""
    return Annotated[
        tuple[item, ...], AfterValidator(_non_empty), Field(json_schema_extra={"minItems": 1})
    ]


NonEmptyStrs = _non_empty_tuple(str)
# The operators lgt_ops.composition implements (its OPERATORS; tests/test_registry.py checks
# they agree): an unknown name would compose nothing, silently, so it is refused.
ComposeOperator = Literal["chain", "compare", "count_over", "conjunction"]


class Seeded(StageConfig):
    seed: int = 1234


class Stage:
    """One pipeline stage. Subclass it, set the class attributes, add it to `PIPELINE`.

    A model stage (role set) plans `WorkItem`s on a shard and handles their outcomes; a rule
    stage (role None) computes from earlier outputs. The default `plan`/`handle` delegate to the
    implementation module `impl`; a stage may instead override them here. Running a stage is
    `stages.runner.run_stage(stage, ...)`: one loop for every stage.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    role: ClassVar[str | None] = None
    template: ClassVar[str | None] = None
    upstream: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[StageConfig]] = StageConfig
    per_shard: ClassVar[bool] = True  # runs per image shard (else once per run)
    timeout_minutes: ClassVar[int] = 360
    impl: ClassVar[str | None] = None  # module with plan()/run() (or handle()/parse())
    # what a model stage asks of its endpoint (`needs`, checked by the preflight); a VLM stage
    # sends an image
    reply_tokens: ClassVar[int | None] = None  # fixed reply budget (else override reply_budget)
    structured: ClassVar[bool] = False  # relies on response_format json_schema
    thinking: ClassVar[bool] = False  # reads the reasoner's thinking

    # -- derived --------------------------------------------------------------------------
    @classmethod
    def pool(cls) -> str:
        return f"lgt_{cls.role}" if cls.role else "default_pool"

    @classmethod
    def module(cls) -> ModuleType:
        if cls.impl is None:
            raise NotImplementedError(f"stage {cls.name} has no implementation module")
        return importlib.import_module(cls.impl)

    @classmethod
    def config(cls, settings: Settings) -> StageConfig:
        """This stage's config, read from the settings' method parameters."""
        m = settings.method
        values = {f: getattr(m, f) for f in cls.Config.model_fields if hasattr(m, f)}
        return cls.Config(**values)

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """Whether the stage does anything under these settings (off = it calls nothing)."""
        return True

    @classmethod
    def fingerprint_extra(cls, settings: Settings) -> dict[str, Any]:
        """Settings outside the stage config that change what the stage makes."""
        if cls.role == "vlm":  # the transport (data URL or presigned URL) changes no pixel
            return {"image_spec": settings.image_spec.model_dump(exclude={"transport"})}
        return {}

    @classmethod
    def fan_out(cls, settings: Settings) -> tuple[int, int]:
        """Dry run: (items per image, requests per item), at most."""
        return 1, 1

    @classmethod
    def has_plan(cls) -> bool:
        return cls.role is not None

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        """Tokens of the largest input one request carries besides its template (an upper
        bound, lgt_ops.request_size); a VLM stage's image by default."""
        return size.image_tokens(settings.image_spec) if cls.role == "vlm" else 0

    @classmethod
    def reply_budget(cls, settings: Settings) -> int:
        """The largest reply one request asks for (its max_tokens)."""
        if cls.reply_tokens is None:
            raise NotImplementedError(
                f"stage {cls.name}: set reply_tokens or override reply_budget"
            )
        return cls.reply_tokens

    @classmethod
    def needs(cls, settings: Settings) -> StageNeed | None:
        """What this stage asks of its endpoint; None when it calls no model (rule stage, off)."""
        if cls.role is None or not cls.enabled(settings):
            return None
        return StageNeed(
            cls.name,
            cls.role,
            size.template_tokens(cls.template) + cls.request_inputs(settings),
            cls.reply_budget(settings),
            image=cls.role == "vlm",
            structured=cls.structured,
            thinking=cls.thinking,
        )

    @classmethod
    def fingerprint(cls, env: Any) -> str:
        """This stage's fingerprint under a StageEnv's settings (see `fingerprints`)."""
        return stage_fingerprint(cls.name, env.settings)

    @classmethod
    def plan(cls, env: Any, spec: Any, shard: Any, sample_size: int | None) -> Any:
        return cls.module().plan(env, spec, shard, sample_size)

    @classmethod
    def handle(cls, env: Any, fp: str, item: Any, outcomes: list[Any]) -> Any:
        """The rows one finished item makes (its outcomes, in request order)."""
        return cls.module().handle(env, fp, item, outcomes)


def _rules_version() -> int:
    """The trace parsing/format rules' version (lgt_ops.traces): what cot, expand and filter
    accept changes with it."""
    from lgt_ops.traces import RULES_VERSION

    return RULES_VERSION


# -- the stages ---------------------------------------------------------------------------------
class IngestConfig(StageConfig):
    max_image_pixels: int = Field(default=64_000_000, ge=1)


class Ingest(Stage):
    name = "ingest"
    Config = IngestConfig
    per_shard = False  # runs per manifest shard file, before the image shards exist
    timeout_minutes = 240
    impl = "lgt_ops.stages.ingest"

    @classmethod
    def fingerprint_extra(cls, settings: Settings) -> dict[str, Any]:
        return {"limits": settings.ingest.fingerprint_fields()}


class AnnotateConfig(Seeded):
    annotate_max_objects: int = Field(default=12, ge=1)


class Annotate(Stage):
    name = "annotate"
    role = "vlm"
    template = "annotate"
    upstream = ("ingest",)
    Config = AnnotateConfig
    reply_tokens = 2048
    structured = True
    impl = "lgt_ops.stages.annotate"


class McqConfig(Seeded):
    mcq_per_image: int = Field(default=8, ge=1, le=64)
    mcq_options: int = Field(default=4, ge=2, le=8)
    mcq_temperature: float = Field(default=0.7, ge=0, le=2)
    mcq_max_tokens: int = Field(default=2048, ge=64)
    mcq_dedup_threshold: float = Field(default=0.8, gt=0, le=1)


class Mcq(Stage):
    name = "mcq"
    version = 2  # counting options laid out by code (stages/mcq.laid_out)
    role = "llm"
    template = "mcq"
    upstream = ("annotate",)
    Config = McqConfig
    structured = True
    impl = "lgt_ops.stages.mcq"

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        return size.described_tokens(settings)

    @classmethod
    def reply_budget(cls, settings: Settings) -> int:
        return settings.method.mcq_max_tokens


class BlindConfig(Seeded):
    # questions a text-only LLM answers from their text and options alone: n samples each.
    # 8 (one request with n=8): a question the model can only guess (1 in 4) reaches 0.75 in
    # 0.4 % of cases (binomial), against 5 % with 4 samples.
    blind_samples: int = Field(default=8, ge=0, le=32)  # 0 = off
    blind_temperature: float = Field(default=0.7, ge=0, le=2)
    # share of samples right at or above which a question is `answerable_without_image`
    blind_reject_at: float = Field(default=0.75, gt=0, le=1)


class Blind(Stage):
    """Stage-1 questions answered without the image, before any VLM rollout (cheap: text
    only, one short reply per sample); a rejected question gets no rollouts and is no parent."""

    name = "blind"
    role = "llm"
    template = "blind"
    upstream = ("mcq",)
    Config = BlindConfig
    reply_tokens = 16
    impl = "lgt_ops.stages.blind"

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        return size.question_tokens()  # text only: the question and its options

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.method.blind_samples > 0

    @classmethod
    def fingerprint_extra(cls, settings: Settings) -> dict[str, Any]:
        return {"n": settings.endpoint("llm").supports_n}

    @classmethod
    def fan_out(cls, settings: Settings) -> tuple[int, int]:
        m = settings.method
        if not cls.enabled(settings):
            return 0, 1
        return m.mcq_per_image, 1 if settings.endpoint("llm").supports_n else m.blind_samples


class ComposeConfig(Seeded):
    compose_per_image: int = Field(default=4, ge=0, le=64)
    compose_per_parent: int = Field(default=2, ge=1, le=16)
    compose_operators: _non_empty_tuple(ComposeOperator) = (
        "chain",
        "compare",
        "count_over",
        "conjunction",
    )
    compose_temperature: float = Field(default=0.7, ge=0, le=2)


class Compose(Stage):
    name = "compose"
    version = 2  # shortcut-free options, well-posed chains (lgt_ops.composition, wellposed)
    role = "llm"
    template = "compose"
    upstream = ("mcq", "cot")  # parents: stage-1 questions the VLM answers (pass rate > 0)
    Config = ComposeConfig
    reply_tokens = 1024
    structured = True
    impl = "lgt_ops.stages.compose"

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        return size.question_tokens() * 3  # two parents + options

    @classmethod
    def fan_out(cls, settings: Settings) -> tuple[int, int]:
        return 1, settings.method.compose_per_image


class CotConfig(Seeded):
    cot_rollouts: int = Field(default=10, ge=1, le=64)
    cot_temperature: float = Field(default=0.7, ge=0, le=2)
    cot_top_p: float = Field(default=0.8, gt=0, le=1)
    cot_max_tokens: int = Field(default=1024, ge=16)
    # difficulty buckets over the pass rate (written with the rollouts)
    easy_at_least: float = Field(default=0.75, ge=0, le=1)
    hard_at_most: float = Field(default=0.25, ge=0, le=1)

    @model_validator(mode="after")
    def _cot_buckets_ordered(self) -> CotConfig:
        # Overlapping buckets would call one pass rate both hard and easy.
        if self.hard_at_most >= self.easy_at_least:
            raise ValueError(
                f"hard_at_most ({self.hard_at_most}) must be below easy_at_least"
                f" ({self.easy_at_least})"
            )
        return self


class Cot(Stage):
    """k VLM rollouts per stage-1 question (that passed the blind check) and its pass rate."""

    name = "cot"
    role = "vlm"
    template = "cot"
    upstream = ("mcq", "blind")
    Config = CotConfig
    impl = "lgt_ops.stages.cot"

    @classmethod
    def fingerprint_extra(cls, settings: Settings) -> dict[str, Any]:
        # n=k in one request or k requests: different seeds, different samples
        extra = super().fingerprint_extra(settings)
        return {**extra, "n": settings.endpoint("vlm").supports_n, "rules": _rules_version()}

    @classmethod
    def fan_out(cls, settings: Settings) -> tuple[int, int]:
        m = settings.method
        supports_n = settings.endpoint("vlm").supports_n
        return cls.questions_per_image(settings), 1 if supports_n else m.cot_rollouts

    @classmethod
    def questions_per_image(cls, settings: Settings) -> int:
        return settings.method.mcq_per_image

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        return super().request_inputs(settings) + size.question_tokens()

    @classmethod
    def reply_budget(cls, settings: Settings) -> int:
        return settings.method.cot_max_tokens


class Cot2Config(StageConfig):
    """No knobs of its own: cot's sampling applies (cot is upstream, so it is in the print)."""


class Cot2(Cot):
    """Stage 2's rollouts: cot's prompt, sampling and difficulty on the composed questions.
    A stage of its own, not cot run twice, so that its task, fingerprint, stage_runs rows and
    selection in `stages` follow from the registry alone; its knobs are cot's (upstream)."""

    name = "cot2"
    upstream = ("compose", "cot")
    Config = Cot2Config
    impl = "lgt_ops.stages.cot2"

    @classmethod
    def questions_per_image(cls, settings: Settings) -> int:
        return settings.method.compose_per_image


class HardenConfig(StageConfig):
    # a composed question is kept only if its pass rate < reference(parents' rates) - margin
    harden_reference: Literal["min", "mean"] = "min"
    harden_margin: float = Field(default=0.0, ge=0, le=1)


class Harden(Stage):
    """The hardness rule over cot2's pass rates (a rule stage: no model). Apart from the
    rollouts, so changing the rule re-judges without touching a rollout's identity."""

    name = "harden"
    upstream = ("cot", "cot2")
    Config = HardenConfig
    timeout_minutes = 60
    impl = "lgt_ops.stages.harden"


class ExpandConfig(Seeded):
    expand_cues: NonEmptyStrs = ("Wait,", "Hmm,", "Alternatively,")
    expand_per_rollout: int = Field(default=2, ge=1, le=8)  # >= 2: X->O>X->X needs siblings
    expand_rollouts_per_question: int = Field(default=4, ge=1, le=64)
    expand_max_tokens: int = Field(default=1024, ge=16)
    expand_temperature: float = Field(default=0.6, ge=0, le=2)
    expand_top_p: float = Field(default=0.95, gt=0, le=1)
    # -- trace quality (kept in one block) --
    # vLLM `bad_words` sent with every expansion request: words that cite the text context
    # (case-sensitive, as vLLM bans token sequences; empty = send none). The filter's leak
    # rules (lgt_ops.traces.leaks) catch what decoding cannot ban without harming visual text.
    expand_bad_words: tuple[str, ...] = (
        "description",
        "Description",
        "descriptions",
        "described",
        "caption",
        "Caption",
        "captions",
        "metadata",
        "annotation",
        "annotations",
        "bounding box",
        "bounding boxes",
        "coordinates",
        "coordinate",
        "pixel",
        "pixels",
        "mental image",
    )
    # -- end of trace quality --


class Expand(Stage):
    name = "expand"
    role = "reasoner"
    template = "expand"
    upstream = ("cot", "cot2", "harden")
    Config = ExpandConfig
    thinking = True
    impl = "lgt_ops.stages.expand"

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        # the description, the question and the simple chain of thought it continues
        m = settings.method
        return size.described_tokens(settings) + size.question_tokens() + m.cot_max_tokens

    @classmethod
    def reply_budget(cls, settings: Settings) -> int:
        return settings.method.expand_max_tokens

    @classmethod
    def needs(cls, settings: Settings) -> StageNeed | None:
        need = super().needs(settings)
        bad_words = bool(settings.method.expand_bad_words)  # an empty list is not sent
        return need and dataclasses.replace(need, bad_words=bad_words)

    @classmethod
    def fingerprint_extra(cls, settings: Settings) -> dict[str, Any]:
        return {"rules": _rules_version()}

    @classmethod
    def fan_out(cls, settings: Settings) -> tuple[int, int]:
        m = settings.method
        questions = m.mcq_per_image + m.compose_per_image
        return questions * min(m.expand_rollouts_per_question, m.cot_rollouts), m.expand_per_rollout


class FilterConfig(StageConfig):
    trace_min_chars: int = Field(default=80, ge=0)
    trace_max_chars: int = Field(default=12_000, ge=100)
    trace_dedup_threshold: float = Field(default=0.9, gt=0, le=1)

    @model_validator(mode="after")
    def _filter_lengths_ordered(self) -> FilterConfig:
        # An empty length window would reject every trace as too short or too long.
        if self.trace_min_chars >= self.trace_max_chars:
            raise ValueError(
                f"trace_min_chars ({self.trace_min_chars}) must be below trace_max_chars"
                f" ({self.trace_max_chars})"
            )
        return self


class Filter(Stage):
    name = "filter"
    upstream = ("cot", "cot2", "harden", "expand")
    Config = FilterConfig
    timeout_minutes = 120
    impl = "lgt_ops.stages.filter"

    @classmethod
    def fingerprint_extra(cls, settings: Settings) -> dict[str, Any]:
        return {"rules": _rules_version(), "tagger": "heuristic"}


class PairsConfig(Seeded):
    pairs_per_question: int = Field(default=4, ge=1, le=64)


class Pairs(Stage):
    name = "pairs"
    upstream = ("filter",)
    Config = PairsConfig
    timeout_minutes = 120
    impl = "lgt_ops.stages.pairs"


class TagConfig(Seeded):
    # cognitive behaviours: lexical heuristics always; "llm" adds the LLM tagger stage
    behaviour_tagger: Literal["heuristic", "llm"] = "heuristic"


class Tag(Stage):
    name = "tag"
    role = "llm"
    template = "behaviours"
    upstream = ("filter",)
    Config = TagConfig
    reply_tokens = 128
    structured = True
    impl = "lgt_ops.stages.tag"

    @classmethod
    def request_inputs(cls, settings: Settings) -> int:
        return size.tokens(settings.method.trace_max_chars)  # the longest trace kept

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.method.behaviour_tagger == "llm"

    @classmethod
    def fan_out(cls, settings: Settings) -> tuple[int, int]:
        if not cls.enabled(settings):
            return 0, 1
        m = settings.method  # every trace: rollouts and their expansions
        questions = m.mcq_per_image + m.compose_per_image
        expanded = min(m.expand_rollouts_per_question, m.cot_rollouts)
        return questions * (m.cot_rollouts + expanded * m.expand_per_rollout), 1


class ReleaseConfig(StageConfig):
    sft_per_question: int = Field(default=2, ge=1, le=64)
    rl_include_saturated: bool = False  # RL prompts with pass rate 0 or 1 carry no signal
    # the image bytes inside the release (self-contained, loads anywhere); False: rows point
    # at the store (a path or URI a loader must reach), and the content hash covers where
    embed_images: bool = True
    rows_per_file: int = Field(default=50_000, ge=100)
    # rows are partitioned by hash(image_id) % release_buckets: one part per bucket and split,
    # so a new image rewrites one part per split (lgt_ops.release.incremental)
    release_buckets: int = Field(default=256, ge=1, le=4096)


class Release(Stage):
    name = "release"
    upstream = (
        "ingest",
        "annotate",
        "mcq",
        "blind",
        "cot",
        "compose",
        "cot2",
        "harden",
        "expand",
        "filter",
        "pairs",
        "tag",
    )
    Config = ReleaseConfig
    per_shard = False
    timeout_minutes = 240
    impl = "lgt_ops.release.publish"

    @classmethod
    def has_plan(cls) -> bool:
        return False


PIPELINE: list[type[Stage]] = [
    Ingest,
    Annotate,
    Mcq,
    Blind,
    Cot,
    Compose,
    Cot2,
    Harden,
    Expand,
    Filter,
    Pairs,
    Tag,
    Release,
]


# -- derived views ------------------------------------------------------------------------------
def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in PIPELINE)


def shard_stages() -> list[type[Stage]]:
    return [s for s in PIPELINE if s.per_shard]


def get(name: str) -> type[Stage]:
    for s in PIPELINE:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage '{name}' (known: {', '.join(stage_names())})")


def config_fields() -> dict[str, tuple[type[Stage], Any]]:
    """Every method knob: field name -> (the first stage that declares it, its FieldInfo)."""
    out: dict[str, tuple[type[Stage], Any]] = {}
    for s in PIPELINE:
        for name, info in s.Config.model_fields.items():
            out.setdefault(name, (s, info))
    return out


# -- fingerprints ---------------------------------------------------------------------------
# Deliberately NOT in a fingerprint (they change how a stage runs, not what it makes):
# - endpoint URL, API key, concurrency, timeouts, retries (EndpointSettings other than
#   `model`; cot, cot2 and blind also hash `supports_n`, which changes the sampling);
# - image_spec.transport (data URL or presigned URL carry the same pixels);
# - IngestLimits.decode_pixel_budget (how many pixels are decoded at once);
# - run-scoped values: source, sample_size, shard layout, release name/version.
_CACHE: dict[str, dict[str, str]] = {}


def _inputs(stage: type[Stage], settings: Settings, done: dict[str, str]) -> dict[str, Any]:
    template = None
    if stage.template is not None:
        t = prompts.load(stage.template)
        template = {"ref": t.ref, "text_sha256": t.text_sha256}
    return {
        "stage": stage.name,
        "v": stage.version,
        "template": template,
        "model": settings.endpoint(stage.role).model if stage.role else None,
        "config": stage.config(settings).model_dump(mode="json"),
        "extra": stage.fingerprint_extra(settings),
        "upstream": {u: done[u] for u in stage.upstream if u in done},
    }


def fingerprints(settings: Settings) -> dict[str, str]:
    """Every stage's fingerprint under these settings, computed once per settings value."""
    templates = [prompts.load(s.template).text_sha256 if s.template else None for s in PIPELINE]
    key = canonical_json(
        [
            settings.model_dump(
                mode="json", include={"method", "endpoints", "image_spec", "ingest"}
            ),
            [(s.name, s.version, s.role, s.upstream) for s in PIPELINE],
            templates,
        ]
    )
    if key not in _CACHE:
        done: dict[str, str] = {}
        for stage in PIPELINE:  # upstream stages come first in PIPELINE
            done[stage.name] = fingerprint(_inputs(stage, settings, done))
        _CACHE[key] = done
    return dict(_CACHE[key])


def stage_fingerprint(name: str, settings: Settings) -> str:
    return fingerprints(settings)[name]
