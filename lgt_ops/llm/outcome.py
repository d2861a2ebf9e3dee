"""What happened to one request: the request engine's product (fresh from the endpoint or
replayed from the ledger), handed to a stage's handle()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lgt_ops.llm.request import ChatRequest


@dataclass
class Outcome:
    """What happened to one request (fresh from the endpoint or replayed from the ledger)."""

    request: ChatRequest
    status: str
    response: dict[str, Any] | None = None
    error_class: str | None = None
    http_status: int | None = None
    attempts: int = 0
    overloads: int = 0
    transient_errors: int = 0
    regenerations: int = 0
    latency_ms: float | None = None
    error_detail: str | None = None
    cached: bool = False
    replica: str | None = None  # base URL of the replica that gave the last answer (not stored)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def usage(self) -> dict[str, int]:
        return (self.response or {}).get("usage") or {}

    @property
    def choices(self) -> list[dict[str, Any]]:
        return (self.response or {}).get("choices") or []

    def contents(self) -> list[str]:
        return [(c.get("message") or {}).get("content") or "" for c in self.choices]
