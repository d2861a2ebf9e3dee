"""Run parameters: one JSON schema for the Airflow trigger form, the CLI and validation.

The DAG builds its `Param`s from `PARAM_SCHEMA` (so the form, its defaults and the CLI can
never disagree) and `RunParams.from_conf` re-validates the whole set, including the checks
that span fields, with messages that name the parameter.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft7Validator
from pydantic import BaseModel, ConfigDict, create_model

from lgt_ops import registry
from lgt_ops.config import ROLES, Settings, method_problems
from lgt_ops.failures import EXIT_USAGE, PermanentFailure

STAGES: tuple[str, ...] = registry.stage_names()
# Stages that run per image shard, in dependency order (the rest run once per run).
SHARD_STAGES: tuple[str, ...] = tuple(s.name for s in registry.shard_stages())
# Airflow pool per model-calling stage: one pool per endpoint role (`lgt_<role>`).
STAGE_POOLS: dict[str, str] = {s.name: s.pool() for s in registry.PIPELINE if s.role}
# Per-task execution timeout in minutes (a model stage may work through ~20k images of a
# shard; start/finish only touch the lineage DB). The runbook's task table lists the same.
TASK_TIMEOUT_MINUTES: dict[str, int] = {
    "start": 10,
    "preflight": 10,
    "scan": 120,
    "plan": 30,
    "finish": 10,
    **{s.name: s.timeout_minutes for s in registry.PIPELINE},
}
_NAME = "^[a-z0-9][a-z0-9_-]{0,63}$"
_VERSION = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

PARAM_SCHEMA: dict[str, dict[str, Any]] = {
    "source": {
        "type": "string",
        "minLength": 1,
        "default": "sources/",
        "title": "Source prefix",
        "description": "Prefix in the lgt_s3 bucket (e.g. sources/docci/) or a full "
        "s3://bucket/prefix holding images and their manifest (JSONL or COCO).",
    },
    "stages": {
        "type": "array",
        "items": {"type": "string", "enum": list(STAGES)},
        # Airflow's form draws an array with top-level `examples` as a multi-select of them.
        "examples": list(STAGES),
        "minItems": 1,
        "uniqueItems": True,
        "default": list(STAGES),
        "title": "Stages to run",
        "description": "Pick one or more; stages not picked are skipped and later stages reuse "
        "what earlier runs made.",
    },
    "sample_size": {
        "type": ["null", "integer"],
        "minimum": 1,
        "default": None,
        "title": "Sample size",
        "description": "Work on this many images only (the same ones every run); empty = all.",
    },
    "k_rollouts": {
        "type": "integer",
        "minimum": 1,
        "maximum": 64,
        "default": 10,
        "title": "VLM rollouts per question (k)",
        "description": "Simple chain-of-thought samples per question (1-64); the pass rate over "
        "them sets the question's difficulty.",
    },
    "mcq_per_image": {
        "type": "integer",
        "minimum": 1,
        "maximum": 64,
        "default": 8,
        "title": "Stage-1 questions asked per image",
        "description": "Multiple-choice questions requested per image (1-64), before "
        "de-duplication and checks.",
    },
    "behaviour_tagger": {
        "type": "string",
        "enum": ["heuristic", "llm"],
        "default": "heuristic",
        "title": "Cognitive-behaviour tagger",
        "description": "heuristic: lexical counts only; llm: also ask the LLM endpoint (the "
        "tag stage) and report its counts.",
    },
    "vlm_model": {
        "type": ["null", "string"],
        "default": None,
        "title": "VLM model override",
        "description": "Model name served by the VLM endpoint (annotate, cot); empty = the "
        "lgt_vlm connection's model.",
    },
    "llm_model": {
        "type": ["null", "string"],
        "default": None,
        "title": "Question-writer model override",
        "description": "Model name for mcq, compose and the LLM tagger; empty = the lgt_llm "
        "connection's model.",
    },
    "reasoner_model": {
        "type": ["null", "string"],
        "default": None,
        "title": "Reasoner model override",
        "description": "Model name for expand; empty = the lgt_reasoner connection's model.",
    },
    "vlm_base_url": {
        "type": ["null", "string"],
        "default": None,
        "title": "VLM endpoint override",
        "description": "OpenAI-compatible base URL ending in /v1 (e.g. http://vllm-vlm:8000/v1),"
        " or several replicas separated by commas; empty = the lgt_vlm connection.",
    },
    "llm_base_url": {
        "type": ["null", "string"],
        "default": None,
        "title": "Question-writer endpoint override",
        "description": "Base URL ending in /v1, or several replicas"
        " separated by commas; empty = the lgt_llm connection.",
    },
    "reasoner_base_url": {
        "type": ["null", "string"],
        "default": None,
        "title": "Reasoner endpoint override",
        "description": "Base URL ending in /v1, or several replicas"
        " separated by commas; empty = the lgt_reasoner connection.",
    },
    "release_name": {
        "type": "string",
        "pattern": _NAME,
        "default": "lgt",
        "title": "Release name",
        "description": "Lower-case letters, digits, '-' and '_' (up to 64); the release is "
        "published as releases/NAME/VERSION.",
    },
    "release_version": {
        "type": ["null", "string"],
        "pattern": _VERSION,
        "default": None,
        "title": "Release version",
        "description": "Letters, digits, '.', '-', '_'. Empty = YYYYMMDD.N. An existing "
        "version is refused; needs the release stage.",
    },
    "dry_run": {
        "type": "boolean",
        "default": False,
        "title": "Dry run",
        "description": "Plan only: count pending work per stage, call no model, publish nothing.",
    },
    "allow_simulated": {
        "type": "boolean",
        "default": False,
        "title": "Allow simulator output in the release",
        "description": "For demos and tests only: publish even when the simulator answered.",
    },
}


# Method knobs with a run parameter of another name (kept for the form and saved confs).
KNOB_ALIASES: dict[str, str] = {"cot_rollouts": "k_rollouts"}


def _knob_param(stage: type[registry.Stage], name: str, info: Any) -> dict[str, Any]:
    """The trigger-form entry of one stage-config field: empty = the configured value."""
    shared = sum(name in s.Config.model_fields for s in registry.PIPELINE) > 1
    owner = "every seeded stage" if shared else f"the {stage.name} stage"
    prop = stage.Config.model_json_schema()["properties"][name]
    schema = {k: v for k, v in prop.items() if k not in ("title", "default")}
    if isinstance(schema.get("type"), str):
        schema["type"] = ["null", schema["type"]]
    if "enum" in schema:
        schema["enum"] = [None, *schema["enum"]]
    return {
        **schema,
        "default": None,
        "title": name if shared else f"{stage.name}: {name}",
        "description": f"A knob of {owner} (default {info.default!r});"
        " empty = the configured value.",
        "section": "Method: shared" if shared else f"Method: {stage.name}",
    }


def _knob_params() -> dict[str, dict[str, Any]]:
    out = {}
    for name, (stage, info) in registry.config_fields().items():
        if KNOB_ALIASES.get(name, name) not in PARAM_SCHEMA:
            out[name] = _knob_param(stage, name, info)
    return out


PARAM_SCHEMA.update(_knob_params())
# The method knobs a run parameter sets (param name -> MethodParams field).
KNOB_PARAMS: dict[str, str] = {
    KNOB_ALIASES.get(name, name): name for name in registry.config_fields()
}


def url_list_problems(name: str, value: Any) -> list[str]:
    """A base URL parameter holds one http(s) URL or several separated by commas (the
    replicas of a role); each bad one is named."""
    if not isinstance(value, str) or not value.strip():
        return []  # null / empty = the connection's; a wrong type is the schema's message
    problems = []
    for url in (u.strip() for u in value.split(",")):
        try:
            parts = urlsplit(url)
            good = parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in url
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            good = False
        if not url:
            problems.append(f"parameter '{name}': an empty URL in the list {value!r}")
        elif not good:
            problems.append(
                f"parameter '{name}': {url!r} is not an http(s) URL (a base URL such as"
                " http://vllm:8000/v1, or several separated by commas)"
            )
    return problems


def source_problems(value: Any) -> list[str]:
    """`source` is a prefix of the lgt_s3 bucket, s3://bucket/prefix or file:///dir: another
    URL would be read as a prefix that holds nothing, and an s3:// URL needs its bucket."""
    if not isinstance(value, str) or "://" not in value:
        return []
    parts = urlsplit(value)
    if parts.scheme not in ("s3", "file"):
        return [
            f"parameter 'source': {value!r} is not a prefix, s3://bucket/prefix or file:///dir"
            f" ({parts.scheme}:// is not read)"
        ]
    if parts.scheme == "s3" and not parts.netloc:
        return [f"parameter 'source': {value!r} names no bucket (s3://bucket/prefix)"]
    return []


class ParamsError(PermanentFailure, ValueError):
    """Invalid run parameters; the message names each offending parameter."""

    exit_code = EXIT_USAGE


class _RunParams(BaseModel):
    """The run's parameters' behaviour; `RunParams` adds one field per PARAM_SCHEMA entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_conf(cls, conf: dict[str, Any] | None) -> _RunParams:
        """Validate a trigger's conf (unknown keys are errors; missing ones get defaults)."""
        conf = dict(conf or {})
        unknown = sorted(set(conf) - set(PARAM_SCHEMA))
        problems = [f"unknown parameter '{k}'" for k in unknown]
        for name, schema in PARAM_SCHEMA.items():
            if name not in conf:
                continue
            for err in Draft7Validator(schema).iter_errors(conf[name]):
                problems.append(f"parameter '{name}': {err.message}")
        for role in ROLES:
            problems += url_list_problems(f"{role}_base_url", conf.get(f"{role}_base_url"))
        problems += source_problems(conf.get("source"))
        stages = conf.get("stages", list(STAGES))
        if conf.get("release_version") and isinstance(stages, list) and "release" not in stages:
            problems.append(
                "parameter 'release_version': set, but the 'release' stage is not"
                " selected in 'stages'"
            )
        if not problems:  # each knob fits its schema: now the stages' own rules, across knobs
            knobs = {KNOB_PARAMS[k]: v for k, v in conf.items() if k in KNOB_PARAMS}
            names = {field: param for param, field in KNOB_PARAMS.items()}
            problems += method_problems({k: v for k, v in knobs.items() if v is not None}, names)
        if problems:
            raise ParamsError("; ".join(problems))
        values = {k: v for k, v in conf.items() if k in PARAM_SCHEMA}
        if "stages" in values:
            values["stages"] = tuple(s for s in STAGES if s in values["stages"])  # canonical order
        return cls(**values)

    def runs(self, stage: str) -> bool:
        """Whether this run selected the stage."""
        return stage in self.stages

    def apply(self, settings: Settings) -> Settings:
        """Settings with this run's model, endpoint and method overrides."""
        endpoints = {}
        for role, ep in settings.endpoints.items():
            update = {}
            if getattr(self, f"{role}_model"):
                update["model"] = getattr(self, f"{role}_model")
            if getattr(self, f"{role}_base_url"):
                update["base_url"] = getattr(self, f"{role}_base_url")
            endpoints[role] = ep.model_copy(update=update) if update else ep
        knobs = {
            field: getattr(self, param)
            for param, field in KNOB_PARAMS.items()
            if getattr(self, param) is not None
        }
        return settings.model_copy(update={"endpoints": endpoints}).with_method(**knobs)


_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool}


def _field(name: str, schema: dict[str, Any]) -> tuple[Any, Any]:
    """(type, default) of a run parameter: a stage knob's own type, else from its schema."""
    knobs = registry.config_fields()
    field = KNOB_PARAMS.get(name)
    if field is not None and field in knobs:
        return knobs[field][1].annotation | None, schema["default"]
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    kind = next(t for t in types if t != "null")
    py = tuple[str, ...] if kind == "array" else _JSON_TYPES[kind]
    default = schema["default"]
    return (py | None if "null" in types else py), (
        tuple(default) if isinstance(default, list) else default
    )


# One field per entry of PARAM_SCHEMA: the form, the CLI and this model cannot disagree.
RunParams = create_model(
    "RunParams",
    __base__=_RunParams,
    **{name: _field(name, schema) for name, schema in PARAM_SCHEMA.items()},
)
