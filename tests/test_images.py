"""Image validation, boxes and metadata parsing: each failure has its own reason."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from lgt_ops import boxes
from lgt_ops.config import ImageSpec
from lgt_ops.images import encode_for_request, inspect
from lgt_ops.manifest import merge, parse_coco, parse_jsonl
from lgt_ops.reasons import Rejected
from tests.samples import SAMPLE, jpeg, png


def test_good_image_is_described():
    data = (SAMPLE / "images" / "coffee.jpg").read_bytes()
    facts = inspect(data, max_pixels=10**8)
    assert (facts.width, facts.height, facts.format) == (600, 400, "JPEG")
    assert len(facts.image_id) == 64 and len(facts.phash) == 16


def test_exif_orientation_is_applied():
    facts = inspect((SAMPLE / "images" / "chelsea.jpg").read_bytes(), max_pixels=10**8)
    assert facts.exif_orientation == 6
    assert (facts.width, facts.height) == (451, 300)  # stored 300x451, shown upright


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"this is text, not a PNG", "not_an_image"),
        (jpeg(64, 48)[:300], "truncated"),
    ],
)
def test_bad_files_are_rejected_with_reasons(data, reason):
    with pytest.raises(Rejected) as exc:
        inspect(data, max_pixels=10**8)
    assert exc.value.reason == reason


def test_pixel_limit_is_checked_before_decoding():
    bomb = png(4000, 3000, mode="1")  # 12 MP of zeros: tiny file, big decode
    assert len(bomb) < 100_000
    with pytest.raises(Rejected) as exc:
        inspect(bomb, max_pixels=5_000_000)
    assert exc.value.reason == "too_many_pixels"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_modes_normalise_to_rgb(mode):
    im = Image.new(mode, (20, 10))
    buf = io.BytesIO()
    im.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = Image.open(io.BytesIO(encode_for_request(buf.getvalue(), ImageSpec(max_side=64))))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_request_images_are_bounded():
    data = (SAMPLE / "images" / "astronaut.jpg").read_bytes()
    out = Image.open(io.BytesIO(encode_for_request(data, ImageSpec(max_side=128))))
    assert max(out.size) == 128


def test_box_conventions_agree():
    w, h = 200, 100
    assert boxes.to_xyxy([10, 20, 30, 40], "xywh", w, h) == (10, 20, 40, 60)
    assert boxes.to_xyxy([0.1, 0.2, 0.5, 0.6], "xyxy_norm", w, h) == pytest.approx(
        (20, 20, 100, 60)
    )
    assert boxes.to_xyxy([0.5, 0.5, 0.2, 0.4], "cxcywh_norm", w, h) == pytest.approx(
        (80, 30, 120, 70)
    )


@pytest.mark.parametrize(
    ("box", "reason"),
    [([10, 10, 10, 20], "box_empty"), ([150, 50, 260, 90], "box_outside_image")],
)
def test_bad_boxes(box, reason):
    with pytest.raises(Rejected) as exc:
        boxes.validate(box, 200, 100)
    assert exc.value.reason == reason


def test_small_overhang_is_clipped():
    assert boxes.validate([-1, 0, 201, 100], 200, 100) == (0.0, 0.0, 200.0, 100.0)


def test_manifest_problems_do_not_stop_good_lines():
    data = b'{"key": "a.jpg", "caption": "x"}\nnot json\n{"nokey": 1}\n{"key": "../x.jpg"}\n'
    entries, problems = parse_jsonl("src/m.jsonl", data)
    assert [e.key for e in entries] == ["src/a.jpg"]
    assert [p.reason for p in problems] == [
        "manifest_malformed",
        "manifest_malformed",
        "manifest_bad_key",
    ]


def test_coco_and_manifest_merge():
    manifest, _ = parse_jsonl("s/m.jsonl", b'{"key": "i/a.jpg", "caption": "c", "objects": null}\n')
    coco_doc = {
        "images": [{"id": 1, "file_name": "i/a.jpg"}],
        "categories": [{"id": 7, "name": "cup"}],
        "annotations": [{"id": 3, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]}],
    }
    coco, problems = parse_coco("s/c.json", json.dumps(coco_doc).encode())
    assert not problems
    merged, dup = merge(coco + manifest)
    meta = merged["s/i/a.jpg"]
    assert meta.caption == "c" and meta.objects_source == "coco" and meta.box_format == "xywh"
    assert meta.objects == [{"id": "c3", "label": "cup", "box": [1, 2, 3, 4]}]
    assert not dup


@pytest.mark.parametrize(
    "box",
    [
        [1, 1, float("nan"), 5],
        [1, 1, float("inf"), 5],
        [1, float("-inf"), 10, 5],
        [1, "1", 10, 5],
        [True, 1, 10, 5],
        [1, 1, 10**400, 5],
        [1, 1, None, 5],
        [1, 1, 10],
        "1,1,10,5",
        None,
    ],
)
def test_non_finite_or_non_numeric_boxes_are_malformed(box):
    """NaN used to pass every comparison and be clipped to the image width."""
    with pytest.raises(Rejected) as exc:
        boxes.to_xyxy(box, "xyxy", 32, 32, field="bbox")
    assert exc.value.reason == "box_malformed"
    assert "'bbox' must be 4 finite numbers [x0, y0, x1, y1]" in exc.value.detail


def test_a_normalised_box_that_overflows_is_malformed():
    with pytest.raises(Rejected) as exc:
        boxes.validate(boxes.to_xyxy([0, 0, 1e308, 1], "xyxy_norm", 10**4, 10), 10**4, 10)
    assert exc.value.reason == "box_malformed"


def test_manifest_caps_and_bad_bytes_cost_one_line():
    from lgt_ops.config import IngestLimits

    limits = IngestLimits(
        max_caption_chars=10, max_objects_per_image=2, max_manifest_line_bytes=300
    )
    lines = [
        b'{"key": "a.jpg", "caption": "short"}',
        b'{"key": "b.jpg", "caption": "' + b"x" * 11 + b'"}',
        b'{"key": "c.jpg", "objects": [{}, {}, {}]}',
        b'{"key": "d.jpg", "pad": "' + b"y" * 300 + b'"}',
        b'{"key": "e.jpg", "caption": "caf\xe9"}',
        b'{"key": "f.jpg", "caption": "a\xe2\x80\xa8b"}',  # U+2028 inside a string
    ]
    entries, problems = parse_jsonl("m.jsonl", b"\xef\xbb\xbf" + b"\r\n".join(lines), limits)
    assert [(e.key, e.caption, e.objects) for e in entries] == [
        ("a.jpg", "short", None),
        ("b.jpg", None, None),
        ("c.jpg", None, None),
        ("f.jpg", "a\u2028b", None),
    ]
    assert [(p.item_ref, p.reason) for p in problems] == [
        ("m.jsonl:2", "caption_too_long"),
        ("m.jsonl:3", "too_many_objects"),
        ("m.jsonl:4", "manifest_line_too_long"),
        ("m.jsonl:5", "manifest_not_utf8"),
    ]


@pytest.mark.parametrize(
    "doc",
    [
        {"images": {"1": "a.jpg"}, "annotations": []},
        {"images": [], "annotations": [], "categories": 5},
        {"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []},
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": {}}]},
        [1, 2],
    ],
)
def test_malformed_coco_is_a_problem_not_a_crash(doc):
    _entries, problems = parse_coco("c.json", json.dumps(doc).encode())
    assert problems and {p.reason for p in problems} == {"coco_malformed"}


def test_pixel_budget_bounds_pixels_held_at_once():
    import threading

    from lgt_ops.images import PixelBudget

    budget = PixelBudget(100)
    peak, lock = [0], threading.Lock()

    def work(pixels: int) -> None:
        with budget.hold(pixels), lock:
            peak[0] = max(peak[0], budget.used)

    threads = [threading.Thread(target=work, args=(p,)) for p in [30] * 12 + [250, 70]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)  # an image over the budget still runs
    assert 0 < peak[0] <= 100 and budget.used == 0


def test_inspect_under_a_budget_gives_the_same_facts():
    from lgt_ops.images import PixelBudget

    data = (SAMPLE / "images" / "chelsea.jpg").read_bytes()
    assert inspect(data, max_pixels=10**8, budget=PixelBudget(1000)) == inspect(
        data, max_pixels=10**8
    )
