"""Failure classes of an OpenAI-compatible endpoint and the policy for each."""

from __future__ import annotations

from enum import StrEnum

from lgt_ops.failures import (
    EXIT_ENDPOINT_AUTH,
    EXIT_ENDPOINT_DOWN,
    PermanentFailure,
    TransientFailure,
)


class FailureClass(StrEnum):
    OVERLOAD = "overload"  # 429 / 503: back off, not an error
    TRANSIENT = "transient"  # 5xx, reset, timeout, garbled body: jittered retry
    CONTEXT_TOO_LONG = "context_too_long"  # request-specific 4xx: record and skip
    BAD_IMAGE = "bad_image"
    BAD_REQUEST = "bad_request"
    TRUNCATED = "truncated"  # finish_reason=length: bounded regenerate
    INVALID_OUTPUT = "invalid_output"  # not JSON / not the schema: bounded regenerate
    AUTH = "auth"  # 401/403: configuration problem, fail the task


class EndpointDown(TransientFailure, RuntimeError):
    """The endpoint has not answered for longer than the limit; the task should fail and
    be retried by the orchestrator, resuming from the ledger."""

    exit_code = EXIT_ENDPOINT_DOWN


class EndpointAuthError(PermanentFailure, RuntimeError):
    """Credentials refused: retrying cannot help."""

    exit_code = EXIT_ENDPOINT_AUTH


def classify_http(status: int, body: str) -> FailureClass | None:
    """Map a non-200 HTTP answer to its failure class (None for 200)."""
    if status == 200:
        return None
    if status in (429, 503):
        return FailureClass.OVERLOAD
    if status in (401, 403):
        return FailureClass.AUTH
    if 400 <= status < 500 and status != 408:
        low = body.lower()
        if "context length" in low or "too long" in low or "maximum context" in low:
            return FailureClass.CONTEXT_TOO_LONG
        if "image" in low and ("decode" in low or "invalid" in low or "unsupported" in low):
            return FailureClass.BAD_IMAGE
        return FailureClass.BAD_REQUEST
    return FailureClass.TRANSIENT


REQUEST_SPECIFIC = frozenset(
    {FailureClass.CONTEXT_TOO_LONG, FailureClass.BAD_IMAGE, FailureClass.BAD_REQUEST}
)
