"""What a finished release must satisfy (the method's invariants), checked from the outside:
the published Parquet files read back with Hugging Face `datasets`, and the lineage DB read
with plain SQL. Used by the DAG test and the pipeline tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
from sqlalchemy import Engine, text

from lgt_ops.composition import compare_text
from lgt_ops.questions import from_row
from lgt_ops.wellposed import check_well_posed

ROOT = Path(__file__).resolve().parents[1]
LINEAGE_SQL = (ROOT / "sql" / "queries" / "release_row_lineage.sql").read_text()

QUESTION = {"question_id", "image_id", "stage", "skill", "operator", "parent_ids", "answer",
            "answer_text", "pass_rate", "difficulty"}
COLUMNS = {
    "questions": QUESTION | {"row_id", "image", "question", "options", "grounding",
                             "request_key"},
    "sft": QUESTION | {"row_id", "messages", "images", "trace_id", "rollout_id", "origin",
                       "n_chars", "verification", "backtracking", "subgoal", "backward",
                       "request_key"},
    "dpo": QUESTION | {"row_id", "prompt", "chosen", "rejected", "images", "pair_id", "rule",
                       "chosen_id", "rejected_id", "length_margin"},
    "rl": QUESTION | {"row_id", "prompt", "images"},
}
_FINAL = re.compile(r"</think>\s*Answer:\s*([A-H])\s*$")


def run_params(**params: Any) -> Any:
    """The `RunParams` of `run_pipeline`: the sample prefix, k=4, and `params` over them."""
    from lgt_ops.params import RunParams

    conf = {"source": "sources/sample/", "release_name": "method", "allow_simulated": True,
            "k_rollouts": 4, **params}
    return RunParams.from_conf(conf)


def run_pipeline(env: Any, **params: Any) -> Any:
    """The whole pipeline in this process on the sample prefix (a `RunSummary`)."""
    from lgt_ops.pipeline import run_local

    p = run_params(**params)
    return run_local(env.with_settings(p.apply(env.settings)), p)


def final_letter(trace: str) -> str | None:
    m = _FINAL.search(trace)
    return m.group(1) if m else None


def load_splits(release_dir: Path) -> dict[str, datasets.Dataset]:
    """Every split of a release, loaded the way a trainer would."""
    globs = {
        "questions": "questions/*.parquet",
        "sft_stage1": "sft/stage1/*.parquet",
        "sft_stage2": "sft/stage2/*.parquet",
        "dpo_stage1": "dpo/stage1/*.parquet",
        "dpo_stage2": "dpo/stage2/*.parquet",
        "rl": "rl/*.parquet",
    }
    return {
        name: datasets.load_dataset("parquet", data_files=str(release_dir / glob), split="train")
        for name, glob in globs.items()
    }


def download(store: Any, prefix: str, dest: Path) -> Path:
    """A copy of a published release in a local folder (what `datasets` reads here)."""
    for obj in store.list(prefix.rstrip("/") + "/"):
        path = dest / obj.key[len(prefix) :].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get(obj.key))
    return dest


def check_splits(loaded: dict[str, datasets.Dataset]) -> None:
    splits = {}
    for name, ds in loaded.items():
        assert set(ds.column_names) == COLUMNS[name.split("_")[0]], name
        # Everything but the pixels (tests/test_release_portable.py decodes those).
        splits[name] = ds.remove_columns([c for c in ("image", "images") if c in ds.column_names])
    for name in ("sft_stage1", "sft_stage2"):
        ds = splits[name]
        assert len(ds) > 0, name
        for row in ds:
            user, reply = row["messages"]
            assert user["role"] == "user" and user["content"][0]["type"] == "image"
            assert reply["role"] == "assistant"
            trace = reply["content"][0]["text"]
            assert trace.startswith("<think>")
            assert final_letter(trace) == row["answer"], "a kept trace must end with the answer"
            assert row["stage"] == int(name[-1])
    for name in ("dpo_stage1", "dpo_stage2"):
        ds = splits[name]
        assert len(ds) > 0, name
        for row in ds:
            chosen = final_letter(row["chosen"][0]["content"][0]["text"])
            rejected = final_letter(row["rejected"][0]["content"][0]["text"])
            assert chosen == row["answer"] and rejected != row["answer"], row["rule"]
            assert row["prompt"][0]["role"] == "user"
    for row in splits["rl"]:
        assert 0 < row["pass_rate"] < 1 and row["answer"] in "ABCDEFGH"
    stage2 = [r for r in splits["questions"] if r["stage"] == 2]
    assert stage2 and all(len(r["parent_ids"]) == 2 and r["operator"] for r in stage2)


def check_composition(db: Engine) -> None:
    """Every stage-2 answer follows from its parents' verified answers and its operator, and
    every composed question is well posed (a chain never names the object it bridges by)."""
    with db.connect() as conn:
        children = conn.execute(text("SELECT * FROM questions WHERE stage = 2")).all()
        assert children, "no stage-2 question"
        for q in children:
            parents = conn.execute(
                text("SELECT p.* FROM question_parents qp JOIN questions p"
                     " ON p.question_id = qp.parent_id WHERE qp.question_id = :q"
                     " ORDER BY qp.position"), {"q": q.question_id}).all()
            a, b = (p.answer_text for p in parents)
            objects = _objects(conn, q.image_id)
            if q.operator == "conjunction":
                assert q.answer_text == f"{a}; {b}"
            elif q.operator == "count_over":
                assert q.answer_text == str(int(a) + int(b))
            elif q.operator == "chain":
                assert q.answer_text == b
            elif q.operator == "compare":
                labels = {o["id"]: o["label"] for o in objects}
                first, second = ({labels[g] for g in json.loads(p.grounding)} for p in parents)
                assert len(first) == len(second) == 1
                diff = int(a) - int(b)
                assert q.answer_text == compare_text(first.pop(), second.pop(), diff)
            else:
                raise AssertionError(f"unknown operator {q.operator}")
            check_well_posed(from_row(q), [from_row(p) for p in parents], objects)


def _objects(conn: Any, image_id: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for row in conn.execute(text("SELECT content FROM annotations WHERE image_id = :i"
                                 " AND kind = 'objects'"), {"i": image_id}):
        objects.extend(json.loads(row.content)["objects"])
    return objects


def check_rejections(db: Engine) -> None:
    with db.connect() as conn:
        no_reason = "SELECT COUNT(*) FROM rejections WHERE reason IS NULL OR reason = ''"
        assert conn.execute(text(no_reason)).scalar_one() == 0
        assert conn.execute(text(
            "SELECT COUNT(*) FROM trace_verdicts WHERE NOT passed AND reason IS NULL"
        )).scalar_one() == 0
        wrong_kept = conn.execute(text(
            "SELECT COUNT(*) FROM trace_verdicts v JOIN questions q ON q.question_id ="
            " v.question_id LEFT JOIN expansions e ON e.expansion_id = v.trace_id"
            " LEFT JOIN rollouts r ON r.rollout_id = v.trace_id WHERE v.passed AND"
            " COALESCE(e.final_letter, r.final_letter) <> q.answer_letter")).scalar_one()
        assert wrong_kept == 0


def walk_lineage(db: Engine, release_id: str, row_id: str) -> dict[str, list[Any]]:
    """sql/queries/release_row_lineage.sql for one row, grouped by hop."""
    with db.connect() as conn:
        rows = conn.execute(text(LINEAGE_SQL), {"release_id": release_id, "row_id": row_id}).all()
    hops: dict[str, list[Any]] = {}
    for r in rows:
        hops.setdefault(r.hop, []).append(r)
    return hops


def check_sft_lineage(db: Engine, release_id: str, row: dict[str, Any]) -> None:
    """An SFT row walks back to its expansion request, rollout, question(s), image, source."""
    hops = walk_lineage(db, release_id, row["row_id"])
    (exp,) = hops["expansion"]
    assert exp.ref_id == row["trace_id"] and exp.request_key == row["request_key"]
    assert exp.template.startswith("expand") and exp.served_model and exp.completion_tokens
    (roll,) = hops["rollout"]
    assert roll.ref_id == row["rollout_id"] and roll.template.startswith("cot")
    (question,) = hops["question"]
    assert question.ref_id == row["question_id"]
    assert sorted(p.ref_id for p in hops.get("parent_question", [])) == sorted(row["parent_ids"])
    (image,) = hops["image"]
    assert image.ref_id == row["image_id"]
    assert hops["source"] and hops["release_row"][0].detail.startswith("sft_stage")
