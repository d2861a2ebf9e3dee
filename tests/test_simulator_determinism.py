"""The simulator is a pure function of (request body, seed).

Two real `lgt sim serve` processes get the same requests in different orders and at different
concurrency levels and must answer with byte-identical bodies (id, created, usage and all);
injected faults are a function of (body, seed, attempt). Ground truth needs no memory: a
question the simulator wrote is answered, later, from the question and its options alone. And
the demo, run twice from scratch, publishes the same content hash.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lgt_ops import prompts
from lgt_ops.ids import canonical_json, sha256_hex
from lgt_ops.llm.simulator import SimConfig
from lgt_ops.llm.simulator.world import World
from tests.conftest import ROOT, free_port
from tests.samples import run_demo

SEED = 7


# -- two simulator processes -------------------------------------------------------------------
def _start(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lgt_ops.cli", "sim", "serve", "--port", str(port)]
    cmd += ["--latency-ms", "0", "--seed", str(SEED)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("simulator process exited") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("simulator process did not start")


@pytest.fixture(scope="module")
def two_sims() -> Iterator[tuple[str, str]]:
    ports = (free_port(), free_port())
    procs = [_start(p) for p in ports]
    try:
        yield tuple(f"http://127.0.0.1:{p}" for p in ports)  # type: ignore[misc]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _configure(base: str, **settings: float) -> None:
    status, _ = _post(base + "/sim/config", settings)
    assert status == 200


# -- requests like the pipeline's ----------------------------------------------------------------
def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _schema_body(template: str, messages: list[dict], seed: int) -> dict:
    t = prompts.load(template)
    return {
        "model": "m",
        "messages": messages,
        "temperature": 0.7,
        "max_tokens": 4096,
        "seed": seed,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": t.id, "schema": t.schema, "strict": True},
        },
    }


def _objects(rng: random.Random) -> str:
    labels = rng.sample(["cup", "dog", "lamp", "chair", "bottle", "kite", "boat"], 5)
    lines = []
    for i, label in enumerate(labels + labels[:1]):  # one label twice: counting has a 2
        x0 = rng.randrange(0, 500)
        y0 = rng.randrange(0, 300)
        lines.append(f"o{i + 1}: {label} [{x0}, {y0}, {x0 + rng.randrange(20, 120)}, {y0 + 60}]")
    return "\n".join(lines)


def _mcq_body(i: int) -> dict:
    rng = random.Random(i)
    msgs = prompts.load("mcq").render(
        width=640,
        height=480,
        caption="A red cup on a table next to a brown dog and a white lamp.",
        objects=_objects(rng),
        count=5,
        skills="existence, counting, spatial, size, position, attribute",
        n_options=4,
        letters="A, B, C, D",
    )
    return _schema_body("mcq", msgs, seed=i)


def _cot_body(question: str, options: list[str], image: str, seed: int, n: int = 1) -> dict:
    block = "\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(options))
    msgs = prompts.load("cot").render(question=question, options=block)
    user = msgs[1]
    msgs[1] = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": user["content"]},
        ],
    }
    return {"model": "v", "messages": msgs, "temperature": 1.0, "seed": seed, "n": n}


def _requests() -> list[dict]:
    images = [_png((40 * k, 90, 200 - 30 * k), (64 + 8 * k, 48)) for k in range(4)]
    same_question = "Which of these objects can be seen in the image?"
    bodies: list[dict] = [_mcq_body(i) for i in range(6)]
    for k, image in enumerate(images):
        # The same question text on several images with different answers (what the old
        # last-answer-wins registry got wrong), and multi-sample rollouts.
        opts = [["cup", "kite", "boat", "lamp"], ["dog", "cup", "horse", "tree"]][k % 2]
        bodies.append(_cot_body(same_question, opts, image, seed=k, n=4))
        bodies.append(
            _cot_body(
                "How many cups are visible in the image?", ["1", "2", "3", "4"], image, seed=k
            )
        )
    bodies.append(
        _schema_body(
            "annotate",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": images[0]}},
                        {"type": "text", "text": "Annotate this 64 x 48 pixel image."},
                    ],
                }
            ],
            seed=3,
        )
    )
    compose = prompts.load("compose").render(
        operator="count_over",
        operator_description="Add two counts.",
        parents="1. How many cups are visible in the image? -> 2\n"
        "2. How many dogs can be seen in the image? -> 1",
        answer="3",
        suggested="4 | 3 | 5 | 2",
        n_options=4,
        letters="A, B, C, D",
    )
    bodies.append(_schema_body("compose", compose, seed=11))
    expand = prompts.load("expand").render(
        description="A red cup and a brown dog.",
        question=same_question,
        options="A. cup\nB. kite\nC. boat\nD. lamp",
        thinking="I look at the image.\nSo the answer should be (B).",
        cue="Wait,",
    )
    bodies.append({"model": "r", "messages": expand, "temperature": 0.8, "seed": 5, "n": 2})
    trace = "The question asks ... let me double-check. Working backwards, I rule out B."
    bodies.append(
        _schema_body("behaviours", prompts.load("behaviours").render(trace=trace), seed=1)
    )
    bodies.append({"model": "g", "messages": [{"role": "user", "content": "hello"}], "n": 3})
    return bodies


def _send_all(
    base: str, bodies: list[dict], order: list[int], workers: int, attempt: int | None = None
) -> dict[int, tuple[int, bytes]]:
    url = base + "/v1/chat/completions"

    def one(i: int) -> tuple[int, tuple[int, bytes]]:
        headers = {}
        if attempt is not None:
            key = sha256_hex(canonical_json(bodies[i]))[:32]
            headers["X-Request-Id"] = f"lgt-{key}-{attempt}"
        return i, _post(url, bodies[i], headers)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, order))


# -- tests ---------------------------------------------------------------------------------------
def test_two_processes_answer_byte_identically_in_any_order_and_concurrency(two_sims):
    a, b = two_sims
    bodies = _requests()
    forward = list(range(len(bodies)))
    shuffled = random.Random(1).sample(forward, len(forward))
    first = _send_all(a, bodies, forward, workers=1)
    # The other process: shuffled, 16 at once, every request twice in flight together.
    second = _send_all(b, bodies, shuffled + shuffled[::-1], workers=16)
    # The first process again, reversed, after it has seen everything once.
    third = _send_all(a, bodies, forward[::-1], workers=4)
    assert all(status == 200 for status, _ in first.values())
    assert first == second == third
    replies = [json.loads(raw) for _, raw in first.values()]
    assert len({r["id"] for r in replies}) == len(replies)  # ids differ per request
    assert all(r["model"].startswith("lgt-simulator:") for r in replies)
    # The model list (the names asked for) does not depend on the order they were asked in.
    hello = [{"role": "user", "content": "hi"}]
    for base, names in ((a, ("z1", "z2")), (b, ("z2", "z1"))):
        for name in names:
            status, _ = _post(base + "/v1/chat/completions", {"model": name, "messages": hello})
            assert status == 200
    listed = [urllib.request.urlopen(base + "/v1/models", timeout=10).read() for base in (a, b)]
    assert listed[0] == listed[1]
    assert {"m", "v", "r", "g", "z1", "z2"} <= {m["id"] for m in json.loads(listed[0])["data"]}


def test_injected_faults_are_a_function_of_request_seed_and_attempt(two_sims):
    a, b = two_sims
    faults = {"fault_429": 0.2, "fault_500": 0.2, "fault_truncated": 0.15}
    for base in two_sims:
        _configure(base, retry_after_s=0.0, **faults)
    try:
        bodies = _requests()
        order = list(range(len(bodies)))
        rev = order[::-1]
        for attempt in (0, 1, 2):
            x = _send_all(a, bodies, order, workers=1, attempt=attempt)
            y = _send_all(b, bodies, rev, workers=8, attempt=attempt)
            assert x == y
        statuses = [s for s, _ in _send_all(a, bodies, order, 4, attempt=0).values()]
        statuses += [s for s, _ in _send_all(a, bodies, order, 4, attempt=1).values()]
        assert {200, 429, 500} <= set(statuses)  # the rates still inject every kind
    finally:
        for base in two_sims:
            _configure(base, **dict.fromkeys(faults, 0.0))


def _mcq_replies(world: World, n: int) -> Iterator[dict]:
    for i in range(n):
        content, _ = world.reply(_mcq_body(i), 0)
        yield from json.loads(content)["questions"]


def test_a_written_question_is_answered_from_its_text_and_options_alone():
    """Rollouts see the question and options in the pipeline's own order, nothing else."""
    world = World(SimConfig(seed=SEED, bad_question_rate=0.0))
    image = _png((1, 2, 3), (8, 8))
    checked = 0
    for q in _mcq_replies(world, 30):
        correct = q["options"]["ABCD".index(q["answer"])]
        for order in range(3):  # the pipeline reshuffles options by question id
            opts = random.Random(f"{q['question']}{order}").sample(q["options"], 4)
            text = _cot_body(q["question"], opts, image, seed=0)["messages"][1]["content"][1]
            _, parsed, truth = world._truth(text["text"])
            assert dict(parsed)[truth] == correct, q
            checked += 1
    assert checked >= 200
    # A fresh world (another process) holds the same truths: nothing was remembered.
    other = World(SimConfig(seed=SEED, bad_question_rate=0.0))
    assert list(_mcq_replies(other, 5)) == list(_mcq_replies(world, 5))


def test_a_composed_question_keeps_the_given_answer_as_its_truth():
    world = World(SimConfig(seed=SEED))
    agreed = 0
    for total in range(2, 42):
        options = [str(v) for v in (total, total + 1, total + 2, total - 1)]
        msgs = prompts.load("compose").render(
            operator="count_over",
            operator_description="Add two counts.",
            parents=f"1. How many cups are visible in the image? -> {total - 1}\n"
            "2. How many dogs can be seen in the image? -> 1",
            answer=str(total),
            suggested=" | ".join(options),
            n_options=4,
            letters="A, B, C, D",
        )
        reply = json.loads(world.reply(_schema_body("compose", msgs, seed=total), 0)[0])
        marked = reply["options"]["ABCD".index(reply["answer"])]
        block = "\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(reply["options"]))
        _, parsed, truth = world._truth(f"Question: {reply['question']}\nOptions:\n{block}")
        assert dict(parsed)[truth] == marked  # what it marks is what its rollouts hold right
        agreed += marked == str(total)
    assert agreed >= 36  # 16 wordings: a disagreement (answer_mismatch) is rare


def test_presigned_image_urls_do_not_change_the_reply():
    world = World(SimConfig(seed=SEED))
    body = _cot_body("Q?", ["a", "b", "c", "d"], "http://h1:9000/bkt/img/ab.png?X-Sig=1", 0)
    again = _cot_body("Q?", ["a", "b", "c", "d"], "http://h2:9001/bkt/img/ab.png?X-Sig=2", 0)
    other = _cot_body("Q?", ["a", "b", "c", "d"], "http://h1:9000/bkt/img/cd.png?X-Sig=1", 0)
    assert world.reply(body, 0) == world.reply(again, 0)
    assert [world.reply(body, i) for i in range(8)] != [world.reply(other, i) for i in range(8)]


# -- the demo, twice from scratch ------------------------------------------------------------------
def _demo(data_dir: Path) -> str:
    shutil.rmtree(data_dir, ignore_errors=True)
    out = run_demo(data_dir)
    m = re.search(r"content sha256: ([0-9a-f]{64})", out)
    assert m, out
    return m.group(1)


def test_the_demo_twice_from_scratch_publishes_the_same_content(tmp_path):
    # Same path both times: release rows reference images by their store path.
    data_dir = tmp_path / "demo"
    assert _demo(data_dir) == _demo(data_dir)
