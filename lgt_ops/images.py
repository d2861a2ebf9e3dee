"""Decode, validate, normalise and hash images.

Validation decodes every pixel (a header alone hides truncation), refuses images over an
explicit pixel budget before decoding (decompression bombs), applies the EXIF orientation
and normalises the mode to RGB. Failures raise `Rejected` with a reason code.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools
import io
import itertools
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lgt_ops.config import ImageSpec
from lgt_ops.ids import sha256_hex
from lgt_ops.reasons import IngestReason as R
from lgt_ops.reasons import Rejected

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
_EXIF_ORIENTATION = 0x0112


class PixelBudget:
    """A semaphore weighted by decoded pixels, shared by the threads that decode at once.

    Peak memory of a decode grows with width x height, not with the file size, so the number
    of concurrent decodes alone does not bound it. An image larger than the whole budget
    waits until nothing else is decoding and then runs alone.
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError("a pixel budget must be positive")
        self.pixels = pixels
        self._used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = max(1, min(pixels, self.pixels))
        with self._cond:
            self._cond.wait_for(lambda: self._used + need <= self.pixels)
            self._used += need
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_malloc_tuned = False


def return_big_frees_to_os() -> None:
    """Make blocks of 1 MiB or more come from mmap, so freeing them lowers RSS.

    glibc raises its mmap threshold after big frees, so decoded image blocks end up in
    per-thread heaps that keep them: under a budget of one image at a time, 8 decode threads
    still held 1.4 GB (62 Mpx PNGs) instead of 0.43 GB. Setting a fixed threshold stops that
    (once per process; a no-op where there is no glibc).
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class ImageFacts:
    image_id: str
    width: int
    height: int
    format: str
    mode: str
    bytes: int
    exif_orientation: int | None
    phash: str
    crop_phashes: tuple[int, ...] = ()  # see crop_phashes; not stored


def _open(data: bytes, max_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    im = _open_header(data, max_pixels)
    if budget is None:
        _load(im)
    else:
        with budget.hold(im.width * im.height):
            _load(im)
    return im


def decode_cost(head: bytes, file_bytes: int) -> int:
    """Pixels a decode will hold, from the first bytes of a file; the file size when the
    header does not tell (not an image, or a header beyond `head`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head)) as im:
                return max(1, im.width * im.height)
    except Exception:  # noqa: BLE001 - any failure means "unknown"; inspect gives the reason
        return max(1, file_bytes)


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read: size and format, no pixels yet."""
    if not data:
        raise Rejected(R.EMPTY_FILE, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(R.TOO_MANY_PIXELS, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise Rejected(R.NOT_AN_IMAGE, "Pillow cannot identify the file") from exc
    except OSError as exc:  # a header cut short
        raise Rejected(_os_reason(exc), str(exc)) from exc
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected(R.TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w < 1 or h < 1:
        raise Rejected(R.EMPTY_IMAGE, f"size {w}x{h}")
    if im.format not in ALLOWED_FORMATS:
        raise Rejected(R.UNSUPPORTED_FORMAT, f"format {im.format}")
    return im


def _load(im: Image.Image) -> None:
    """Decode every pixel: a header alone hides truncation."""
    try:
        im.load()
    except OSError as exc:  # Pillow reports truncated and corrupt data as OSError
        raise Rejected(_os_reason(exc), str(exc)) from exc
    except (SyntaxError, ValueError) as exc:
        raise Rejected(R.CORRUPT, str(exc)) from exc


def _os_reason(exc: OSError) -> R:
    msg = str(exc).lower()
    return R.TRUNCATED if "truncated" in msg or "broken data stream" in msg else R.CORRUPT


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited on white, not dropped to black."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    return im.convert("RGB")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    m[0] /= np.sqrt(2)
    return m


_DCT8 = _dct_matrix(32)[:8]  # the 8 lowest frequencies of a 32-point DCT-II


# fraction cut off each side; every combination (3**4 = 81 regions) is hashed by crop_phashes
CROP_SIDES = (0.0, 0.04, 0.08)
_CROP_HASH_SIDE = 128  # crops are hashed from a grey copy at most this many pixels a side
CROP_REGIONS = tuple(itertools.product(CROP_SIDES, repeat=4))  # (left, top, right, bottom)
_WHOLE = CROP_REGIONS[:1]  # (0, 0, 0, 0): the whole image


def crop_phashes(
    im: Image.Image, regions: tuple[tuple[float, ...], ...] = CROP_REGIONS
) -> tuple[int, ...]:
    """64-bit perceptual hashes of the whole image (first: `images.phash`) and of its 80 crops,
    so an image and a copy of it cropped by up to ~10 % a side can be matched crop to whole.
    A pHash is the signs of the 8x8 lowest DCT frequencies of a 32x32 grey thumbnail against
    their median (DC excluded from the median): resizing and re-encoding move it by 0-2 bits,
    distinct sample images are >= 20 bits apart, a 3 % crop moves it up to 12 bits.

    Each region is averaged into 32x32 blocks with a summed-area table of a grey copy at most
    _CROP_HASH_SIDE pixels a side, all 81 at once: ~8-13 ms an image (81 Pillow resizes took
    ~25-35 ms; sample photos, on a loaded 2-core machine). `regions=_WHOLE` hashes the whole
    only (the same value as the first of all 81), for ingest without image benchmarks.
    """
    small = im.convert("L")
    small.thumbnail((_CROP_HASH_SIDE, _CROP_HASH_SIDE), Image.Resampling.LANCZOS)
    grey = np.asarray(small, np.float64)
    h, w = grey.shape
    table = np.zeros((h + 1, w + 1))
    table[1:, 1:] = grey.cumsum(0).cumsum(1)
    rows, cols, area = _block_grid(h, w, regions)
    corner = table[rows[:, :, None], cols[:, None, :]]  # (81, 33, 33)
    sums = corner[:, 1:, 1:] - corner[:, :-1, 1:] - corner[:, 1:, :-1] + corner[:, :-1, :-1]
    return tuple(_dct_bits(sums / area))


@functools.lru_cache(maxsize=1024)
def _block_grid(
    h: int, w: int, regions: tuple[tuple[float, ...], ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 33 row and column edges of each region's 32x32 blocks and the blocks' areas (at
    least 1) for an h x w thumbnail: the same for every image of that size, so made once."""
    rows = np.array([np.linspace(h * t, h - h * b, 33) for _, t, _, b in regions])
    cols = np.array([np.linspace(w * left, w - w * r, 33) for left, _, r, _ in regions])
    rows, cols = rows.round().astype(int), cols.round().astype(int)
    area = np.maximum(np.diff(rows, axis=1)[:, :, None] * np.diff(cols, axis=1)[:, None, :], 1)
    for a in (rows, cols, area):
        a.setflags(write=False)  # shared by every caller
    return rows, cols, area


def _dct_bits(blocks: np.ndarray) -> list[int]:
    """The pHash bits of each 32x32 block in `blocks` (n, 32, 32)."""
    low = (_DCT8 @ blocks @ _DCT8.T).reshape(len(blocks), 64)
    above = low > np.median(low[:, 1:], axis=1, keepdims=True)
    return [int.from_bytes(row.tobytes(), "big") for row in np.packbits(above, axis=1)]


def inspect(
    data: bytes, *, max_pixels: int, budget: PixelBudget | None = None, crops: bool = True
) -> ImageFacts:
    """Validate `data` fully and describe it, or raise Rejected. With a budget, the
    decode and everything derived from the pixels happen inside the budget's hold.
    `crops=False` leaves `crop_phashes` to the whole image's hash (nothing to screen)."""
    im = _open_header(data, max_pixels)
    if budget is None:
        return _describe(data, im, crops)
    with budget.hold(im.width * im.height):
        return _describe(data, im, crops)


def _describe(data: bytes, im: Image.Image, crops: bool = True) -> ImageFacts:
    _load(im)
    fmt, mode = str(im.format), im.mode
    orientation = im.getexif().get(_EXIF_ORIENTATION)
    ImageOps.exif_transpose(im, in_place=True)  # no second full-size copy
    upright = to_rgb(im)
    hashes = crop_phashes(upright, CROP_REGIONS if crops else _WHOLE)
    return ImageFacts(
        image_id=sha256_hex(data),
        width=upright.width,
        height=upright.height,
        format=fmt,
        mode=mode,
        bytes=len(data),
        exif_orientation=int(orientation) if orientation else None,
        phash=f"{hashes[0]:016x}",
        crop_phashes=hashes,
    )


def normalised(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """The upright RGB image the rest of the pipeline sees."""
    return to_rgb(ImageOps.exif_transpose(_open(data, max_pixels)))


def encode_for_request(data: bytes, spec: ImageSpec) -> bytes:
    """The bytes sent to a VLM: upright, RGB, longest side <= spec.max_side."""
    im = normalised(data)
    if max(im.size) > spec.max_side:
        im.thumbnail((spec.max_side, spec.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if spec.format == "JPEG":
        im.save(out, "JPEG", quality=spec.quality, optimize=False)
    else:
        im.save(out, "PNG")
    return out.getvalue()


def data_url(encoded: bytes, spec: ImageSpec) -> str:
    mime = "image/jpeg" if spec.format == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(encoded).decode('ascii')}"


def scale_factor(width: int, height: int, spec: ImageSpec) -> float:
    """How much `encode_for_request` shrinks an image (boxes scale by the same factor)."""
    longest = max(width, height)
    return min(1.0, spec.max_side / longest)
