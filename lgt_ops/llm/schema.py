"""Structured output: parse a reply as JSON and check it against the requested schema."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from jsonschema import Draft202012Validator

from lgt_ops.ids import canonical_json

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_json_reply(content: str) -> Any:
    """The JSON value in a reply; tolerates a Markdown code fence around it."""
    m = _FENCE.match(content)
    return json.loads(m.group(1) if m else content)


class SchemaCheck:
    """Validators compiled once per schema."""

    def __init__(self) -> None:
        self._validators: dict[str, Draft202012Validator] = {}
        self._lock = threading.Lock()

    def validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        key = canonical_json(schema)
        with self._lock:
            v = self._validators.get(key)
            if v is None:
                v = self._validators[key] = Draft202012Validator(schema)
            return v

    def check(self, schema: dict[str, Any], content: str) -> str | None:
        """None when `content` is JSON matching `schema`, else what is wrong."""
        try:
            value = parse_json_reply(content)
        except ValueError as exc:
            return f"reply is not JSON: {exc}"
        err = next(iter(self.validator(schema).iter_errors(value)), None)
        if err is not None:
            path = "/".join(str(p) for p in err.absolute_path) or "(root)"
            return f"schema violation at {path}: {err.message[:300]}"
        return None
