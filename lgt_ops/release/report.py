"""Report plots of a release, each beside the previous release's figures.

Drawn from the per-split counts the manifest carries (`counts.splits`), so comparing with the
parent release needs only its manifest, never its rows:

    report/difficulty.png   questions per difficulty bucket
    report/skills.png       questions per skill
    report/trace_length.png SFT traces per length bucket (characters)
    report/behaviours.png   share of SFT traces showing each cognitive behaviour
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

from lgt_ops.traces import BEHAVIOURS

LENGTH_BUCKET = 250  # characters per bar of the trace-length histogram


def length_bucket(n_chars: int) -> str:
    low = n_chars // LENGTH_BUCKET * LENGTH_BUCKET
    return f"{low:05d}"


def _prefixed(counts: dict[str, int], prefix: str) -> Counter[str]:
    return Counter({k[len(prefix) :]: v for k, v in counts.items() if k.startswith(prefix)})


def series(manifest: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """The four distributions of one release (empty ones when there is no release)."""
    splits = (manifest or {}).get("counts", {}).get("splits", {})
    questions = splits.get("questions", {})
    sft = [c for name, c in splits.items() if name.startswith("sft_")]
    lengths: Counter[str] = Counter()
    with_b: Counter[str] = Counter()
    rows = 0
    for c in sft:
        lengths.update(_prefixed(c, "len:"))
        with_b.update(_prefixed(c, "with_"))
        rows += c.get("rows", 0)
    return {
        "difficulty": dict(_prefixed(questions, "difficulty:")),
        "skills": dict(_prefixed(questions, "skill:")),
        "trace_length": {
            f"{int(k)}-{int(k) + LENGTH_BUCKET - 1}": v for k, v in sorted(lengths.items())
        },
        "behaviours": {b: (with_b[b] / rows if rows else 0.0) for b in BEHAVIOURS},
    }


_TITLES = {
    "difficulty": ("Questions by difficulty (VLM pass rate)", "questions"),
    "skills": ("Questions by skill", "questions"),
    "trace_length": ("SFT traces by length (characters)", "traces"),
    "behaviours": ("SFT traces showing each cognitive behaviour", "share of traces"),
}


def _bars(
    title: str,
    ylabel: str,
    current: dict[str, float],
    previous: dict[str, float],
    labels: tuple[str, str],
) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend

    keys = sorted(set(current) | set(previous), key=_natural)
    fig = Figure(figsize=(7, 3.6), dpi=100)
    ax = fig.subplots()
    xs = range(len(keys))
    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [previous.get(k, 0) for k in keys],
        width,
        label=labels[1],
        color="#b0b7c3",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [current.get(k, 0) for k in keys],
        width,
        label=labels[0],
        color="#2f6db5",
    )
    ax.set_xticks(
        list(xs),
        keys,
        rotation=30 if len(keys) > 5 else 0,
        ha="right" if len(keys) > 5 else "center",
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    # Fixed margins (room for rotated labels): tight_layout cost more than drawing the plot.
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.3 if len(keys) > 5 else 0.14)
    buf = io.BytesIO()
    # No timestamps or versions in the file: the same figures give the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _natural(key: str) -> tuple[int, str]:
    """Numeric labels ("250-499") in numeric order, the rest alphabetically after them."""
    head = key.split("-", 1)[0]
    return (int(head), key) if head.isdigit() else (1 << 62, key)


def render(manifest: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, bytes]:
    """`report/<name>.png` -> PNG bytes, this release against its parent."""
    now, before = series(manifest), series(parent)
    labels = (manifest["release_id"], parent["release_id"] if parent else "no previous release")
    return {
        f"report/{name}.png": _bars(title, ylabel, now[name], before[name], labels)
        for name, (title, ylabel) in _TITLES.items()
    }
