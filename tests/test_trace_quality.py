"""Trace quality: leaks of the text context, answers as real models write them, behaviour
counts without the injected cue, the prose the reasoner gets, and the simulator's failure
modes (including vLLM's `bad_words`) end to end through the pipeline."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from lgt_ops import prompts, scene, traces
from lgt_ops.annotations import ImageContext
from lgt_ops.config import MethodParams
from lgt_ops.llm.simulator import SimConfig
from lgt_ops.llm.simulator.world import LEAKS, World
from lgt_ops.release.card import render
from tests import release_checks as checks
from tests.samples import upload_sample

CORPUS = json.loads((Path(__file__).parent / "data" / "leak_corpus.json").read_text())
THINK_OPEN = "<think>\n"


# -- leaks -------------------------------------------------------------------------------------
def _trace(sentences: list[str], answer: str = "Answer: B") -> str:
    return THINK_OPEN + " ".join(sentences) + "\n</think>\n\n" + answer


def _placements(leak: str, rng: random.Random) -> list[str]:
    """The leak at the start, in the middle and at the end of the thinking, and in a trace
    made of a simple CoT + cue + continuation (as expansions are)."""
    clean = rng.sample(CORPUS["clean"], 6)
    return [
        _trace([leak, *clean]),
        _trace([*clean[:3], leak, *clean[3:]]),
        _trace([*clean, leak]),
        traces.assemble(" ".join(clean[:3]), "Wait,", " " + leak + " " + clean[4], "B", ""),
        _trace([*clean[:2], leak.lower().rstrip("."), "and", *clean[2:4]]),
    ]


def test_the_corpus_is_big_enough():
    assert len(CORPUS["leaks"]) >= 30 and len(CORPUS["clean"]) >= 30


def test_leaks_are_caught_anywhere_in_a_trace():
    rng = random.Random(0)
    placed = [(leak, t) for leak in CORPUS["leaks"] for t in _placements(leak, rng)]
    missed = [leak for leak, t in placed if not traces.leaks(t)]
    assert 1 - len(missed) / len(placed) >= 0.95, sorted(set(missed))
    assert not missed, sorted(set(missed))  # today: all of them


@pytest.mark.parametrize("sentence", CORPUS["clean"])
def test_clean_visual_sentences_are_not_leaks(sentence):
    assert traces.leaks(sentence) is None


def test_clean_visual_traces_are_not_leaks():
    rng = random.Random(1)
    for i in range(30):
        t = _trace(rng.sample(CORPUS["clean"], 5), rng.choice(["Answer: A", "**Answer: (C)**"]))
        assert traces.leaks(t) is None, (i, traces.leaks(t))


def test_the_simulators_planted_leaks_are_all_caught():
    for leak in LEAKS:
        assert traces.leaks(_trace(["The cup is red.", leak])), leak


# -- answer parsing ----------------------------------------------------------------------------
QWEN = "<think>\nThe cup on the left is red, the plate is white.\n</think>\n\n"
R1 = (
    "<think>\nOkay, so I need to figure out which object is left of the lamp. Looking at the"
    " picture, the chair is on the far left, then the lamp.\n</think>\n\n"
)
REPLIES = [
    # Qwen2.5-VL style
    (QWEN + "Answer: B", "B", None),
    (QWEN + "B", "B", None),
    (QWEN + "B. red", "B", None),
    (QWEN + "(B)", "B", None),
    (QWEN + "**B**", "B", None),
    (QWEN + "Answer: (B)", "B", None),
    (QWEN + "**Answer: B**", "B", None),
    (QWEN + "**Answer:** B", "B", None),
    (QWEN + "The answer is B.", "B", None),
    (QWEN + "The correct answer is (B) red.", "B", None),
    (QWEN + "The answer is a red cup.", None, "no_answer"),
    (QWEN + "Answer: B\nThe answer is C.", None, "conflicting_answers"),
    (QWEN + "Answer: E", None, "answer_not_an_option"),
    # DeepSeek-R1 distill style
    (R1 + "The chair is left of the lamp.\n\n**Answer:** \\boxed{B}", "B", None),
    (R1 + "**Final Answer**\n\\[\n\\boxed{B}\n\\]", "B", None),
    (R1 + "$\\boxed{\\text{B}}$", "B", None),
    (R1 + "Therefore, the answer is **B**.\n\n\\boxed{B}", "B", None),
    (R1 + "Option A is wrong since the lamp is right of the chair.\n\nAnswer: B", "B", None),
    (R1 + "\\boxed{A}\n\nWait, the answer is B.", None, "conflicting_answers"),
    (R1 + "I'm not sure.", None, "no_answer"),
    # no </think>: a final line stating the answer counts (README "Answer parsing")
    ("<think>\nThe chair is on the far left, so it is the one.\nAnswer: B", "B", None),
    ("<think>\nThe chair is on the far left.\nSo the answer is (B).", "B", None),
    ("<think>\nThe chair is on the far left.\n\\boxed{B}", "B", None),
    ("<think>\nThe chair is on the far left, B", None, "no_think_close"),
    ("<think>\nThe chair is on the far left. Answer: B\nhmm, let me look again", None,
     "no_think_close"),
    ("<think>\nstill thinking", None, "no_think_close"),
    ("<think>\n<think>\nEchoed prefill.\n</think>\n\nAnswer: C", "C", None),
    ("<think>\na</think>b</think>\nAnswer: A", None, "multiple_think_blocks"),
]


@pytest.mark.parametrize(("reply", "letter", "error"), REPLIES)
def test_answers_are_read_as_models_write_them(reply, letter, error):
    parsed = traces.parse(reply, 4)
    assert (parsed.letter, parsed.error) == (letter, error)
    if letter:
        assert parsed.thinking and "Answer" not in parsed.thinking.splitlines()[-1]


def test_an_unclosed_reply_cut_off_is_truncated_even_with_an_answer_line():
    assert traces.parse("<think>\nx\nAnswer: B", 4, truncated=True).error == "truncated"


def test_reasoning_content_from_a_reasoning_parser():
    msg = {"content": "**Answer: C**", "reasoning_content": "The bowl is blue."}
    whole = "<think>\n" + traces.reply_text(msg)
    parsed = traces.parse(whole, 4)
    assert (parsed.letter, parsed.thinking) == ("C", "The bowl is blue.")
    # a parser that found no </think> gives it all as reasoning: the unclosed rule applies
    unclosed = "<think>\n" + traces.reply_text(
        {"content": "", "reasoning_content": "The bowl is blue.\nAnswer: C"}
    )
    assert traces.parse(unclosed, 4).letter == "C"
    assert traces.reply_text({"content": "Answer: A"}) == "Answer: A"


def test_unclosed_rollouts_count_but_are_not_training_texts():
    assert traces.format_problem("<think>\nx\nAnswer: B") == "no_think_close"
    assert traces.format_problem(QWEN + "Answer: B") is None
    # a closed reply's answer part is normalised for SFT/DPO; its thinking keeps its bytes
    assert traces.canonical_answer(R1 + "**Final Answer**\n\\boxed{B}", "B") == (
        R1.rstrip("\n").removesuffix("</think>").rstrip() + "\n</think>\n\nAnswer: B"
    )


# -- behaviours and cues -----------------------------------------------------------------------
def test_the_injected_cue_is_not_a_behaviour():
    cot = "The cup is red."
    for cue in ("Wait,", "Hmm,", "Alternatively,"):
        t = traces.assemble(cot, cue, " the cup is on the left, so B holds.", "B", "")
        assert traces.behaviours(t, cue)["backtracking"] == 0, cue
    wait = traces.assemble(cot, "Wait,", " actually that is a bowl.", "B", "")
    assert traces.behaviours(wait, "Wait,")["backtracking"] == 1  # the model's own "actually"
    assert traces.behaviours(wait)["backtracking"] == 2  # what the old count said


def test_siblings_get_different_cues():
    cues = ("Wait,", "Hmm,", "Alternatively,")
    for key in ("r1", "r2", "r3", "abc"):
        assert sorted(traces.pick_cue(key, j, cues) for j in range(3)) == sorted(cues)
    assert MethodParams().expand_per_rollout >= 2  # a wrong rollout can get X->O and X->X


def test_card_reports_behaviours_per_cue():
    sft = {
        "rows": 4,
        "chars": 400,
        "with_backtracking": 1,
        "cue:Wait,": 2,
        "cue:Wait,:with_backtracking": 1,
        "cue:Hmm,": 2,
    }
    manifest = {
        "configs": {"sft_stage1": ["sft/stage1/*.parquet"]},
        "name": "n",
        "version": "v",
        "splits": {"sft_stage1": {"rows": 4, "files": []}},
        "release_id": "r",
        "content_sha256": "x",
        "source": {"store": "s", "prefix": "p"},
        "run_id": "run",
        "models": {"requested": {}, "served": []},
        "fingerprints": {},
        "counts": {"splits": {"sft_stage1": sft}},
    }
    card = render(manifest)
    assert "| `Wait,` | 2 | 0% | 50% | 0% | 0% |" in card
    assert "| `Hmm,` | 2 | 0% | 0% | 0% | 0% |" in card


# -- the reasoner's prompt ---------------------------------------------------------------------
def _ctx() -> ImageContext:
    objects = (
        {"id": "c14", "label": "cup", "box": [20, 300, 90, 380]},
        {"id": "c15", "label": "table", "box": [150, 200, 600, 470]},
        {"id": "o3", "label": "dog", "box": [400, 20, 630, 150]},
        {"id": "o4", "label": "dog", "box": [300, 30, 380, 120]},
    )
    return ImageContext("img", 640, 480, "A kitchen with a red cup.", "cap", objects, "obj")


def test_the_reasoner_gets_words_not_ids_or_coordinates():
    prose = scene.prose(_ctx())
    assert not re.search(r"\d", prose.replace("A kitchen with a red cup.", ""))
    assert "c14" not in prose and "o3" not in prose
    assert "two dogs" in prose and "one cup" in prose
    assert "small cup on the left, near the bottom" in prose
    assert "the cup is left of the table" in prose
    msgs = prompts.load("expand").render(
        description=prose, question="Q?", options="A. x\nB. y", thinking="t", cue="Wait,"
    )
    assert "as someone who sees this image" in msgs[0]["content"]
    assert traces.leaks(prose) is None  # nothing in it for the reasoner to copy
    assert prompts.load("expand").version == "2"


# -- the simulator -----------------------------------------------------------------------------
def _expand_body(seed: int, bad_words: list[str] | None) -> dict:
    msgs = prompts.load("expand").render(
        description=scene.prose(_ctx()),
        question=f"Which object is left of the table? ({seed})",
        options="A. cup\nB. kite\nC. boat\nD. lamp",
        thinking="I look at the image.\nSo the answer should be (B).",
        cue="Wait,",
    )
    body = {"model": "r", "messages": msgs, "seed": seed, "n": 1}
    if bad_words is not None:
        body["bad_words"] = bad_words
    return body


def test_simulator_honours_bad_words_and_still_leaks_otherwise():
    world = World(SimConfig(leak_rate=1.0))
    banned = list(MethodParams().expand_bad_words)
    free = Counter()
    for seed in range(200):
        content, _ = world.reply(_expand_body(seed, banned), 0)
        assert not [w for w in banned if w in content], content
        assert traces.leaks(content), content  # a leak no decoder can ban: the filter's job
        plain, _ = world.reply(_expand_body(seed, None), 0)
        free.update(w for w in banned if w in plain)
    assert free["description"] and free["pixels"]  # without the ban, banned words appear
    assert world.reply(_expand_body(3, banned), 0) == world.reply(_expand_body(3, banned), 0)


def test_simulator_writes_the_answer_styles_real_models_write():
    cfg = SimConfig(answer_style_rate=0.5, no_think_close_rate=0.1, conflicting_rate=0.1)
    world = World(cfg)
    seen = Counter()
    for seed in range(300):
        content, _ = world.reply(_expand_body(seed, []), 0)
        parsed = traces.parse("<think>\nI look.\n\nWait," + content, 4)
        tail = content.rpartition("</think>")[2].strip() if "</think>" in content else None
        if tail is None:
            seen["no_think_close"] += 1
            assert parsed.letter or parsed.error == "no_think_close"
        elif parsed.error:
            seen[parsed.error] += 1
        else:
            seen["plain" if tail.startswith("Answer: ") else "styled"] += 1
    assert seen["styled"] > 20 and seen["plain"] > 20
    assert seen["no_think_close"] > 5 and seen["conflicting_answers"] > 5


# -- end to end --------------------------------------------------------------------------------
def test_demo_leaks_come_from_the_simulator_and_none_reach_the_release(local_env, sim, tmp_path):
    env = local_env
    assert sim.sim.cfg.leak_rate > 0  # the simulator's defaults, as in `lgt demo`
    upload_sample(env.store, "sources/sample/")
    result = checks.run_pipeline(env, release_version="q")
    with env.db.connect() as conn:
        leaked = conn.execute(
            text(
                "SELECT e.trace, e.cue FROM rejections r JOIN expansions e"
                " ON e.expansion_id = r.item_ref WHERE r.stage = 'filter'"
                " AND r.reason = 'leaks_metadata'"
            )
        ).all()
        expansions = conn.execute(text("SELECT trace FROM expansions")).all()
        rollout_leaks = conn.execute(
            text(
                "SELECT COUNT(*) FROM rejections WHERE stage = 'filter'"
                " AND reason = 'leaks_metadata' AND item_kind = 'rollout'"
            )
        ).scalar()
        rules = dict(conn.execute(text("SELECT rule, COUNT(*) FROM pairs GROUP BY rule")).all())
    assert leaked and rollout_leaks == 0
    planted = [p.strip() for p in LEAKS]
    for row in leaked:  # every leak the filter found is one the simulator planted
        assert any(p in row.trace for p in planted), row.trace
    # the decode-time ban worked: no planted phrase with a banned word got through
    banned = MethodParams().expand_bad_words
    assert not [e for e in expansions if any(w in e.trace for w in banned)]
    assert set(rules) == {"X->O>X", "X->O>X->X", "O>O->X", "O>X"}, rules

    local = checks.download(env.store, "releases/method/q", tmp_path / "q")
    splits = checks.load_splits(local)
    for name in ("sft_stage1", "sft_stage2"):
        for row in splits[name].remove_columns(["images"]):
            t = row["messages"][1]["content"][0]["text"]
            assert traces.leaks(t) is None, t
    sft = result.release.manifest["counts"]["splits"]["sft_stage1"]
    cues = {k for k in sft if k.startswith("cue:") and ":with_" not in k}
    assert cues == {f"cue:{c}" for c in MethodParams().expand_cues}
    card = env.store.get("releases/method/q/README.md").decode()
    assert "Per reflection cue" in card and "| `Wait,` |" in card
