"""The release validator: its figures on a simulated release of 300 images (card, manifest and
Postgres agree), and a tampered release it fails, naming the check, the item and the reason."""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import text

from lgt_ops import cli, composition, traces
from lgt_ops.failures import EXIT_OK, EXIT_VERIFY_FAILED
from lgt_ops.questions import Question
from lgt_ops.release import composition_checks, quality
from lgt_ops.release.card import quality_section
from lgt_ops.release.validate import validate
from tests import release_checks as checks
from tests.samples import upload_sample

N_IMAGES = 300


def _figures(report_or_manifest) -> dict[tuple[str, str], dict]:
    figures = (
        report_or_manifest["quality"]["figures"]
        if isinstance(report_or_manifest, dict)
        else [f.as_dict() for f in report_or_manifest.figures]
    )
    return {(f["metric"], f["scope"]): f for f in figures}


# -- the checks, one by one -------------------------------------------------------------------
def _q(qid, question, answer, options, grounding, skill="spatial"):
    return Question(
        qid,
        "img",
        1,
        skill,
        question,
        tuple(options),
        "ABCD"[options.index(answer)],
        answer,
        tuple(grounding),
    )


def _row(q: Question, parents: list[Question]) -> dict:
    return {
        "question_id": q.question_id,
        "image_id": q.image_id,
        "stage": 2,
        "skill": q.skill,
        "operator": q.operator,
        "parent_ids": [p.question_id for p in parents],
        "question": q.question,
        "options": list(q.options),
        "answer": q.answer_letter,
        "answer_text": q.answer_text,
    }


def _composed(qid, operator, question, answer, options):
    return replace(_q(qid, question, answer, options, []), stage=2, operator=operator)


def test_stage_two_is_judged_by_the_composition_module():
    objects = [
        {"id": "o1", "label": "cup"},
        {"id": "o2", "label": "table"},
        {"id": "o3", "label": "lamp"},
        {"id": "o4", "label": "lamp"},
        {"id": "o5", "label": "dog"},
    ]
    hop1 = _q(
        "p",
        "Which object is left of the table?",
        "cup",
        ["cup", "lamp", "kite", "boat"],
        ["o1", "o2"],
    )
    colour = _q("c", "What colour is the cup?", "red", ["red", "blue", "green", "pink"], ["o1"])
    lamp = _q("l", "What colour is the lamp?", "red", ["red", "blue", "green", "pink"], ["o3"])
    lamps = _q(
        "n1", "How many lamps are there?", "2", ["1", "2", "3", "4"], ["o3", "o4"], "counting"
    )
    dogs = _q("n2", "How many dogs are there?", "1", ["1", "2", "3", "4"], ["o5"], "counting")
    good = _composed(
        "g",
        "chain",
        "What colour is the object left of the table?",
        "red",
        ["red", "blue", "green", "pink"],
    )
    names = _composed(
        "x",
        "chain",
        "What colour is the cup left of the table?",
        "red",
        ["red", "blue", "green", "pink"],
    )
    options = [composition.compare_text("lamp", "dog", d) for d in (-1, 0, 1, 2)]
    more = _composed("m", "compare", "More lamps or dogs, by how many?", options[2], options)
    wrong = _composed(
        "w", "count_over", "How many lamps and dogs in all?", "4", ["2", "3", "4", "5"]
    )
    rows = [
        _row(good, [hop1, colour]),
        _row(names, [hop1, colour]),
        _row(good, [hop1, lamp]),
        _row(more, [lamps, dogs]),
        _row(wrong, [lamps, dogs]),
    ]
    rows[2]["question_id"] = "g2"
    parents = {p.question_id: p for p in (hop1, colour, lamp, lamps, dogs)}
    checks = composition_checks.stage2_checks(rows, parents, {"img": objects})
    figures = {f.metric: f for f in checks.figures()}
    ill = figures["chain_ill_posed"]
    assert (ill.value, ill.n) == (2, 3)  # the same check, and reasons, compose applies
    assert "question x: names_bridge_entity" in ill.detail and "(and 1 more)" in ill.detail
    assert checks.ill_posed.examples[1].startswith("question g2: chain_not_bridged")
    bad = figures["stage2_inconsistent"]
    assert bad.value == 1 and "question w: answer '4', the parents give '3'" in bad.detail
    # compare's options sort on their signed difference: "more lamps, by 1" is 3rd of 4
    assert checks.ranks == {"m": 2}


def test_uniformity_fails_a_skew_and_tolerates_chance_on_a_small_sample():
    fair = [(i % 4, 4) for i in range(6000)]
    assert quality.deviation_figure("letter_deviation", "all", fair).value == 0
    skewed = [(0, 4)] * 600 + [(i % 4, 4) for i in range(5400)]  # A: 32.5 %, not 25 %
    f = quality.deviation_figure("letter_deviation", "all", skewed)
    assert not f.passed and f.max_allowed == 0.02 and "position 1 of 4" in f.detail
    small = [(0, 4)] * 25 + [(1, 4)] * 15 + [(2, 4)] * 10 + [(3, 4)] * 10  # 60 draws
    f = quality.deviation_figure("letter_deviation", "all", small)
    assert f.passed and 0.02 < f.value < f.max_allowed
    assert not quality.deviation_figure("letter_deviation", "all", [(0, 4)] * 40).passed
    tiny = quality.deviation_figure("letter_deviation", "all", [(0, 4)] * 4)
    assert tiny.passed and tiny.max_allowed == 1.0  # four draws: shown, not judged


def test_value_rank_reads_numeric_options_only():
    assert quality.value_rank({"options": ["3", "1", "4", "2"], "answer_text": "2"}) == 1
    assert quality.value_rank({"options": ["red", "1", "4", "2"], "answer_text": "2"}) is None


def test_a_count_is_judged_against_the_ranks_it_can_take():
    def row(i, value, rank):
        options = [str(value - rank + j) for j in range(4)]
        options.remove(str(value))
        options.insert(i % 4, str(value))  # the letter: A, B, C, D in turn
        return {
            "question_id": f"q{i}",
            "stage": 1,
            "skill": "counting",
            "options": options,
            "answer": "ABCD"[i % 4],
            "answer_text": str(value),
        }

    assert quality.feasible_ranks(row(0, 1, 0)) == 2 and quality.feasible_ranks(row(0, 5, 3)) == 4
    assert quality.feasible_ranks({"options": ["-1", "0", "1", "2"], "answer_text": "0"}) == 4
    # Half the counts are 1 (1st or 2nd, evenly), half 5 (any rank): fair, though skewed raw.
    fair = [row(i, 1, i % 2) for i in range(400)] + [row(i, 5, i % 4) for i in range(400)]
    got = {(f.metric, f.scope): f for f in quality.question_figures(fair, 4)}
    judged = got[("value_rank_deviation", "skill:counting")]
    assert judged.passed and judged.value == 0 and judged.n == 800
    raw = got[("value_rank_raw_deviation", "skill:counting")]
    assert raw.value == 0.125 and raw.max_allowed == 1.0 and raw.passed  # shown, not judged
    # Counts of 1 always 1st: a shortcut, even where it is feasible.
    skewed = [row(i, 1, 0) for i in range(400)] + [row(i, 5, i % 4) for i in range(400)]
    got = {(f.metric, f.scope): f for f in quality.question_figures(skewed, 4)}
    f = got[("value_rank_deviation", "stage1")]
    assert not f.passed and f.value == 0.25 and "position 1 of 4" in f.detail
    assert "37.5% expected" in f.detail


# -- a tampered release fails, naming what and why --------------------------------------------
def _rewrite(env, prefix, files, change) -> None:
    """Rewrite a split's Parquet parts in place with `change(rows) -> rows`."""
    for f in files:
        key = f"{prefix}/{f['path']}"
        table = pq.read_table(io.BytesIO(env.store.get(key)))
        rows = change(table.to_pylist())
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), buf)
        env.store.put(key, buf.getvalue())


def _all_answers_a(rows):
    for r in rows:
        opts = list(r["options"])
        opts.remove(r["answer_text"])
        r["options"], r["answer"] = [r["answer_text"], *opts], "A"
    return rows


def _leak_first(rows):
    text_ = rows[0]["messages"][1]["content"][0]["text"]
    rows[0]["messages"][1]["content"][0]["text"] = text_.replace(
        "</think>", "The caption says the same.\n</think>", 1
    )
    return rows


def _swap_first(rows):
    rows[0]["chosen"], rows[0]["rejected"] = rows[0]["rejected"], rows[0]["chosen"]
    return rows


def test_a_tampered_release_fails_with_the_check_item_and_reason(local_env, monkeypatch, capsys):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    published = checks.run_pipeline(env, release_version="t").release
    rid, prefix = published.release_id, "releases/method/t"
    clean = _figures(validate(env, rid))
    assert clean == _figures(published.manifest)  # re-measuring gives what publishing recorded
    splits = published.manifest["splits"]
    sft_row = pq.read_table(
        io.BytesIO(env.store.get(f"{prefix}/{splits['sft_stage1']['files'][0]['path']}"))
    ).to_pylist()[0]
    dpo_row = pq.read_table(
        io.BytesIO(env.store.get(f"{prefix}/{splits['dpo_stage1']['files'][0]['path']}"))
    ).to_pylist()[0]
    _rewrite(env, prefix, splits["sft_stage1"]["files"][:1], _leak_first)
    _rewrite(env, prefix, splits["dpo_stage1"]["files"][:1], _swap_first)
    with env.db.begin() as conn:
        conn.execute(
            text(
                # release_members is a view over the rows each release owns (migration 0013)
                "DELETE FROM member_rows WHERE owner_release_id = :r AND split = 'rl'"
                " AND row_id = (SELECT MIN(row_id) FROM member_rows"
                " WHERE owner_release_id = :r AND split = 'rl')"
            ),
            {"r": rid},
        )

    report = validate(env, rid)
    got = _figures(report)
    assert not report.ok
    leak = got[("leaked_traces", "all")]
    assert leak["value"] == 1 and sft_row["trace_id"] in leak["detail"]
    assert "'caption'" in leak["detail"]
    dpo = got[("dpo_misordered", "dpo")]
    assert dpo["value"] == 1 and dpo_row["row_id"] in dpo["detail"] and "chosen" in dpo["detail"]
    lineage = got[("lineage_unresolved", "rl")]
    assert lineage["value"] == 1 and "not in release_members" in lineage["detail"]
    tampered = {("leaked_traces", "all"), ("dpo_misordered", "dpo"), ("lineage_unresolved", "rl")}
    assert {k: f for k, f in got.items() if k not in tampered} == {
        k: f for k, f in clean.items() if k not in tampered
    }

    # Every correct answer moved to option A: still valid questions, but a letter shortcut
    # (and the SFT and DPO rows no longer agree with their questions).
    _rewrite(env, prefix, splits["questions"]["files"], _all_answers_a)
    got = _figures(validate(env, rid))
    assert got[("mcq_invalid", "all")]["passed"]
    letters = got[("letter_deviation", "all")]
    assert not letters["passed"] and letters["value"] == 0.75
    assert "position 1 of 4" in letters["detail"]
    assert not got[("sft_wrong_answer", "sft")]["passed"]

    monkeypatch.setenv("LGT_DATABASE_URL", str(env.settings.database_url))
    monkeypatch.setenv("LGT_STORE_URL", env.store.url)
    assert cli.main(["release", "validate", rid]) == EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert "FAIL leaked_traces" in out and sft_row["trace_id"] in out
    assert "FAIL letter_deviation" in out


# -- 300 simulated images ---------------------------------------------------------------------
def _photo(i: int) -> bytes:
    """A distinct synthetic picture: seeded shapes on a seeded background."""
    rng = random.Random(i)
    im = Image.new("RGB", (320, 240), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.randrange(280), rng.randrange(200)
        box = (x0, y0, x0 + rng.randrange(10, 120), y0 + rng.randrange(10, 90))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _card_figures(card: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    section = card.split("## Quality", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split("|")[1:-1] for ln in section.splitlines() if ln.startswith("| ")][1:]
    return {(c[0].strip(), c[1].strip()): (c[2].strip(), c[3].strip(), c[4].strip()) for c in rows}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.s3
def test_validator_on_300_simulated_images(pg_s3_env):
    env = pg_s3_env
    for i in range(N_IMAGES):
        env.store.put(f"sources/many/img-{i:04d}.jpg", _photo(i))
    result = checks.run_pipeline(env, source="sources/many/", release_version="q300")
    manifest = result.release.manifest
    assert manifest["counts"]["images"] >= N_IMAGES
    rid = result.release.release_id
    recorded = _figures(manifest)

    # The card, the manifest, Postgres and a fresh validation carry the same figures.
    card = env.store.get("releases/method/q300/README.md").decode()
    assert "\n".join(quality_section(manifest["quality"])) in card
    shown = _card_figures(card)
    assert shown.keys() == recorded.keys()
    for key, f in recorded.items():
        value, max_allowed, n = shown[key]
        if quality.unjudged(f["metric"], f["max_allowed"]):
            assert value == f"{f['value']:.1%}" and max_allowed == "-", key
        elif key[0].endswith("_deviation"):
            assert value == f"{f['value']:.1%}" and max_allowed == f"{f['max_allowed']:.1%}", key
        else:
            assert (value, max_allowed) == (str(int(f["value"])), "0"), key
        assert n == str(f["n"]), key
    with env.db.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT metric, scope, value, max_allowed, n, passed, detail FROM release_quality"
                " WHERE release_id = :r"
            ),
            {"r": rid},
        ).all()
    assert {(r.metric, r.scope): {**r._asdict()} for r in stored} == {
        k: {
            "metric": f["metric"],
            "scope": f["scope"],
            "value": f["value"],
            "max_allowed": f["max_allowed"],
            "n": f["n"],
            "passed": f["passed"],
            "detail": f["detail"],
        }
        for k, f in recorded.items()
    }
    assert _figures(validate(env, rid)) == recorded

    # The figures the method asks for (METHOD.md "What makes the data right").
    wanted = {
        ("mcq_invalid", "all"): 0,
        ("stage2_inconsistent", "stage2"): 0,
        ("chain_ill_posed", "op:chain"): 0,
        ("leaked_traces", "all"): 0,
        ("sft_wrong_answer", "sft"): 0,
        ("dpo_misordered", "dpo"): 0,
    }
    wanted.update({k: 0 for k in recorded if k[0] == "lineage_unresolved"})
    problems = [
        f"{k}: {recorded[k]['value']} (n={recorded[k]['n']}), want {v}: {recorded[k]['detail']}"
        for k, v in wanted.items()
        if recorded[k]["value"] != v
    ]
    for metric in ("letter_deviation", "value_rank_deviation"):
        overall = recorded[(metric, "all")]
        if overall["value"] > 0.02:
            problems.append(f"{metric} all: {overall['value']} (n={overall['n']}), want <= 0.02")
        for scope in ("stage1", "stage2"):  # uniform, allowing for chance on fewer rows
            f = recorded.get((metric, scope))
            if f is None or not f["passed"]:
                problems.append(
                    f"{metric} {scope}: {f and f['value']} (n={f and f['n']}),"
                    f" want <= {f and f['max_allowed']}: {f and f['detail']}"
                )
    assert recorded[("chain_ill_posed", "op:chain")]["n"] > 0
    summary = "\n".join(
        f"{k}: {f['value']} max={f['max_allowed']} n={f['n']} passed={f['passed']}"
        for k, f in sorted(recorded.items())
    )
    print("-- the release's quality figures --\n" + summary)  # shown with `pytest -s`
    assert not problems, "\n".join(problems) + "\n-- all figures --\n" + summary
    assert manifest["quality"]["passed"]
    assert json.loads(env.store.get("releases/method/q300/manifest.json"))["quality"]


def test_validate_exits_zero_when_every_check_passes(local_env, monkeypatch, capsys):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    # Stage 1 only (no composition), as the pipeline makes it (counting options laid out).
    stages = ["ingest", "annotate", "mcq", "cot", "expand", "filter", "pairs", "release"]
    published = checks.run_pipeline(env, release_version="s1", stages=stages).release
    report = validate(env, published.release_id)
    assert report.ok, [(f.metric, f.scope, f.value, f.detail) for f in report.failed]
    monkeypatch.setenv("LGT_DATABASE_URL", str(env.settings.database_url))
    monkeypatch.setenv("LGT_STORE_URL", env.store.url)
    assert cli.main(["release", "validate", published.release_id, "--json"]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["passed"] and shown["figures"] == report.as_dict()["figures"]


# -- the simulator's error rates per skill ----------------------------------------------------
def test_simulator_skill_of_reads_the_wordings_it_writes():
    from lgt_ops.llm.simulator import world

    assert world.skill_of("How many kites are visible in the image?") == "counting"
    assert world.skill_of("What colour is the lamp?") == "attribute"
    assert world.skill_of("Which object is left of the bench?") == "spatial"
    assert world.skill_of("Where in the image is the dog?") == "position"
    assert world.skill_of(world.SIZE_STEMS[2]) == "size"
    assert world.skill_of(world.EXISTENCE_STEMS[0]) == "existence"
    parents = [
        ("How many kites are there in the image?", "2"),
        ("How many dogs are there in the image?", "1"),
    ]
    for op in ("count_over", "compare", "chain", "conjunction"):
        stems = world._compose_stems(op, parents)
        assert {world.skill_of(s) for s in stems} == {op}, op
    assert world.skill_of("Is this a question nobody wrote?") == "other"


def _right_share(cfg, question: str, n: int = 400) -> float:
    from lgt_ops import prompts
    from lgt_ops.llm.simulator.world import World, answer_key

    w = World(cfg)
    right = 0
    for i in range(n):
        options = [str(i + d) for d in range(4)]
        q = question.format(i)
        msgs = prompts.load("cot").render(
            question=q, options="\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(options))
        )
        content, _ = w.reply({"model": "m", "messages": msgs, "seed": 7}, 0)
        letter = traces.parse("<think>" + content, 4).letter
        right += letter is not None and options["ABCD".index(letter)] == answer_key(
            cfg.seed, q, options
        )
    return right / n


def test_simulator_error_rates_are_set_per_skill_and_deterministic():
    from lgt_ops.llm.simulator import SimConfig

    quiet = {"unparseable_rate": 0.0, "conflicting_rate": 0.0, "no_think_close_rate": 0.0}
    counting = "How many kites of kind {} are visible in the image?"
    spatial = "Which object is left of the bench {}?"
    assert SimConfig(skill_error="counting=0.9, spatial=0.1").skill_error == {
        "counting": 0.9,
        "spatial": 0.1,
    }
    with pytest.raises(ValueError, match="skill_error"):
        SimConfig(skill_error="counting=2")
    cfg = SimConfig(skill_error={"counting": 0.9, "spatial": 0.1}, **quiet)
    hard, easy = _right_share(cfg, counting), _right_share(cfg, spatial)
    assert hard < 0.3 and easy > 0.7, (hard, easy)
    assert _right_share(cfg, counting) == hard  # a pure function of the requests
    plain = SimConfig(**quiet)  # no rate for a skill: `accuracy` (0.6)
    assert 0.45 < _right_share(plain, counting) < 0.75
