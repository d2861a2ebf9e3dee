"""Image validation, boxes and metadata parsing: each failure has its own reason."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from lgt_ops import boxes
from lgt_ops.config import ImageSpec
from lgt_ops.images import ImageRejected, encode_for_request, inspect
from lgt_ops.manifest import merge, parse_coco, parse_jsonl
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
    with pytest.raises(ImageRejected) as exc:
        inspect(data, max_pixels=10**8)
    assert exc.value.reason == reason


def test_pixel_limit_is_checked_before_decoding():
    bomb = png(4000, 3000, mode="1")  # 12 MP of zeros: tiny file, big decode
    assert len(bomb) < 100_000
    with pytest.raises(ImageRejected) as exc:
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
    with pytest.raises(boxes.BoxRejected) as exc:
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
