"""Traces as the pipeline makes them from the simulator's replies (cot rollouts, then expand
continuations with every leak phrasing the simulator plants), without a server or a DB: for
the filter rules' equivalence test and bench/filter_rules.py."""

from __future__ import annotations

import random

from lgt_ops import prompts, traces
from lgt_ops.llm.simulator import SimConfig
from lgt_ops.llm.simulator.world import World
from lgt_ops.traces import Trace

OBJECTS = ("cup", "kite", "boat", "lamp", "dog", "chair", "bottle", "sign")
CUES = ("Wait,", "Hmm,", "Alternatively,", "Let me re-check:")


def _question(rng: random.Random) -> tuple[str, str, int]:
    """(question, options block, number of options): a spatial or a counting question."""
    if rng.random() < 0.5:
        names = rng.sample(OBJECTS, rng.randint(2, 5))
        question = f"Which object is left of the {rng.choice(OBJECTS)}?"
    else:
        first = rng.randint(0, 6)
        names = [str(first + k) for k in range(rng.randint(2, 4))]
        question = f"How many {rng.choice(OBJECTS)}s are in the image?"
    return question, "\n".join(f"{'ABCDEFGH'[i]}. {n}" for i, n in enumerate(names)), len(names)


def question_traces(world: World, i: int, expansions: int = 3) -> list[Trace]:
    """One question's rollout and its expansions, built as stages cot and expand build them."""
    rng = random.Random(i)
    question, options, n_opt = _question(rng)
    cot = prompts.load("cot").render(question=question, options=options)
    cot[-1] = {"role": "assistant", "content": cot[-1]["content"] + "\n"}
    content, _ = world.reply({"messages": cot, "seed": i, "n": 1}, 0)
    text = "<think>\n" + content
    parsed = traces.parse(text, n_opt)
    rid = f"r{i}"
    out = [Trace(rid, "rollout", f"q{i}", traces.canonical_answer(text, parsed.letter),
                 parsed.letter, parsed.letter == "A", parsed.error, None, None)]  # fmt: skip
    thinking = parsed.thinking or content
    for j in range(expansions):
        cue = CUES[(i + j) % len(CUES)]
        msgs = prompts.load("expand").render(
            description="A small scene.", question=question, options=options,
            thinking=thinking, cue=cue,
        )  # fmt: skip
        cont, _ = world.reply({"messages": msgs, "seed": 7919 * i + j, "n": 1}, 0)
        head = f"<think>\n{thinking}\n\n{cue}"
        p = traces.parse(head + cont, n_opt)
        more, answer = traces.split_continuation(cont, p)
        trace = traces.assemble(thinking, cue, more, p.letter, answer)
        out.append(Trace(f"e{i}.{j}", "expansion", f"q{i}", trace, p.letter, p.letter == "A",
                         p.error, rid, None, cue))  # fmt: skip
    return out


def simulated(questions: int, seed: int = 0, leak_rate: float = 0.3) -> list[list[Trace]]:
    """`questions` questions' traces (1 rollout + 3 expansions each), leaks at `leak_rate`."""
    world = World(SimConfig(seed=seed, leak_rate=leak_rate, degenerate_rate=0.05))
    return [question_traces(world, i) for i in range(questions)]
