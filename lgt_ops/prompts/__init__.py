"""Versioned prompt templates, one file each: `<id>.v<version>.prompt` (+ optional schema).

File format: `key: value` header lines, then sections introduced by `--- system`,
`--- user` or `--- assistant`. Placeholders use `$name` (string.Template), so JSON braces in
a prompt need no escaping. A template's id and version are part of every request key, and
its text hash (`text_sha256`) is part of its stage's fingerprint (lgt_ops.registry), so
editing a prompt's text re-runs that stage and the ones after it even without a version bump
(tests/test_registry.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

from lgt_ops.failures import EXIT_USAGE, PermanentFailure

_DIR = Path(__file__).parent
_FILE = re.compile(r"^([a-z_]+)\.v(\d+)\.prompt$")


class PromptError(PermanentFailure, ValueError):
    """A prompt template is missing or malformed (e.g. an install without the package data):
    a retry cannot fix it, so the task fails on its first try."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: str
    sections: tuple[tuple[str, str], ...]
    schema: dict[str, Any] | None
    text_sha256: str

    def render(self, **values: object) -> list[dict[str, Any]]:
        """Chat messages with placeholders filled; a missing value is an error."""
        messages = []
        for role, body in self.sections:
            try:
                content = Template(body).substitute({k: str(v) for k, v in values.items()})
            except KeyError as exc:
                raise PromptError(f"prompt {self.id}@{self.version}: no value for {exc}") from exc
            messages.append({"role": role, "content": content.strip("\n")})
        return messages

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"


def _parse(path: Path) -> PromptTemplate:
    m = _FILE.match(path.name)
    if not m:
        raise PromptError(f"prompt file {path.name} is not named <id>.v<N>.prompt")
    raw = path.read_text(encoding="utf-8")
    header, _, rest = raw.partition("\n--- ")
    meta = dict(
        (k.strip(), v.strip())
        for k, v in (line.split(":", 1) for line in header.splitlines() if ":" in line)
    )
    if meta.get("id") != m.group(1) or meta.get("version") != m.group(2):
        raise PromptError(f"{path.name}: header id/version disagree with the file name")
    sections = []
    for block in ("--- " + rest).split("\n--- "):
        block = block.removeprefix("--- ")
        role, _, body = block.partition("\n")
        if role.strip() not in ("system", "user", "assistant"):
            raise PromptError(f"{path.name}: unknown section {role.strip()!r}")
        sections.append((role.strip(), body))
    schema = None
    if meta.get("schema"):
        schema = json.loads((_DIR / meta["schema"]).read_text(encoding="utf-8"))
    from lgt_ops.ids import sha256_hex

    digest = sha256_hex(raw + json.dumps(schema, sort_keys=True))
    return PromptTemplate(m.group(1), m.group(2), tuple(sections), schema, digest)


@cache
def load(prompt_id: str, version: str | None = None) -> PromptTemplate:
    """A template by id (newest version unless one is named)."""
    found = {}
    for path in _DIR.glob(f"{prompt_id}.v*.prompt"):
        m = _FILE.match(path.name)
        if m and m.group(1) == prompt_id:
            found[int(m.group(2))] = path
    if not found:
        raise PromptError(f"no prompt template named {prompt_id!r} in {_DIR}")
    chosen = int(version) if version is not None else max(found)
    if chosen not in found:
        raise PromptError(f"prompt {prompt_id!r} has no version {version}")
    return _parse(found[chosen])
