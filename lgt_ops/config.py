"""Typed settings: where data lives, which endpoints to call, and the method's knobs.

One `Settings` object is built from the environment (CLI, compose) or from Airflow
Connections (see `lgt_ops.airflow_adapter`); everything else in the library takes it as an
argument. Method parameters live in `MethodParams`; they feed the stage fingerprints, so any
change to them re-runs exactly the stages that depend on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, field_validator

from lgt_ops.failures import EXIT_USAGE, PermanentFailure

ROLES: tuple[str, ...] = ("vlm", "llm", "reasoner")

DEFAULT_MODELS: dict[str, str] = {
    "vlm": "Qwen/Qwen2.5-VL-7B-Instruct",
    "llm": "Qwen/Qwen2.5-7B-Instruct",
    "reasoner": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
}


class ConfigError(PermanentFailure, ValueError):
    """A setting is missing or invalid; the message names the setting."""

    exit_code = EXIT_USAGE


def joined_urls(urls: str | Iterable[object] | None) -> str | None:
    """Replica base URLs as `EndpointSettings.base_url` holds them: a list (or a string of
    comma-separated URLs) -> one comma-separated string."""
    items = urls.split(",") if isinstance(urls, str) else list(urls or [])
    return ",".join(s for u in items if (s := str(u).strip())) or None


class EndpointSettings(BaseModel):
    """One role's OpenAI-compatible endpoint: one server (vLLM, or the simulator in tests) or
    several replicas serving the same model, which the request engine balances."""

    model_config = ConfigDict(frozen=True)

    role: str
    # One base URL, or several replicas separated by commas (a list is joined so).
    base_url: str | None = None
    model: str
    api_key: SecretStr | None = None
    max_inflight: int = Field(default=64, ge=1, le=4096)
    min_inflight: int = Field(default=4, ge=1)
    adaptive: bool = True
    timeout_s: float = Field(default=300.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    max_regenerations: int = Field(default=2, ge=0)
    down_after_s: float = Field(default=120.0, gt=0)
    supports_n: bool = True

    @field_validator("base_url", mode="before")
    @classmethod
    def _join_replicas(cls, value: object) -> object:
        return joined_urls(value) if isinstance(value, list | tuple) else value

    @property
    def urls(self) -> tuple[str, ...]:
        """The replicas' base URLs (none when unset), without trailing slashes or repeats."""
        parts = (u.strip().rstrip("/") for u in (self.base_url or "").split(","))
        return tuple(dict.fromkeys(u for u in parts if u))

    def require_urls(self) -> tuple[str, ...]:
        if not self.urls:
            raise ConfigError(
                f"no endpoint configured for role '{self.role}': set LGT_{self.role.upper()}"
                "_BASE_URL (one URL, or several replicas separated by commas; or the Airflow"
                f" connection lgt_{self.role}), or run `lgt demo`, which starts the simulator"
            )
        return self.urls

    def replicas(self) -> list[EndpointSettings]:
        """One endpoint per replica, each with a single base URL (the preflight checks each)."""
        return [self.model_copy(update={"base_url": url}) for url in self.require_urls()]


class ImageSpec(BaseModel):
    """How an image is prepared for a VLM request. Part of the request key."""

    model_config = ConfigDict(frozen=True)

    max_side: int = Field(default=1024, ge=64, le=8192)
    format: Literal["JPEG", "PNG"] = "JPEG"
    quality: int = Field(default=90, ge=50, le=100)
    transport: Literal["data_url", "presigned_url"] = "data_url"


def _method_params() -> type[BaseModel]:
    """The method's knobs (METHOD.md): the union of the stage configs in the registry, so a
    stage's knob is declared once, in its `Config`, and an unknown knob is an error."""
    from lgt_ops import registry

    bases = tuple(dict.fromkeys(s.Config for s in registry.PIPELINE))
    return create_model(
        "MethodParams", __base__=bases, __doc__="The method's knobs (all stage configs)."
    )


MethodParams: Any = _method_params()


def method_problems(
    values: Mapping[str, object], names: Mapping[str, str] | None = None
) -> list[str]:
    """Why these method knob values are invalid together (one line each; [] when valid).

    Checks what a JSON schema cannot: the stage configs' own validators, including the rules
    that span knobs (trace_min_chars below trace_max_chars, ...). `names` maps a knob to the
    name the caller knows it by (a run parameter's name)."""
    from pydantic import ValidationError

    try:
        MethodParams.model_validate(dict(values))
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            loc = err["loc"]
            if loc:
                knob = str(loc[0])
                out.append(f"parameter '{(names or {}).get(knob, knob)}': {msg}")
            else:
                out.append(msg)  # a rule over several knobs: its message names them
        return out
    return []


# -- ingest limits (kept in one block) ----------------------------------------------------------
class IngestLimits(BaseModel):
    """What one key may cost ingest: a huge caption, a flood of objects or one giant image is
    rejected with a reason (or waits its turn) instead of filling the lineage DB or memory."""

    model_config = ConfigDict(frozen=True)

    max_caption_chars: int = Field(default=10_000, ge=1)
    max_objects_per_image: int = Field(default=500, ge=1)
    max_manifest_line_bytes: int = Field(default=1_000_000, ge=256)
    max_file_bytes: int = Field(default=512 * 2**20, ge=1)  # larger objects are not downloaded
    # decoded pixels held at once across concurrent decodes (~6 bytes of RSS per pixel,
    # measured by bench/ingest_memory.py); an image larger than the budget is decoded alone
    decode_pixel_budget: int = Field(default=64_000_000, ge=1)

    def fingerprint_fields(self) -> dict[str, int]:
        """The caps that change what ingest records (the decode budget does not)."""
        return self.model_dump(exclude={"decode_pixel_budget"})


_INGEST_ENV = {
    "max_caption_chars": "LGT_INGEST_MAX_CAPTION_CHARS",
    "max_objects_per_image": "LGT_INGEST_MAX_OBJECTS",
    "max_manifest_line_bytes": "LGT_INGEST_MAX_LINE_BYTES",
    "max_file_bytes": "LGT_INGEST_MAX_FILE_BYTES",
    "decode_pixel_budget": "LGT_INGEST_PIXEL_BUDGET",
}


def ingest_limits_from_env(env: Mapping[str, str]) -> IngestLimits:
    defaults = IngestLimits()
    return IngestLimits(
        **{f: _env_int(env, var, getattr(defaults, f)) for f, var in _INGEST_ENV.items()}
    )


# -- end of ingest limits -----------------------------------------------------------------------


# -- decontamination against evaluation benchmarks (kept in one block) ---------------------------
class DecontamSettings(BaseModel):
    """Where the user's evaluation benchmarks are and how close counts as contaminated.

    `prefix` holds one folder per benchmark (its images, and optionally `questions.jsonl`);
    the folder name is the benchmark's name in `contaminated:<benchmark>`. An empty or
    missing prefix checks nothing.
    """

    model_config = ConfigDict(frozen=True)

    prefix: str = "benchmarks/"
    # Hamming distance between 64-bit pHashes at or below which an image is a benchmark copy
    # (sample copies resized, re-encoded, cropped <= 8 % a side: <= 8 bits; distinct: >= 20)
    phash_distance: int = Field(default=10, ge=0, le=32)
    ngram: int = Field(default=3, ge=1, le=13)  # word n-grams of question text and options
    # share of a benchmark question's n-grams a question must contain to match it
    ngram_overlap: float = Field(default=0.6, gt=0, le=1)
    max_images: int = Field(default=5000, ge=0)  # benchmark images held in memory, at most


_DECONTAM_ENV = {
    "prefix": "LGT_DECONTAM_PREFIX",
    "phash_distance": "LGT_DECONTAM_PHASH_DISTANCE",
    "ngram": "LGT_DECONTAM_NGRAM",
    "ngram_overlap": "LGT_DECONTAM_NGRAM_OVERLAP",
    "max_images": "LGT_DECONTAM_MAX_IMAGES",
}


def decontam_from_env(env: Mapping[str, str]) -> DecontamSettings:
    d = DecontamSettings()
    return DecontamSettings(
        prefix=env.get(_DECONTAM_ENV["prefix"], d.prefix),
        phash_distance=_env_int(env, _DECONTAM_ENV["phash_distance"], d.phash_distance),
        ngram=_env_int(env, _DECONTAM_ENV["ngram"], d.ngram),
        ngram_overlap=_env_float(env, _DECONTAM_ENV["ngram_overlap"], d.ngram_overlap),
        max_images=_env_int(env, _DECONTAM_ENV["max_images"], d.max_images),
    )


# -- end of decontamination ---------------------------------------------------------------------


class Settings(BaseModel):
    """Everything a stage needs to know about its environment."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path
    database_url: str
    store_url: str
    s3_endpoint_url: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str | None = None
    source_prefix: str = "sources/"
    release_name: str = "lgt"
    shard_size: int = Field(default=200, ge=1)
    max_shards: int = Field(default=512, ge=1, le=1024)
    # The request journal: an answer is durable in the ledger at most this long after it
    # arrived, or once this many answers are waiting, whichever comes first (a kill re-sends
    # only requests in flight plus those few). Independent of the stages' output commits.
    ledger_journal_seconds: float = Field(default=0.1, gt=0, le=1.0)
    ledger_journal_answers: int = Field(default=16, ge=1, le=10_000)
    # Airflow's [core] max_map_length: no mapped list (ingest files, image shards) is longer.
    max_map_length: int = Field(default=1024, ge=1)
    endpoints: dict[str, EndpointSettings]
    image_spec: ImageSpec = ImageSpec()
    method: MethodParams = MethodParams()
    ingest: IngestLimits = IngestLimits()
    decontam: DecontamSettings = DecontamSettings()

    def endpoint(self, role: str) -> EndpointSettings:
        try:
            return self.endpoints[role]
        except KeyError as exc:
            raise ConfigError(f"unknown endpoint role '{role}' (known: {ROLES})") from exc

    def with_endpoint_urls(self, urls: Mapping[str, str]) -> Settings:
        """A copy whose endpoints point at `urls` (role -> base URL), e.g. the simulator."""
        eps = {
            role: ep.model_copy(update={"base_url": urls.get(role, ep.base_url)})
            for role, ep in self.endpoints.items()
        }
        return self.model_copy(update={"endpoints": eps})

    def with_method(self, **overrides: object) -> Settings:
        """A copy with these method knobs changed; an unknown knob is an error naming it."""
        unknown = sorted(set(overrides) - set(MethodParams.model_fields))
        if unknown:
            raise ConfigError(f"unknown method setting(s): {', '.join(unknown)}")
        merged = {**self.method.model_dump(), **overrides}
        problems = method_problems(merged)
        if problems:  # a permanent failure, one line: a retry cannot fix a setting
            raise ConfigError("invalid method setting(s): " + "; ".join(problems))
        return self.model_copy(update={"method": MethodParams.model_validate(merged)})


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def endpoint_from_env(role: str, env: Mapping[str, str]) -> EndpointSettings:
    prefix = f"LGT_{role.upper()}_"
    key = env.get(prefix + "API_KEY")
    return EndpointSettings(
        role=role,
        base_url=env.get(prefix + "BASE_URL") or None,
        model=env.get(prefix + "MODEL") or DEFAULT_MODELS[role],
        api_key=SecretStr(key) if key else None,
        max_inflight=_env_int(env, prefix + "MAX_INFLIGHT", 64),
        down_after_s=_env_float(env, prefix + "DOWN_AFTER_S", 120.0),
        adaptive=env.get(prefix + "ADAPTIVE", "1") not in ("0", "false", "False"),
    )


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from LGT_* variables; with none set, the embedded defaults under ./.lgt."""
    env = os.environ if env is None else env
    data_dir = Path(env.get("LGT_DATA_DIR") or ".lgt").absolute()
    access = env.get("AWS_ACCESS_KEY_ID")
    secret = env.get("AWS_SECRET_ACCESS_KEY")
    return Settings(
        data_dir=data_dir,
        database_url=env.get("LGT_DATABASE_URL") or f"sqlite:///{data_dir / 'lineage.db'}",
        store_url=env.get("LGT_STORE_URL") or (data_dir / "store").as_uri(),
        s3_endpoint_url=env.get("LGT_S3_ENDPOINT_URL") or None,
        s3_access_key=SecretStr(access) if access else None,
        s3_secret_key=SecretStr(secret) if secret else None,
        s3_region=env.get("AWS_DEFAULT_REGION") or None,
        source_prefix=env.get("LGT_SOURCE_PREFIX") or "sources/",
        release_name=env.get("LGT_RELEASE_NAME") or "lgt",
        shard_size=_env_int(env, "LGT_SHARD_SIZE", 200),
        ledger_journal_seconds=_env_float(env, "LGT_LEDGER_JOURNAL_SECONDS", 0.1),
        ledger_journal_answers=_env_int(env, "LGT_LEDGER_JOURNAL_ANSWERS", 16),
        endpoints={role: endpoint_from_env(role, env) for role in ROLES},
        ingest=ingest_limits_from_env(env),
        decontam=decontam_from_env(env),
    )
