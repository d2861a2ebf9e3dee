"""The splits of a release: which rows, which columns.

    questions/            every current question of both stages (evaluation, inspection)
    sft/stage1, stage2    long traces: conversational `messages` + `images` (TRL SFT)
    dpo/stage1, stage2    `prompt` / `chosen` / `rejected` conversations + `images` (TRL DPO)
    rl/                   `prompt` + `images` + verifiable `answer` (GRPO)

The dataset-card configs mirror the published LGT dataset: sft_stage1, sft_stage2,
sft_stage2_merged (both stages), dpo_stage1, dpo_stage2, plus rl and questions. Every row
carries provenance ids (question, image, trace / pair, request) that resolve in the lineage
DB (sql/queries/release_row_lineage.sql walks them back).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection

from lgt_ops import current, registry
from lgt_ops.db.repo import select_in
from lgt_ops.env import StageEnv
from lgt_ops.questions import Question, from_row
from lgt_ops.release import report
from lgt_ops.release.parquet import IMAGE, MESSAGES
from lgt_ops.release.scope import ImageChunk, served_models
from lgt_ops.traces import BEHAVIOURS, Trace

Row = tuple[dict[str, Any], dict[str, Any]]  # (parquet row, release_members row)

_QUESTION_FIELDS = [
    ("question_id", pa.string()),
    ("image_id", pa.string()),
    ("stage", pa.int64()),
    ("skill", pa.string()),
    ("operator", pa.string()),
    ("parent_ids", pa.list_(pa.string())),
    ("answer", pa.string()),
    ("answer_text", pa.string()),
    ("pass_rate", pa.float64()),
    ("difficulty", pa.string()),
]
QUESTION_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("image", IMAGE),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("grounding", pa.list_(pa.string())),
        *_QUESTION_FIELDS,
        ("request_key", pa.string()),
    ]
)
SFT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("messages", MESSAGES),
        ("images", pa.list_(IMAGE)),
        *_QUESTION_FIELDS,
        ("trace_id", pa.string()),
        ("rollout_id", pa.string()),
        ("origin", pa.string()),  # verified (CoT was right) | corrected (CoT was wrong)
        ("n_chars", pa.int64()),
        *[(b, pa.int64()) for b in BEHAVIOURS],
        ("request_key", pa.string()),
    ]
)
DPO_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("images", pa.list_(IMAGE)),
        *_QUESTION_FIELDS,
        ("pair_id", pa.string()),
        ("rule", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("length_margin", pa.int64()),
    ]
)
RL_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt", MESSAGES),
        ("images", pa.list_(IMAGE)),
        *_QUESTION_FIELDS,
    ]
)


def user_prompt(q: Question) -> list[dict[str, Any]]:
    """The user turn every split shares: the image, then the question and its options."""
    body = f"{q.question}\n{q.options_block()}\nAnswer with the letter of the correct option."
    return [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": body}],
        }
    ]


def assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


@dataclass
class ChunkOutputs:
    """Everything current for one chunk of images, loaded once and shared by the builders."""

    questions: list[Question]
    parents: dict[str, list[str]]
    request_keys: dict[str, str | None]
    difficulty: dict[str, Any]
    traces: dict[str, list[Trace]]
    verdicts: dict[str, Any]
    pairs: dict[str, list[Any]]
    tags: dict[str, Any]  # LLM behaviour counts, when that tagger is on

    @classmethod
    def load(cls, env: StageEnv, conn: Connection, chunk: ImageChunk) -> ChunkOutputs:
        rows = current.questions(conn, env, chunk.contexts)
        ids = [r.question_id for r in rows]
        parents: dict[str, list[str]] = {}
        for p in select_in(
            conn,
            "SELECT question_id, parent_id FROM question_parents"
            " WHERE question_id IN :ids ORDER BY question_id, position",
            ids,
        ):
            parents.setdefault(p.question_id, []).append(p.parent_id)
        traces = current.traces_of(conn, env, ids)
        verdicts = current.verdicts(conn, env, [t.trace_id for ts in traces.values() for t in ts])
        by_q: dict[str, list[Any]] = {}
        for p in current.pairs(conn, env, ids):
            by_q.setdefault(p.question_id, []).append(p)
        return cls(
            [from_row(r) for r in rows],
            parents,
            {r.question_id: r.request_key for r in rows},
            current.difficulty(conn, env, ids),
            traces,
            verdicts,
            by_q,
            current.behaviour_tags(conn, env, list(verdicts)),
        )

    def question_fields(self, q: Question) -> dict[str, Any]:
        d = self.difficulty.get(q.question_id)
        return {
            "question_id": q.question_id,
            "image_id": q.image_id,
            "stage": q.stage,
            "skill": q.skill,
            "operator": q.operator,
            "parent_ids": self.parents.get(q.question_id, []),
            "answer": q.answer_letter,
            "answer_text": q.answer_text,
            "pass_rate": d.pass_rate if d else None,
            "difficulty": d.bucket if d else None,
        }


class SplitBuilder:
    name: str
    path: str
    schema: pa.Schema
    image_columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._request_keys: list[str] = []
        self.stats: Counter[str] = Counter()

    def rows(self, env: StageEnv, chunk: ImageChunk, out: ChunkOutputs) -> Iterator[Row]:
        raise NotImplementedError

    def served_models(self, conn: Connection) -> set[str]:
        """Models that answered the requests behind the rows emitted since the last call."""
        keys = self.take_request_keys()
        return served_models(conn, keys) if keys else set()

    def take_request_keys(self) -> list[str]:
        """The request keys behind the rows emitted since the last call."""
        keys, self._request_keys = self._request_keys, []
        return keys

    def _used(self, *keys: str | None) -> None:
        self._request_keys.extend(k for k in keys if k)

    def summary(self) -> dict[str, Any]:
        return dict(sorted(self.stats.items()))


def _images(env: StageEnv, chunk: ImageChunk, image_id: str) -> dict[str, Any]:
    return chunk.image(env, image_id)


class QuestionsSplit(SplitBuilder):
    """Every current question of both stages: the raw material, useful for evaluation."""

    name = path = "questions"
    schema = QUESTION_SCHEMA
    image_columns = ("image",)

    def rows(self, env: StageEnv, chunk: ImageChunk, out: ChunkOutputs) -> Iterator[Row]:
        for q in out.questions:
            key = out.request_keys[q.question_id]
            self._used(key)
            fields = out.question_fields(q)
            self.stats[f"stage{q.stage}"] += 1
            self.stats[f"difficulty:{fields['difficulty']}"] += 1
            self.stats[f"skill:{q.skill}"] += 1
            yield (
                {
                    "row_id": q.question_id,
                    "image": _images(env, chunk, q.image_id),
                    "question": q.question,
                    "options": list(q.options),
                    "grounding": list(q.grounding),
                    **fields,
                    "request_key": key,
                },
                {"row_id": q.question_id, "question_id": q.question_id, "image_id": q.image_id},
            )


def sft_choice(expansions: list[Trace], origin: dict[str, str], limit: int) -> list[Trace]:
    """Up to `limit` passed expansions, alternating verified and corrected, longest first."""
    groups = {
        o: sorted(
            (t for t in expansions if origin[t.trace_id] == o),
            key=lambda t: (-len(t.text), t.trace_id),
        )
        for o in ("corrected", "verified")
    }
    out: list[Trace] = []
    while len(out) < limit and any(groups.values()):
        for o in ("corrected", "verified"):
            if groups[o] and len(out) < limit:
                out.append(groups[o].pop(0))
    return out


class SftSplit(SplitBuilder):
    """Long traces that passed the filter, as conversations."""

    schema = SFT_SCHEMA
    image_columns = ("images",)

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.name = f"sft_stage{stage}"
        self.path = f"sft/stage{stage}"

    def rows(self, env: StageEnv, chunk: ImageChunk, out: ChunkOutputs) -> Iterator[Row]:
        limit = env.settings.method.sft_per_question
        for q in (q for q in out.questions if q.stage == self.stage):
            ts = out.traces.get(q.question_id, [])
            right = {t.trace_id for t in ts if t.kind == "rollout" and t.correct}
            passed = [
                t
                for t in ts
                if t.kind == "expansion"
                and (v := out.verdicts.get(t.trace_id)) is not None
                and v.passed
            ]
            origin = {
                t.trace_id: "verified" if t.parent_id in right else "corrected" for t in passed
            }
            for t in sft_choice(passed, origin, limit):
                v = out.tags.get(t.trace_id) or out.verdicts[t.trace_id]
                self._used(t.request_key)
                self.stats[origin[t.trace_id]] += 1
                self.stats["rows"] += 1
                self.stats["chars"] += len(t.text)
                self.stats[f"len:{report.length_bucket(len(t.text))}"] += 1
                for b in BEHAVIOURS:
                    self.stats[f"with_{b}"] += getattr(v, b) > 0
                if t.cue:  # per cue: does a cue change what the reasoner does?
                    self.stats[f"cue:{t.cue}"] += 1
                    for b in BEHAVIOURS:
                        self.stats[f"cue:{t.cue}:with_{b}"] += getattr(v, b) > 0
                yield (
                    {
                        "row_id": t.trace_id,
                        "messages": user_prompt(q) + assistant(t.text),
                        "images": [_images(env, chunk, q.image_id)],
                        **out.question_fields(q),
                        "trace_id": t.trace_id,
                        "rollout_id": t.parent_id,
                        "origin": origin[t.trace_id],
                        "n_chars": len(t.text),
                        **{b: getattr(v, b) for b in BEHAVIOURS},
                        "request_key": t.request_key,
                    },
                    {
                        "row_id": t.trace_id,
                        "question_id": q.question_id,
                        "image_id": q.image_id,
                        "trace_id": t.trace_id,
                    },
                )


class DpoSplit(SplitBuilder):
    """Preference pairs, conversational, one subset per question stage."""

    schema = DPO_SCHEMA
    image_columns = ("images",)

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.name = f"dpo_stage{stage}"
        self.path = f"dpo/stage{stage}"

    def rows(self, env: StageEnv, chunk: ImageChunk, out: ChunkOutputs) -> Iterator[Row]:
        for q in (q for q in out.questions if q.stage == self.stage):
            texts = {t.trace_id: t for t in out.traces.get(q.question_id, [])}
            for p in out.pairs.get(q.question_id, []):
                chosen, rejected = texts[p.chosen_id], texts[p.rejected_id]
                self._used(chosen.request_key, rejected.request_key)
                self.stats[p.rule] += 1
                yield (
                    {
                        "row_id": p.pair_id,
                        "prompt": user_prompt(q),
                        "chosen": assistant(chosen.text),
                        "rejected": assistant(rejected.text),
                        "images": [_images(env, chunk, q.image_id)],
                        **out.question_fields(q),
                        "pair_id": p.pair_id,
                        "rule": p.rule,
                        "chosen_id": p.chosen_id,
                        "rejected_id": p.rejected_id,
                        "length_margin": p.length_margin,
                    },
                    {
                        "row_id": p.pair_id,
                        "question_id": q.question_id,
                        "image_id": q.image_id,
                        "pair_id": p.pair_id,
                    },
                )


class RlSplit(SplitBuilder):
    """Questions with a verifiable answer whose pass rate carries signal (0 < rate < 1)."""

    name = path = "rl"
    schema = RL_SCHEMA
    image_columns = ("images",)

    def rows(self, env: StageEnv, chunk: ImageChunk, out: ChunkOutputs) -> Iterator[Row]:
        keep_saturated = env.settings.method.rl_include_saturated
        for q in out.questions:
            d = out.difficulty.get(q.question_id)
            if d is None or (not keep_saturated and d.pass_rate in (0.0, 1.0)):
                continue
            self._used(out.request_keys[q.question_id])
            self.stats[f"stage{q.stage}"] += 1
            yield (
                {
                    "row_id": q.question_id,
                    "prompt": user_prompt(q),
                    "images": [_images(env, chunk, q.image_id)],
                    **out.question_fields(q),
                },
                {"row_id": q.question_id, "question_id": q.question_id, "image_id": q.image_id},
            )


def builders(env: StageEnv) -> list[SplitBuilder]:
    del env
    return [QuestionsSplit(), SftSplit(1), SftSplit(2), DpoSplit(1), DpoSplit(2), RlSplit()]


def fingerprints(env: StageEnv) -> dict[str, str]:
    """The fingerprints a release is made under: every enabled stage the release reads."""
    fps = registry.fingerprints(env.settings)
    return {
        s.name: fps[s.name]
        for s in registry.PIPELINE
        if s.name in registry.Release.upstream and s.enabled(env.settings)
    }


_CONFIGS = {
    "questions": ["questions/*.parquet"],
    "sft_stage1": ["sft/stage1/*.parquet"],
    "sft_stage2": ["sft/stage2/*.parquet"],
    "sft_stage2_merged": ["sft/stage1/*.parquet", "sft/stage2/*.parquet"],
    "dpo_stage1": ["dpo/stage1/*.parquet"],
    "dpo_stage2": ["dpo/stage2/*.parquet"],
    "rl": ["rl/*.parquet"],
}


def configs(split_names: list[str]) -> dict[str, list[str]]:
    """Dataset-card configs (name -> data file globs) whose splits are all present."""
    present = {f"{b.path}/*.parquet" for b in builders(None) if b.name in split_names}  # type: ignore[arg-type]
    return {name: globs for name, globs in _CONFIGS.items() if set(globs) <= present}
