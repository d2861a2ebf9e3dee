"""Every reason a stage can record for an item it rejects or skips, in one registry.

Each stage that has moved to typed reasons owns a `StrEnum` here; code that rejects uses its
members (they compare equal to, and are stored as, their plain string value), and the
README's reason table is tested against `REGISTRY`, so the documentation cannot drift from
what the code can emit. Stages not yet listed in `REGISTRY` still use string literals; adding
one is a new enum plus one `REGISTRY` entry.
"""

from __future__ import annotations

from enum import StrEnum


class IngestReason(StrEnum):
    """Why scan/ingest rejected or skipped a key, a manifest line, or an object of an image."""

    # the object key / file itself, before any byte is read
    FOLDER_MARKER = "folder_marker"  # skipped: a zero-byte `prefix/` key (S3 console folders)
    HIDDEN_KEY = "hidden_key"  # skipped: a path part starts with '.'
    LINKED_DIRECTORY = "linked_directory"  # skipped: a link to a folder inside the store
    INVALID_KEY = "invalid_key"  # `//`, `.`/`..` parts, control characters, not UTF-8
    SYMLINK_LOOP = "symlink_loop"
    BROKEN_LINK = "broken_link"
    LINK_OUTSIDE_ROOT = "link_outside_root"
    SPECIAL_FILE = "special_file"  # FIFO, socket, device: never opened
    FILE_TOO_LARGE = "file_too_large"
    MISSING_OBJECT = "missing_object"  # a manifest names a key that is not there
    # the bytes
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_MANY_PIXELS = "too_many_pixels"
    EMPTY_IMAGE = "empty_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    # metadata files
    MANIFEST_NOT_UTF8 = "manifest_not_utf8"
    MANIFEST_MALFORMED = "manifest_malformed"
    MANIFEST_LINE_TOO_LONG = "manifest_line_too_long"
    MANIFEST_BAD_KEY = "manifest_bad_key"
    MANIFEST_DUPLICATE_KEY = "manifest_duplicate_key"
    COCO_MALFORMED = "coco_malformed"
    CAPTION_TOO_LONG = "caption_too_long"
    TOO_MANY_OBJECTS = "too_many_objects"
    # objects and boxes
    BOX_OUTSIDE_IMAGE = "box_outside_image"
    BOX_EMPTY = "box_empty"
    BOX_MALFORMED = "box_malformed"
    BOX_FORMAT_UNKNOWN = "box_format_unknown"
    OBJECT_LABEL_MISSING = "object_label_missing"
    DUPLICATE_OBJECT_ID = "duplicate_object_id"
    # evaluation benchmarks: stored as `contaminated:<benchmark>` (see `detailed`)
    CONTAMINATED = "contaminated"


class Rejected(ValueError):
    """One rejected item: a registered reason (a member of a stage's enum below, or a request
    outcome) and a human-readable detail. Raised where checking stops at the first problem,
    or returned as a value where a check reports many (`item_ref` names the item then)."""

    def __init__(self, reason: StrEnum | str, detail: str, item_ref: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.item_ref = item_ref

    @classmethod
    def at(cls, item_ref: str, reason: StrEnum | str, detail: str) -> Rejected:
        """A rejection of the item `item_ref` (a key, a manifest line, an annotation)."""
        return cls(reason, detail, item_ref)


# Reasons after which the key is left out without a rejection row: not an image of ours.
SKIPPED: frozenset[IngestReason] = frozenset(
    {IngestReason.FOLDER_MARKER, IngestReason.HIDDEN_KEY, IngestReason.LINKED_DIRECTORY}
)

# Reasons stored with a detail after a colon, `reason:detail` (e.g. `contaminated:mmstar`):
# the README documents them as `reason:<detail>`; group or filter on the part before ':'.
PARAMETERIZED: frozenset[str] = frozenset({IngestReason.CONTAMINATED})


def detailed(reason: StrEnum, detail: str) -> str:
    """The stored form of a parameterized reason: `reason:detail`."""
    if reason not in PARAMETERIZED:
        raise ValueError(f"reason {reason!r} takes no detail")
    if not detail or ":" in detail:
        raise ValueError(f"bad detail {detail!r} for reason {reason!r}")
    return f"{reason}:{detail}"


def base(reason: str) -> str:
    """The registered reason of a stored one (`contaminated:mmstar` -> `contaminated`)."""
    return reason.split(":", 1)[0]


# stage name (as in the README's reason table) -> its reasons
REGISTRY: dict[str, type[StrEnum]] = {"ingest": IngestReason}
