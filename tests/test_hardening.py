"""Stage 2 as hardening, and questions answerable without the image, on the simulator.

The pipeline runs on the bundled sample plus a few scenes whose captions give some colours
away (a green tree: a text-only model guesses green; a purple tree: it guesses wrong). The
checks are read back from Postgres: blind-answerable questions are rejected and get no
rollouts, compose builds only on parents the VLM answers, a composed question is kept only
when harder than its parents, and a re-run asks nothing.
"""

from __future__ import annotations

import json
import re

from sqlalchemy import text

from lgt_ops import prompts, registry
from lgt_ops.llm.simulator import SimConfig
from lgt_ops.llm.simulator.world import World, answer_key, prior_answer
from lgt_ops.params import RunParams
from lgt_ops.questions import LETTERS
from lgt_ops.runctx import RunContext
from lgt_ops.stages import harden
from tests.samples import jpeg, upload_sample

SCENES = [  # (caption, objects as (label, box)) on 640 x 480 images
    (
        "A green tree stands on the left beside a red car. A second red car is parked on the"
        " right, and a white clock hangs above them.",
        [
            ("tree", [20, 40, 200, 400]),
            ("car", [220, 250, 380, 400]),
            ("car", [420, 260, 600, 410]),
            ("clock", [250, 20, 330, 100]),
        ],
    ),
    (
        "A yellow banana lies left of a blue cup on a brown table, under a blue sky.",
        [
            ("banana", [40, 300, 160, 360]),
            ("cup", [260, 280, 330, 360]),
            ("table", [0, 340, 640, 480]),
            ("sky", [0, 0, 640, 200]),
        ],
    ),
    (
        "A purple tree, painted for a festival, stands left of a grey bench; two dogs sit on"
        " the green grass in front of it.",
        [
            ("tree", [10, 20, 180, 380]),
            ("bench", [300, 250, 520, 380]),
            ("dog", [200, 360, 280, 440]),
            ("dog", [360, 380, 440, 460]),
            ("grass", [0, 400, 640, 480]),
        ],
    ),
    (
        "A white rocket rises left of a black lamp, and an orange kite flies to the right.",
        [
            ("rocket", [60, 40, 140, 420]),
            ("lamp", [300, 200, 360, 420]),
            ("kite", [480, 60, 600, 160]),
        ],
    ),
]


def _blind_letters(question: str, options: list[str], seed: int) -> list[str]:
    """What the simulator's text-only model answers to the blind prompt, 8 samples."""
    block = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(options))
    body = {"messages": prompts.load("blind").render(question=question, options=block),
            "seed": seed}
    world = World(SimConfig())
    out = []
    for i in range(8):
        content, _ = world.reply(body, i)
        assert re.fullmatch(r"Answer: [A-D]", content), content
        out.append(content[-1])
    assert out == [world.reply(body, i)[0][-1] for i in range(8)]  # a pure function
    return out


def test_the_simulated_text_only_model_guesses_unless_the_wording_gives_it_away():
    seed = SimConfig().seed
    # a tree is green unless the image says otherwise: right when the key agrees ...
    greens = [["green", "red", "blue", "white"], ["red", "green", "white", "blue"],
              ["blue", "white", "green", "red"], ["white", "blue", "red", "green"]]
    for question in ("What colour is the tree?", "What is the colour of the tree?"):
        for options in greens:
            letter = LETTERS[options.index("green")]
            key = answer_key(seed, question, options)
            got = _blind_letters(question, options, seed=1)
            assert got == [letter] * 8  # the guess, every sample
            assert (key == "green") == (got[0] == LETTERS[options.index(key)])
    # ... and at chance for wording that gives nothing away
    spread: set[str] = set()
    for k in range(6):
        spread |= set(_blind_letters("How many cars are there?", ["1", "2", "3", "4"], seed=k))
    assert spread == set("ABCD")


def upload_scenes(store, prefix: str) -> None:  # noqa: ANN001
    lines = []
    for i, (caption, objects) in enumerate(SCENES):
        key = f"scene-{i}.jpg"
        store.put(prefix + key, jpeg(640, 480, (40 * i, 120, 200 - 30 * i)))
        objs = [{"id": f"o{j}", "label": lab, "box": box} for j, (lab, box) in enumerate(objects)]
        lines.append(
            json.dumps({"key": key, "caption": caption, "objects": objs, "box_format": "xyxy"})
        )
    store.put(prefix + "manifest.jsonl", ("\n".join(lines) + "\n").encode())


CONF = {
    "source": "sources/sample/",
    "release_name": "hard",
    "allow_simulated": True,
    "k_rollouts": 4,
}


def _run(env, **params):  # noqa: ANN001, ANN202
    from lgt_ops.pipeline import run_local

    p = RunParams.from_conf({**CONF, **params})
    settings = p.apply(env.settings)
    return run_local(env.with_settings(settings), p), settings


def _printed(env, summary) -> str:  # noqa: ANN001
    """The end-of-run summary `lgt run` prints."""
    import io

    from lgt_ops.summary import print_summary

    buf = io.StringIO()
    print_summary(env, RunParams.from_conf(CONF), summary, buf)
    return buf.getvalue()


def _rows(env, sql: str, **params):  # noqa: ANN001, ANN202
    with env.db.connect() as conn:
        return conn.execute(text(sql), params).all()


def _blind_checks(env, fps):  # noqa: ANN001, ANN202
    """Every mcq question with its blind check (None: not checked)."""
    return _rows(
        env,
        "SELECT q.*, c.kept, c.score, c.n, c.bound FROM questions q LEFT JOIN question_checks c"
        " ON c.question_id = q.question_id AND c.fingerprint = :blind"
        " WHERE q.stage = 1 AND q.fingerprint = :mcq",
        blind=fps["blind"],
        mcq=fps["mcq"],
    )


def _given_away(q) -> bool:  # noqa: ANN001
    """Whether the simulator's text-only model can tell this question's answer from its text."""
    options = list(zip(LETTERS, json.loads(q.options), strict=False))
    return prior_answer(q.question, options) == q.answer_letter


def check_blind(env, fps, summary) -> set[str]:  # noqa: ANN001
    rows = _blind_checks(env, fps)
    assert rows and all(r.kept is not None and r.n == 8 for r in rows)  # every question checked
    for r in rows:
        assert r.bound == 0.75 and r.kept == (r.score < r.bound)
    rejected = {r.question_id for r in rows if not r.kept}
    given = {r.question_id for r in rows if _given_away(r)}
    assert given and given <= rejected  # answered right every time from the wording
    # 6 or more of 8 right by chance: 0.4 % of guessed questions (binomial, 4 options); the
    # bound is loose because the set is small (about 70 questions)
    by_chance = rejected - given
    assert len(by_chance) <= 0.1 * (len(rows) - len(given))
    assert len(rows) - len(rejected) > 0.6 * len(rows)
    reasons = _rows(
        env,
        "SELECT item_ref FROM rejections WHERE stage = 'blind'"
        " AND fingerprint = :fp AND reason = 'answerable_without_image'",
        fp=fps["blind"],
    )
    assert {r.item_ref for r in reasons} == rejected
    assert summary.stages["blind"]["rejected_by_reason"] == {
        "answerable_without_image": len(rejected)
    }
    rolled = {r.question_id for r in _rows(env, "SELECT DISTINCT question_id FROM rollouts")}
    assert rolled and not rolled & rejected  # no VLM rollout for a blind-answerable question
    return rejected


def _rates(env, fp):  # noqa: ANN001, ANN202
    rows = _rows(
        env, "SELECT question_id, pass_rate FROM difficulty WHERE fingerprint = :fp", fp=fp
    )
    return {r.question_id: r.pass_rate for r in rows}


def check_hardening(env, fps, settings, *, both: bool = True) -> set[str]:  # noqa: ANN001
    """Parents have pass rate > 0; kept composed questions are below their parents' bound."""
    stage1 = _rates(env, fps["cot"])
    assert any(r == 0 for r in stage1.values())  # the parent rule has something to exclude
    composed = _rows(
        env,
        "SELECT question_id FROM questions WHERE stage = 2 AND fingerprint = :fp",
        fp=fps["compose"],
    )
    assert composed
    links = _rows(env, "SELECT question_id, parent_id FROM question_parents ORDER BY position")
    parents: dict[str, list[str]] = {}
    for link in links:
        parents.setdefault(link.question_id, []).append(link.parent_id)
    checks_ = {
        r.question_id: r
        for r in _rows(
            env, "SELECT * FROM question_checks WHERE fingerprint = :fp", fp=fps["harden"]
        )
    }
    rates2 = _rates(env, fps["cot2"])
    kept = set()
    for q in composed:
        ps = parents[q.question_id]
        assert all(stage1[p] > 0 for p in ps), "composed from a parent the VLM cannot answer"
        limit = harden.bound(tuple(stage1[p] for p in ps), settings.method)
        c = checks_[q.question_id]
        assert c.score == rates2[q.question_id] and c.bound == limit
        assert c.kept == (rates2[q.question_id] < limit)
        if c.kept:
            kept.add(q.question_id)
    not_harder = {
        r.item_ref
        for r in _rows(
            env,
            "SELECT item_ref FROM rejections WHERE stage = 'harden' AND fingerprint = :fp"
            " AND reason = 'not_harder'",
            fp=fps["harden"],
        )
    }
    assert not_harder == {q.question_id for q in composed} - kept
    assert not both or (kept and not_harder)  # the rule bites, and keeps some
    return kept


def test_stage2_is_hardening_and_blind_answerable_questions_are_rejected(pg_s3_env, sim):
    env = pg_s3_env
    upload_sample(env.store, "sources/sample/")
    upload_scenes(env.store, "sources/sample/scenes/")
    first, settings = _run(env, release_version="v1")
    fps = registry.fingerprints(settings)
    blind_rejected = check_blind(env, fps, first)
    kept = check_hardening(env, fps, settings)

    # Downstream sees stage-1 questions and the kept stage-2 ones only.
    released = first.release.manifest["counts"]["splits"]["questions"]
    assert released["stage2"] == len(kept)
    expanded = {
        r.question_id
        for r in _rows(
            env,
            "SELECT DISTINCT e.question_id FROM"
            " expansions e JOIN questions q ON"
            " q.question_id = e.question_id WHERE q.stage = 2",
        )
    }
    assert expanded and expanded <= kept
    card = env.store.get("releases/hard/v1/README.md").decode()
    n_blind = len(_blind_checks(env, fps))
    assert "## Question checks" in card
    assert (
        f"| answerable without the image (`answerable_without_image`) | {n_blind} |"
        f" {len(blind_rejected)} |"
    ) in card

    printed = _printed(env, first)
    rate = f"{len(blind_rejected) / n_blind:.1%}"
    assert re.search(rf"^blind +{n_blind} +{len(blind_rejected)} +{rate}$", printed, re.M)

    # A re-run asks nothing and publishes the same bytes.
    served = sim.sim.served
    again, _ = _run(env.with_run(RunContext("rerun")), release_version="v2")
    assert sim.sim.served == served
    assert again.release.content_sha256 == first.release.content_sha256
    assert all(s["requests_sent"] == 0 for s in again.stages.values())

    # A stricter rule re-judges, and re-runs what follows from the ledger: nothing is asked.
    stricter, s2 = _run(
        env.with_run(RunContext("margin")), release_version="v3", harden_margin=0.25
    )
    assert sim.sim.served == served
    fps2 = registry.fingerprints(s2)
    assert fps2["harden"] != fps["harden"] and fps2["cot2"] == fps["cot2"]
    kept2 = check_hardening(env, fps2, s2, both=False)
    assert kept2 < kept
    assert stricter.release.manifest["counts"]["splits"]["questions"]["stage2"] == len(kept2)
