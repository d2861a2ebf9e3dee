"""The simulator's knobs: service model, fault rates and the fake world's behaviour."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SimConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True)

    # Service model: `slots` requests are served at once, each for latency_ms (+ decoding
    # time when tokens_per_s > 0); the rest queue, as in vLLM. Capacity = slots / latency.
    slots: int = Field(default=64, ge=1)
    latency_ms: float = Field(default=5.0, ge=0)
    tokens_per_s: float = Field(default=0.0, ge=0)
    # Fault injection: probability per HTTP request.
    fault_429: float = Field(default=0.0, ge=0, le=1)
    fault_500: float = Field(default=0.0, ge=0, le=1)
    fault_timeout: float = Field(default=0.0, ge=0, le=1)
    fault_drop: float = Field(default=0.0, ge=0, le=1)
    fault_malformed: float = Field(default=0.0, ge=0, le=1)
    fault_truncated: float = Field(default=0.0, ge=0, le=1)
    fault_invalid_json: float = Field(default=0.0, ge=0, le=1)
    timeout_sleep_s: float = Field(default=30.0, ge=0)
    retry_after_s: float = Field(default=0.05, ge=0)
    # Requests whose text contains this marker get vLLM's context-length 400.
    context_too_long_marker: str | None = "[[lgt-sim:too-long]]"
    # When set, requests must carry "Authorization: Bearer <api_key>" (401 otherwise).
    api_key: str | None = None
    # Every request answers 503 while true (an endpoint that is down for maintenance).
    down: bool = False
    # Goes down (as above) once it has served this many requests: a fault at a known point
    # of the stages' traffic (preflight probes neither count nor are refused by it).
    down_after_served: int | None = Field(default=None, ge=0)
    # The fake world.
    accuracy: float = Field(default=0.6, ge=0, le=1)  # mean chance a VLM rollout is right
    # Error rate (1 - mean accuracy) of rollouts per skill, read from the question's wording
    # (world.skill_of: existence, counting, spatial, size, position, attribute; composed
    # questions by operator: chain, compare, count_over, conjunction); other skills use
    # `accuracy`. On the command line: --skill-error counting=0.5,chain=0.6
    skill_error: dict[str, float] = Field(default_factory=dict)
    expand_keep: float = Field(default=0.85, ge=0, le=1)  # right CoT stays right
    expand_fix: float = Field(default=0.55, ge=0, le=1)  # wrong CoT gets corrected
    leak_rate: float = Field(default=0.15, ge=0, le=1)  # expansions that cite the caption
    degenerate_rate: float = Field(default=0.03, ge=0, le=1)
    unparseable_rate: float = Field(default=0.03, ge=0, le=1)
    bad_question_rate: float = Field(default=0.12, ge=0, le=1)
    # -- failure modes of real reasoning replies (rollouts and expansions), per sample --
    answer_style_rate: float = Field(default=0.3, ge=0, le=1)  # **Answer: B**, \boxed{B}, ...
    no_think_close_rate: float = Field(default=0.04, ge=0, le=1)  # no </think>, final answer line
    conflicting_rate: float = Field(default=0.02, ge=0, le=1)  # two different letters
    # -- end of failure modes --
    split_reasoning: bool = False  # answer with reasoning_content, like a reasoning parser
    # What the server is (GET /v1/models, GET /version) and the misconfigurations a preflight
    # must catch. served_models: model ids it serves, comma-separated (others get vLLM's 404);
    # empty = answers any model name and lists the stack's default models.
    served_models: str | None = None
    max_model_len: int = Field(default=32768, ge=16)  # prompt + max_tokens beyond it: 400
    # "text": a text-only model (image parts get vLLM's 400); "none": a model that does not
    # think (no reasoning_content, no closing </think>) where a reasoner is expected.
    modality: Literal["vision", "text"] = "vision"
    thinking: Literal["yes", "none"] = "yes"
    # "ignored": a server without guided decoding (response_format is dropped, the reply is
    # prose); "rejected": a server that refuses vLLM's `bad_words` field with a 400.
    structured_output: Literal["honoured", "ignored"] = "honoured"
    bad_words: Literal["honoured", "rejected"] = "honoured"
    completion_chars: int = Field(default=64, ge=1)  # generic replies
    seed: int = 0

    @field_validator("skill_error", mode="before")
    @classmethod
    def _skill_rates(cls, value: Any) -> Any:
        """`counting=0.5,chain=0.6` (the command line's form) as a mapping; rates in [0, 1]."""
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"skill_error {value!r}: use skill=rate,skill=rate")
            value = {k.strip(): float(v) for k, v in pairs}
        if isinstance(value, dict) and any(not 0 <= float(r) <= 1 for r in value.values()):
            raise ValueError(f"skill_error {value!r}: every rate must be in [0, 1]")
        return value
