"""What the selected model-calling stages ask of each role's endpoint, for the preflight.

Each stage declares its own needs in its registry class (`Stage.needs`: role, largest request,
image input, structured output, thinking, bad_words; lgt_ops.request_size holds the
estimates); here they are grouped by role.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lgt_ops import registry
from lgt_ops.config import Settings
from lgt_ops.request_size import StageNeed

__all__ = ["RoleNeed", "StageNeed", "role_needs", "stage_needs"]


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


def stage_needs(settings: Settings, stages: Iterable[str]) -> list[StageNeed]:
    """Needs of the selected stages that call a model under these settings (e.g. the LLM
    tagger only when it is on)."""
    needs = (registry.get(s).needs(settings) for s in stages)
    return [n for n in needs if n is not None]


def role_needs(settings: Settings, stages: Iterable[str]) -> dict[str, RoleNeed]:
    by_role: dict[str, list[StageNeed]] = {}
    for need in stage_needs(settings, stages):
        by_role.setdefault(need.role, []).append(need)
    return {role: RoleNeed(role, tuple(needs)) for role, needs in by_role.items()}
