"""Decontamination: copies of benchmark images and questions are rejected
`contaminated:<benchmark>` before any model call, and the card counts them."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from sqlalchemy import text

from lgt_ops import decontam
from lgt_ops.config import DecontamSettings
from lgt_ops.decontam import BenchmarkIndex
from lgt_ops.demo import upload_benchmarks
from lgt_ops.images import crop_phashes, normalised
from lgt_ops.release.publish import publish
from lgt_ops.sources import resolve_source
from lgt_ops.stages import annotate, blind, compose, cot, ingest, mcq
from lgt_ops.stages.base import Shard
from tests.samples import SAMPLE, upload_sample

UMBRELLA = (
    "What is the colour of the umbrella held by the woman on the left?",
    ["red", "blue", "green", "yellow"],
)
WHEELS = ("How many wheels of the motorcycle are visible in the image?", ["0", "1", "2", "3"])


@pytest.fixture(scope="module")
def sample_images() -> dict[str, Image.Image]:
    return {p.name: normalised(p.read_bytes()) for p in sorted((SAMPLE / "images").iterdir())}


def _reencoded(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(im: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = im.size
    return im.crop((int(w * left), int(h * top), w - int(w * right), h - int(h * bottom)))


COPIES = {
    "half size": lambda im: im.resize((im.width // 2, im.height // 2)),
    "jpeg q40": lambda im: _reencoded(im, 40),
    "grey": lambda im: im.convert("L").convert("RGB"),
    "crop 3% a side": lambda im: _crop(im, 0.03, 0.03, 0.03, 0.03),
    "crop left 6% top 2%": lambda im: _crop(im, 0.06, 0.02, 0, 0),
    "crop 5%, 60% size, q60": lambda im: _reencoded(
        _crop(im, 0.05, 0.05, 0.05, 0.05).resize((im.width * 3 // 5, im.height * 3 // 5)), 60
    ),
}


def _index(images: dict[str, Image.Image]) -> BenchmarkIndex:
    index = BenchmarkIndex(DecontamSettings())
    for name, im in images.items():
        index.add_image("bench", name, crop_phashes(im))
    return index


def test_copies_are_caught_either_way_and_other_images_are_not(sample_images):
    for name, im in sample_images.items():
        others = _index({n: o for n, o in sample_images.items() if n != name})
        for how, copy in COPIES.items():
            copied = copy(im)
            # the benchmark holds the original, the source a copy; and the other way round
            hit = _index({name: im}).match_image(crop_phashes(copied))
            assert hit is not None and hit.ref == name, (name, how)
            assert _index({name: copied}).match_image(crop_phashes(im)) is not None, (name, how)
            # a copy of one sample photo matches none of the nine others
            assert others.match_image(crop_phashes(copied)) is None, (name, how)
        assert others.match_image(crop_phashes(im)) is None, name


@pytest.mark.parametrize(
    ("question", "options", "score"),
    [
        # copies: caught, with the share of the benchmark question's 3-grams they hold
        (*UMBRELLA, 1.0),
        (UMBRELLA[0].lower().rstrip("?"), ["Green", "red", "Yellow", "blue"], 1.0),
        (UMBRELLA[0].replace("colour", "color"), UMBRELLA[1], 0.75),
        (
            "In this photo, " + UMBRELLA[0].lower().replace("woman", "woman standing"),
            UMBRELLA[1],
            0.83,
        ),
        (WHEELS[0].replace("the motorcycle", "the red motorcycle"), WHEELS[1], 0.78),
        # not copies: kept
        ("What is the colour of the umbrella held by the man on the right?", UMBRELLA[1], None),
        (UMBRELLA[0], ["black", "white", "grey", "purple"], None),
        ("Is the woman on the left holding the umbrella above her head?", ["yes", "no"], None),
        ("Which colour is the umbrella that the woman on the left is holding?", UMBRELLA[1], None),
        ("How many people are visible in the image?", WHEELS[1], None),
        ("How many of the motorcycle's wheels are visible?", ["1", "2", "3", "4"], None),
    ],
)
def test_question_overlap_thresholds(question, options, score):
    """The figures README documents for the defaults (3-grams, overlap 0.6)."""
    index = BenchmarkIndex(DecontamSettings())
    index.add_question("mmstar", "mmstar/questions.jsonl#1", *UMBRELLA)
    index.add_question("cvbench", "cvbench/questions.jsonl#1", *WHEELS)
    hit = index.match_question(question, options)
    if score is None:
        assert hit is None
    else:
        assert hit is not None and hit.score == pytest.approx(score, abs=0.01)


def test_index_hashes_each_file_once_and_survives_a_bad_one(local_env):
    env = local_env
    upload_benchmarks(env.store, "benchmarks/")
    env.store.put("benchmarks/broken/not_really.jpg", b"not an image")
    env.store.put("benchmarks/loose.jpg", (SAMPLE / "images" / "coins.png").read_bytes())
    decontam.forget()
    index = decontam.index_for(env)
    assert index.sizes == {"sample_bench": {"images": 2, "questions": 3}}
    with env.db.connect() as conn:
        kinds = dict(conn.execute(text("SELECT key, kind FROM benchmark_entries")).all())
    assert kinds == {
        "benchmarks/sample_bench/cv_0001.jpg": "image",
        "benchmarks/sample_bench/cv_0002.jpg": "image",
        "benchmarks/sample_bench/questions.jsonl": "questions",
        "benchmarks/broken/not_really.jpg": "unreadable",
    }
    # another process: the listing is unchanged, nothing is hashed again (rows are reused)
    decontam.forget()
    env.store.put(
        "benchmarks/sample_bench/extra.jsonl",
        json.dumps({"question": WHEELS[0], "options": WHEELS[1]}).encode() + b"\n{}\n",
    )
    again = decontam.index_for(env)
    assert again.sizes["sample_bench"] == {"images": 2, "questions": 4}
    assert again.match_question(*WHEELS).ref.startswith("benchmarks/sample_bench/")


def test_contaminated_images_and_questions_never_reach_a_model(pg_s3_env, sim):
    env = pg_s3_env
    upload_sample(env.store, "sources/sample/")
    upload_benchmarks(env.store, "benchmarks/")
    decontam.forget()
    _, stats = ingest.ingest_all(env, "sources/sample/")
    assert stats.rejected_by_reason == {"contaminated:sample_bench": 2}
    spec, _ = resolve_source(env, "sources/sample/")
    with env.db.connect() as conn:
        rejected = dict(
            conn.execute(text("SELECT key, reason FROM sources WHERE status = 'rejected'")).all()
        )
        assert conn.execute(text("SELECT COUNT(*) FROM images")).scalar_one() == 8
    assert rejected == {
        "sources/sample/images/coffee.jpg": "contaminated:sample_bench",
        "sources/sample/images/motorcycle.jpg": "contaminated:sample_bench",
    }
    annotate.run(env, spec, Shard())
    served = sim.sim.served
    first = mcq.run(env, spec, Shard())
    assert first.requests_sent == 8  # one per image left: none for the two benchmark copies
    assert sim.sim.served == served + 8

    # A benchmark question that one generated question copies (options shuffled) ...
    with env.db.connect() as conn:
        row = conn.execute(text("SELECT question, options FROM questions ORDER BY 1")).first()
    line = {"question": row.question, "options": sorted(json.loads(row.options))}
    env.store.put("benchmarks/mmstar/questions.jsonl", json.dumps(line).encode())
    decontam.forget()
    # ... rejects it on the next validation, from the ledger: no new request
    env = env.with_settings(env.settings.with_method(mcq_dedup_threshold=0.81))
    mcq.run(env, spec, Shard())
    assert sim.sim.served == served + 8
    with env.db.connect() as conn:
        hits = conn.execute(
            text("SELECT detail FROM rejections WHERE stage = 'mcq' AND reason = :r"),
            {"r": "contaminated:mmstar"},
        ).all()
    assert len(hits) == 1 and "benchmarks/mmstar/questions.jsonl#1" in hits[0].detail

    # a composed question is checked too, before it is rolled out (its parents: stage-1
    # questions past the blind check that the VLM answers)
    blind.run(env, spec, Shard())
    cot.run(env, spec, Shard())
    compose.run(env, spec, Shard())
    with env.db.connect() as conn:
        row = conn.execute(
            text("SELECT question, options FROM questions WHERE stage = 2 ORDER BY 1")
        ).first()
    line = {"question": row.question, "options": json.loads(row.options)}
    env.store.put("benchmarks/vstar/questions.jsonl", json.dumps(line).encode())
    decontam.forget()
    env = env.with_settings(env.settings.with_method(compose_per_image=5))
    compose.run(env, spec, Shard())
    with env.db.connect() as conn:
        hits = conn.execute(
            text("SELECT COUNT(*) FROM rejections WHERE stage = 'compose' AND reason = :r"),
            {"r": "contaminated:vstar"},
        ).scalar_one()
    assert hits == 1

    rel = publish(env, spec, name="t", version="1", allow_simulated=True)
    card = env.store.get("releases/t/1/README.md").decode()
    assert "| mmstar | 0 | 1 |" in card and "| sample_bench | 2 | 0 |" in card
    assert "| vstar | 0 | 1 |" in card
    assert rel.manifest["counts"]["rejections"]["ingest"]["contaminated:sample_bench"] == 2
