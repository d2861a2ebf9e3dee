"""The splits of a release: which rows, which columns.

Columns follow what Hugging Face `datasets` and TRL expect, plus provenance ids on every
row (question, image, request, and for traces and pairs their own ids) so any row can be
walked back through the lineage DB (see sql/queries/).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection

from lgt_ops.release.parquet import IMAGE
from lgt_ops.release.scope import ImageChunk, image_value, questions_for, served_models
from lgt_ops.stages import ingest, mcq
from lgt_ops.stages.base import StageEnv

Row = tuple[dict[str, Any], dict[str, Any]]  # (parquet row, release_members row)

QUESTION_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("question_id", pa.string()),
        ("image_id", pa.string()),
        ("image", IMAGE),
        ("stage", pa.int64()),
        ("skill", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("answer_text", pa.string()),
        ("grounding", pa.list_(pa.string())),
        ("operator", pa.string()),
        ("parent_ids", pa.list_(pa.string())),
        ("request_key", pa.string()),
    ]
)


class SplitBuilder:
    name: str
    path: str
    schema: pa.Schema
    image_columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._request_keys: list[str] = []

    def rows(self, env: StageEnv, conn: Connection, chunk: ImageChunk) -> Iterator[Row]:
        raise NotImplementedError

    def served_models(self, conn: Connection) -> set[str]:
        """Models that answered the requests behind the rows emitted since the last call."""
        keys, self._request_keys = self._request_keys, []
        return served_models(conn, keys) if keys else set()


class QuestionsSplit(SplitBuilder):
    """Every verified question (both stages): the raw material, useful for evaluation."""

    name = "questions"
    path = "questions"
    schema = QUESTION_SCHEMA
    image_columns = ("image",)

    def rows(self, env: StageEnv, conn: Connection, chunk: ImageChunk) -> Iterator[Row]:
        fp = mcq.stage_fingerprint(env)
        inputs = [c.input_id for c in chunk.contexts.values()]
        for q in questions_for(conn, inputs, 1, fp):
            if q.request_key:
                self._request_keys.append(q.request_key)
            yield (
                {
                    "row_id": q.question_id,
                    "question_id": q.question_id,
                    "image_id": q.image_id,
                    "image": image_value(
                        env, chunk.locations[q.image_id], env.settings.method.embed_images
                    ),
                    "stage": q.stage,
                    "skill": q.skill,
                    "question": q.question,
                    "options": json.loads(q.options),
                    "answer": q.answer_letter,
                    "answer_text": q.answer_text,
                    "grounding": json.loads(q.grounding),
                    "operator": q.operator,
                    "parent_ids": [],
                    "request_key": q.request_key,
                },
                {"row_id": q.question_id, "question_id": q.question_id, "image_id": q.image_id},
            )


def builders(env: StageEnv) -> list[SplitBuilder]:
    del env
    return [QuestionsSplit()]


def fingerprints(env: StageEnv) -> dict[str, str]:
    return {"ingest": ingest.stage_fingerprint(env), "mcq": mcq.stage_fingerprint(env)}


def configs(split_names: list[str]) -> dict[str, list[str]]:
    """Dataset-card configs (name -> data file globs) for the splits present."""
    paths = {b.name: b.path for b in (QuestionsSplit(),)}
    return {name: [f"{paths[name]}/*.parquet"] for name in split_names if name in paths}
