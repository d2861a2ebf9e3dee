"""A model stage's request: what every stage's requests share, taken from its registry class
(the role and that endpoint's model, the template's id and version, the reply schema when the
stage relies on structured output, the image spec when it sends an image), so a stage states
only its messages, sampling and options."""

from __future__ import annotations

from typing import Any

from lgt_ops import prompts
from lgt_ops.llm.request import ChatRequest
from lgt_ops.registry import Stage
from lgt_ops.stages.base import StageEnv


def stage_request(
    env: StageEnv,
    stage: type[Stage],
    messages: list[dict[str, Any]],
    sampling: dict[str, Any],
    **options: Any,  # extra_body, allow_truncated, tag
) -> ChatRequest:
    if stage.role is None or stage.template is None:
        raise ValueError(f"stage {stage.name} calls no model")
    t = prompts.load(stage.template)
    return ChatRequest(
        role=stage.role,
        model=env.settings.endpoint(stage.role).model,
        template_id=t.id,
        template_version=t.version,
        messages=messages,
        sampling=sampling,
        response_schema=t.schema if stage.structured else None,
        schema_name=t.id if stage.structured else None,
        image_spec=env.settings.image_spec if stage.role == "vlm" else None,
        **options,
    )


def n_samplings(
    env: StageEnv, stage: type[Stage], base: dict[str, Any], n: int, seed: int
) -> list[dict[str, Any]]:
    """n samples: one request with `n` when the stage's endpoint supports it (the server then
    shares the prompt across them), else n requests, each with its own seed."""
    if env.settings.endpoint(stage.role or "").supports_n:
        return [{**base, "n": n, "seed": seed}]
    return [{**base, "seed": (seed + i) % (2**31)} for i in range(n)]
