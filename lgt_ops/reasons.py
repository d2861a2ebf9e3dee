"""Every reason a stage can record for an item it rejects or skips, in one registry.

Each stage's reasons are `StrEnum`s here; code that rejects uses their members (they compare
equal to, and are stored as, their plain string value) in a `Rejected(reason, detail)`, and
the README's reason table is tested against `REGISTRY`, so the documentation cannot drift
from what the code can emit. A stage not listed (annotate: box reasons and request outcomes)
records reasons of other registries.
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


class ReplyReason(StrEnum):
    """A model's reply that cannot be read (the request itself succeeded)."""

    UNPARSEABLE_REPLY = "unparseable_reply"


class QuestionReason(StrEnum):
    """The rules every multiple-choice question passes (mcq, and compose's questions)."""

    EMPTY_QUESTION = "empty_question"
    WRONG_OPTION_COUNT = "wrong_option_count"
    BAD_ANSWER_LETTER = "bad_answer_letter"
    EMPTY_OPTION = "empty_option"
    DUPLICATE_OPTIONS = "duplicate_options"
    META_OPTION = "meta_option"
    MENTIONS_METADATA = "mentions_metadata"
    NO_GROUNDING = "no_grounding"
    UNKNOWN_GROUNDING = "unknown_grounding"
    ANSWERABLE_FROM_OPTIONS = "answerable_from_options"
    NEAR_DUPLICATE = "near_duplicate"
    CONTAMINATED = "contaminated"  # stored as `contaminated:<benchmark>`


class McqReason(StrEnum):
    NO_QUESTIONS = "no_questions"
    MALFORMED_QUESTION = "malformed_question"  # an entry of the reply is not an object
    MISSING_OBJECTS = "missing_objects"  # an image without object annotations: not asked


class BlindReason(StrEnum):
    ANSWERABLE_WITHOUT_IMAGE = "answerable_without_image"  # text-only LLM right too often


class ComposeReason(StrEnum):
    ANSWER_MISMATCH = "answer_mismatch"  # the marked option is not the derived answer
    NOT_COMPOSED = "not_composed"  # repeats a parent
    OPTIONS_CHANGED = "options_changed"  # the reply's options are not the ones laid out
    # chains (lgt_ops.wellposed): hop 2 must ask about the one object hop 1 resolves ...
    CHAIN_NOT_BRIDGED = "chain_not_bridged"
    NAMES_BRIDGE_ENTITY = "names_bridge_entity"  # ... and the question must not name it


class HardenReason(StrEnum):
    NOT_HARDER = "not_harder"  # composed question's pass rate not below its parents' bound


class TraceReason(StrEnum):
    """Why a rollout or an expansion could not be parsed (kept; it counts as wrong)."""

    NO_THINK_CLOSE = "no_think_close"
    NO_ANSWER = "no_answer"
    CONFLICTING_ANSWERS = "conflicting_answers"
    ANSWER_NOT_AN_OPTION = "answer_not_an_option"
    MULTIPLE_THINK_BLOCKS = "multiple_think_blocks"
    TRUNCATED = "truncated"


class FilterReason(StrEnum):
    UNPARSEABLE = "unparseable"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    LEAKS_METADATA = "leaks_metadata"
    DEGENERATE_REPETITION = "degenerate_repetition"
    WRONG_ANSWER = "wrong_answer"
    NEAR_DUPLICATE = "near_duplicate"


# stage name (as in the README's reason table) -> the enums of the reasons it records itself
# (request outcomes, lgt_ops.llm.errors.FailureClass, come on top for model stages)
REGISTRY: dict[str, tuple[type[StrEnum], ...]] = {
    "ingest": (IngestReason,),
    "mcq": (McqReason, QuestionReason, ReplyReason),
    "blind": (BlindReason,),
    "cot": (TraceReason,),
    "compose": (ComposeReason, QuestionReason, ReplyReason),
    "cot2": (TraceReason,),
    "harden": (HardenReason,),
    "expand": (TraceReason,),
    "filter": (FilterReason,),
    "tag": (ReplyReason,),
}


def codes(stage: str) -> set[str]:
    """Every reason code a registered stage can record itself."""
    return {r.value for enum in REGISTRY[stage] for r in enum}
