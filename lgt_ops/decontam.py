"""Decontamination: nothing that overlaps a user's evaluation benchmark enters a release.

The user puts each benchmark (V* Bench, CV-Bench, MMStar, ...) in a folder under a store
prefix (`LGT_DECONTAM_PREFIX`, default `benchmarks/`): its images, and optionally its
questions as `*.jsonl` (one `{"question": ..., "options": [...]}` per line). Then

- an ingested image is rejected `contaminated:<benchmark>` by ingest, before any model sees
  it, when its 64-bit pHash is within `phash_distance` bits of one of the 81 crops hashed of a
  benchmark image (0, 4 or 8 % off each side), or one of its own 81 crops is that close to a
  benchmark image's whole: a whole-frame hash moves up to 12 bits for a 3 % crop, so a copy
  cropped either way is matched crop to whole;
- a stage-1 or composed question is rejected `contaminated:<benchmark>` at validation, before
  any rollout, when its word n-grams cover at least `ngram_overlap` of a benchmark question's
  n-grams, and it is that benchmark item rather than its template: it holds at least
  CONTENT_SHARE of the benchmark question's content words (so "How many cups ...?" is not
  "How many cars ...?") and, when the benchmark gives options, at least OPTION_SHARE of them
  (so "Which of these objects ...?" over other objects is not it).

Loading is cheap per task: the prefix is listed (at most once a minute per process) and the
index rebuilt only when the listing's etags change; each benchmark image is hashed once ever
(its hashes are kept in `benchmark_entries`, keyed by key + etag). Memory: 81 x 8 bytes per
benchmark image (`max_images`, default 5,000: 3.2 MB) plus about 1 KB per benchmark question.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

from lgt_ops.config import ConfigError, DecontamSettings
from lgt_ops.db.repo import insert_ignore
from lgt_ops.images import ImageFacts, crop_phashes, normalised
from lgt_ops.reasons import IngestReason, Rejected, detailed
from lgt_ops.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

_RELIST_S = 60.0  # a process lists the prefix at most this often
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_WORD = re.compile(r"[a-z0-9]+")
CONTENT_SHARE = 0.75
OPTION_SHARE = 0.5
# words that carry no subject: question scaffolding, shared by every templated benchmark
_STOPWORD_TEXT = """a an the of in on at to for from by with and or is are was were be been being
it its this that these those there here what which who whose whom how many much where when why
does do did can could would should will shown show shows seen see visible appear appears image
picture photo photograph scene view part side located object objects thing things you your one"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass(frozen=True)
class Hit:
    """A match: the benchmark, its object key (and line), and how close."""

    benchmark: str
    ref: str
    score: float

    @property
    def reason(self) -> str:
        return detailed(IngestReason.CONTAMINATED, self.benchmark)


@dataclass(frozen=True)
class BenchQuestion:
    benchmark: str
    ref: str  # key#line
    grams: frozenset[tuple[str, ...]]
    content: frozenset[str]
    options: frozenset[str]


# -- pure functions: hashes and n-grams ----------------------------------------------------------


def hamming(hashes: np.ndarray, value: int | np.ndarray) -> np.ndarray:
    """Bits differing between uint64 hashes (broadcast)."""
    xor = hashes ^ (np.uint64(value) if isinstance(value, int) else value)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(xor)
    return np.unpackbits(xor.view(np.uint8), axis=-1).reshape(*xor.shape, 64).sum(axis=-1)


def question_grams(question: str, n: int) -> frozenset[tuple[str, ...]]:
    """Word n-grams of a question; a question shorter than n words is one gram."""
    words = _WORD.findall(question.lower())
    if len(words) <= n:
        return frozenset({tuple(words)}) if words else frozenset()
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def content_words(question: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(question.lower()) if w not in _STOPWORDS)


def option_set(options: Sequence[str]) -> frozenset[str]:
    """Options as normalised words (order, case and punctuation do not matter)."""
    return frozenset(" ".join(_WORD.findall(str(o).lower())) for o in options) - {""}


def _share(part: frozenset[Any], whole: frozenset[Any]) -> float:
    return len(part & whole) / len(whole) if whole else 1.0


def parse_questions(benchmark: str, key: str, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """A benchmark's question file: its questions, and how many lines were unusable."""
    out, bad = [], 0
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            q = str(obj.get("question") or obj.get("text") or "")
            opts = obj.get("options") or obj.get("choices") or []
            opts = list(opts.values()) if isinstance(opts, dict) else [str(o) for o in opts]
        except (ValueError, AttributeError, TypeError):
            q, opts = "", []
        if not q.strip():
            bad += 1
            log.warning("benchmark %s: %s line %d has no question; ignored", benchmark, key, n)
            continue
        out.append({"ref": f"{key}#{n}", "question": q, "options": opts})
    return out, bad


# -- the index ------------------------------------------------------------------------------------


@dataclass
class BenchmarkIndex:
    settings: DecontamSettings
    images: list[tuple[str, str]] = field(default_factory=list)  # benchmark, key
    questions: list[BenchQuestion] = field(default_factory=list)
    postings: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # benchmark -> kind -> n
    _parts: list[np.ndarray] = field(default_factory=list)  # per image: whole first, then crops
    _arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _hash_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All hashes, the image of each, and the whole-image hashes (built once)."""
        if self._arrays is None:
            hashes = np.concatenate(self._parts)
            image_of = np.repeat(np.arange(len(self._parts)), [len(p) for p in self._parts])
            wholes = np.array([p[0] for p in self._parts], dtype=np.uint64)
            self._arrays = (hashes, image_of, wholes)
        return self._arrays

    def match_image(self, crops: Sequence[int]) -> Hit | None:
        """The nearest benchmark image within the distance, if any. `crops` are the image's
        `crop_phashes`: its whole is compared with every benchmark crop (it is a crop of a
        benchmark image) and its crops with every benchmark whole (the benchmark image is a
        crop of it)."""
        if not self.images or not crops:
            return None
        hashes, image_of, wholes = self._hash_arrays()
        to_crops = hamming(hashes, crops[0])
        to_wholes = hamming(wholes[None, :], np.array(crops, np.uint64)[:, None]).min(axis=0)
        i, j = int(np.argmin(to_crops)), int(np.argmin(to_wholes))
        image, dist = (int(image_of[i]), int(to_crops[i])), (j, int(to_wholes[j]))
        best, bits = min(image, dist, key=lambda pair: pair[1])
        if bits > self.settings.phash_distance:
            return None
        benchmark, key = self.images[best]
        return Hit(benchmark, key, bits)

    def match_question(self, question: str, options: Sequence[str]) -> Hit | None:
        """The benchmark question this one copies, if any (see the module's docstring); the
        score is the share of the benchmark question's n-grams it holds."""
        if not self.questions:
            return None
        grams = question_grams(question, self.settings.ngram)
        shared: Counter[int] = Counter()
        for g in grams:
            shared.update(self.postings.get(g, ()))
        content, opts = content_words(question), option_set(options)
        best: Hit | None = None
        for i, n in shared.items():
            q = self.questions[i]
            score = n / len(q.grams)
            if (
                score >= self.settings.ngram_overlap
                and _share(content, q.content) >= CONTENT_SHARE
                and _share(opts, q.options) >= OPTION_SHARE
                and (best is None or score > best.score)
            ):
                best = Hit(q.benchmark, q.ref, score)
        return best

    def check_question(self, question: str, options: Sequence[str]) -> None:
        """Raise Rejected(`contaminated:<benchmark>`) for a benchmark question."""
        hit = self.match_question(question, options)
        if hit is not None:
            raise Rejected(
                hit.reason, f"{hit.score:.2f} of the {self.settings.ngram}-grams of {hit.ref}"
            )

    def add_image(self, benchmark: str, key: str, hashes: Iterable[int]) -> None:
        values = np.array(list(hashes), dtype=np.uint64)
        if not len(values):
            return
        self.images.append((benchmark, key))
        self._parts.append(values)
        self._arrays = None
        self._count(benchmark, "images")

    def add_question(self, benchmark: str, ref: str, question: str, options: list[str]) -> None:
        grams = question_grams(question, self.settings.ngram)
        if not grams:
            return
        for g in grams:
            self.postings.setdefault(g, []).append(len(self.questions))
        entry = BenchQuestion(benchmark, ref, grams, content_words(question), option_set(options))
        self.questions.append(entry)
        self._count(benchmark, "questions")

    def _count(self, benchmark: str, kind: str) -> None:
        per = self.sizes.setdefault(benchmark, {})
        per[kind] = per.get(kind, 0) + 1


# -- loading from the store, cached ---------------------------------------------------------------

_CACHE: dict[tuple[str, DecontamSettings], tuple[float, tuple[Any, ...], BenchmarkIndex]] = {}
_LOCK = threading.Lock()


def index_for(env: Any) -> BenchmarkIndex:
    """The benchmark index for a stage environment (its store, lineage DB and settings)."""
    return load_index(env.store, env.db, env.settings.decontam)


def load_index(store: ObjectStore, db: Engine, settings: DecontamSettings) -> BenchmarkIndex:
    """The index of the benchmarks under `settings.prefix`, rebuilt only when its listing
    (keys and etags) changed; listed at most once per `_RELIST_S` seconds."""
    if not settings.prefix:
        return BenchmarkIndex(settings)
    cache_key = (store.url, settings)
    with _LOCK:
        cached = _CACHE.get(cache_key)
        if cached and time.monotonic() - cached[0] < _RELIST_S:
            return cached[2]
        listing = _listing(store, settings.prefix)
        signature = tuple((o.key, o.etag) for o in listing)
        if cached and cached[1] == signature:
            index = cached[2]
        else:
            index = _build(store, db, settings, listing)
        _CACHE[cache_key] = (time.monotonic(), signature, index)
        return index


def _listing(store: ObjectStore, prefix: str) -> list[ObjectInfo]:
    keep = []
    for o in store.list(prefix):
        rest = o.key[len(prefix) :]
        if o.problem is None and not any(p.startswith(".") for p in rest.split("/")):
            keep.append(o)
    return sorted(keep, key=lambda o: o.key)


def _benchmark_of(prefix: str, key: str) -> str | None:
    parts = key[len(prefix) :].split("/")
    return parts[0] if len(parts) > 1 and _NAME.match(parts[0]) else None


def _build(
    store: ObjectStore, db: Engine, settings: DecontamSettings, listing: list[ObjectInfo]
) -> BenchmarkIndex:
    index = BenchmarkIndex(settings)
    images = [o for o in listing if o.key.lower().endswith(IMAGE_SUFFIXES)]
    if len(images) > settings.max_images:
        raise ConfigError(
            f"{len(images)} benchmark images under {settings.prefix!r} > "
            f"LGT_DECONTAM_MAX_IMAGES={settings.max_images}"
        )
    known = _known(db, store.url, settings.prefix)
    new_rows = []
    for o in listing:
        benchmark = _benchmark_of(settings.prefix, o.key)
        lower = o.key.lower()
        if benchmark is None:
            log.warning("benchmark file %s is not inside a benchmark folder; ignored", o.key)
            continue
        if lower.endswith(".jsonl"):
            questions, bad = parse_questions(benchmark, o.key, store.get(o.key))
            for q in questions:
                index.add_question(benchmark, q["ref"], q["question"], q["options"])
            if (o.key, o.etag) not in known:
                new_rows.append(_row(store, o, benchmark, "questions", len(questions), None, bad))
        elif lower.endswith(IMAGE_SUFFIXES):
            row = known.get((o.key, o.etag))
            if row is None:
                row = _hash_image(store, o, benchmark)
                new_rows.append(row)
            if row["kind"] == "image":
                index.add_image(benchmark, o.key, (int(h, 16) for h in row["phashes"].split()))
            else:
                log.warning("benchmark image %s unreadable: %s", o.key, row["detail"])
    with db.begin() as conn:
        insert_ignore(conn, "benchmark_entries", new_rows)
    log.info("benchmarks under %s: %s", settings.prefix, index.sizes)
    return index


def _known(db: Engine, store_url: str, prefix: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Entries hashed before (by any process), by key and etag."""
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT key, etag, kind, phashes, detail FROM benchmark_entries"
                " WHERE store_url = :s"
            ),
            {"s": store_url},
        ).all()
    return {
        (r.key, r.etag): {"kind": r.kind, "phashes": r.phashes, "detail": r.detail}
        for r in rows
        if r.key.startswith(prefix)
    }


def _hash_image(store: ObjectStore, o: ObjectInfo, benchmark: str) -> dict[str, Any]:
    try:
        hashes = crop_phashes(normalised(store.get(o.key)))
    except (Rejected, OSError, ValueError) as exc:
        return _row(store, o, benchmark, "unreadable", 0, None, 0, str(exc)[:500])
    phashes = " ".join(f"{h:016x}" for h in hashes)
    return _row(store, o, benchmark, "image", len(hashes), phashes, 0)


def _row(
    store: ObjectStore,
    o: ObjectInfo,
    benchmark: str,
    kind: str,
    items: int,
    phashes: str | None,
    bad_lines: int,
    detail: str | None = None,
) -> dict[str, Any]:
    if bad_lines:
        detail = f"{bad_lines} line(s) without a question"
    return {
        "store_url": store.url,
        "key": o.key,
        "etag": o.etag,
        "benchmark": benchmark,
        "kind": kind,
        "items": items,
        "phashes": phashes,
        "detail": detail,
    }


def screen_image(index: BenchmarkIndex, facts: ImageFacts | Rejected) -> ImageFacts | Rejected:
    """An ingested image that copies a benchmark image becomes a rejection."""
    if isinstance(facts, Rejected):
        return facts
    hit = index.match_image(facts.crop_phashes)
    if hit is None:
        return facts
    detail = f"image {facts.image_id[:16]} within {int(hit.score)} bits of {hit.ref}"
    return Rejected(hit.reason, detail)


def forget() -> None:
    """Drop the cached indexes (a process that just changed the benchmarks, tests)."""
    with _LOCK:
        _CACHE.clear()
