"""A chat-completions request and its content-addressed key.

Images are referenced in `messages` by a placeholder URL `lgt-image://<image_id>`; the engine
swaps in the real bytes (a data URL) or a presigned URL when it sends. The request key hashes
what determines the answer — model, sampling (seed included), response schema, prompt template
id and version, messages with images as ids, and the image preprocessing — and nothing about
how or where it is sent (URL, credentials, concurrency, timeouts, transport).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lgt_ops.config import ImageSpec
from lgt_ops.ids import canonical_json, sha256_hex

IMAGE_SCHEME = "lgt-image://"
# vLLM: continue the pre-filled assistant message instead of opening a new one.
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


def image_part(image_id: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": IMAGE_SCHEME + image_id}}


def image_ids_in(messages: list[dict[str, Any]]) -> list[str]:
    ids = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                url = part.get("image_url", {}).get("url", "") if isinstance(part, dict) else ""
                if url.startswith(IMAGE_SCHEME):
                    ids.append(url[len(IMAGE_SCHEME) :])
    return ids


@dataclass(frozen=True, eq=False)
class ChatRequest:
    role: str
    model: str
    template_id: str
    template_version: str
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    response_schema: dict[str, Any] | None = None
    schema_name: str | None = None
    # Server options that change the output (e.g. vLLM's continue_final_message).
    extra_body: dict[str, Any] = field(default_factory=dict)
    image_spec: ImageSpec | None = None
    # Keep a reply cut by max_tokens instead of regenerating it (multi-sample requests always
    # do: the stage rejects such samples one by one). Policy, not content: not in the key.
    allow_truncated: bool = False
    # Caller's correlation data; not part of the key.
    tag: Any = None

    @cached_property
    def key(self) -> str:
        spec = self.image_spec.model_dump(exclude={"transport"}) if self.image_spec else None
        return sha256_hex(
            canonical_json(
                {
                    "model": self.model,
                    "sampling": self.sampling,
                    "schema": self.response_schema,
                    "schema_name": self.schema_name,
                    "template": [self.template_id, self.template_version],
                    "messages": self.messages,
                    "extra_body": self.extra_body,
                    "image_spec": spec if self.image_ids else None,
                }
            )
        )

    @cached_property
    def image_ids(self) -> tuple[str, ...]:
        return tuple(image_ids_in(self.messages))

    def body(self, image_urls: dict[str, str], regeneration: int = 0) -> dict[str, Any]:
        """The JSON body to POST; a regeneration perturbs the seed deterministically."""
        messages = self.messages
        if self.image_ids:
            messages = [_swap_images(m, image_urls) for m in self.messages]
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.sampling}
        if regeneration and "seed" in body:
            body["seed"] = (int(body["seed"]) + 1_000_003 * regeneration) % (2**31)
        if self.response_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": self.schema_name or self.template_id,
                    "schema": self.response_schema,
                    "strict": True,
                },
            }
        body.update(self.extra_body)
        return body


def _swap_images(msg: dict[str, Any], urls: dict[str, str]) -> dict[str, Any]:
    content = msg.get("content")
    if not isinstance(content, list):
        return msg
    parts = []
    for part in content:
        url = part.get("image_url", {}).get("url", "") if isinstance(part, dict) else ""
        if url.startswith(IMAGE_SCHEME):
            part = {"type": "image_url", "image_url": {"url": urls[url[len(IMAGE_SCHEME) :]]}}
        parts.append(part)
    return {**msg, "content": parts}
