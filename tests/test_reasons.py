"""The README's reason table is the registry's: no reason undocumented, none invented."""

from __future__ import annotations

import re
from pathlib import Path

from lgt_ops.reasons import PARAMETERIZED, REGISTRY, IngestReason, codes

ROOT = Path(__file__).resolve().parents[1]
_TABLE = "| Stage | Rejection reasons it records |"
# a quoted code, but not a substring test such as `"truncated" in message`
LITERAL = r"[\"']([a-z][a-z0-9_]*)[\"'](?!\s+in\b)"


def readme_reasons() -> dict[str, set[str]]:
    """stage -> the backticked reason codes in its row of README's reason table."""
    text = (ROOT / "README.md").read_text()
    lines = text[text.index(_TABLE) :].splitlines()[2:]
    out: dict[str, set[str]] = {}
    for line in lines:
        if not line.startswith("|"):
            break
        stage, reasons = (c.strip() for c in line.strip().strip("|").split("|"))
        # a parameterized reason is documented as `reason:<detail>`; its code is `reason`
        codes = set(re.findall(r"`([a-z][a-z0-9_]*)(?::<[a-z_]+>)?`", reasons))
        for name in stage.split(","):
            out[name.strip()] = codes
    return out


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in (ROOT / "lgt_ops").rglob("*.py")}


def test_registered_stages_document_exactly_their_reasons():
    table = readme_reasons()
    for stage in REGISTRY:
        assert table[stage] == codes(stage), stage


def test_every_registered_reason_is_emitted_somewhere():
    code = "\n".join(t for p, t in _sources().items() if p.name != "reasons.py")
    unused = [
        f"{enum.__name__}.{r.name}"
        for enums in REGISTRY.values()
        for enum in enums
        for r in enum
        if not re.search(rf"\.{r.name}\b", code) and f'"{r.value}"' not in code
    ]
    assert not unused, f"registered but never emitted: {unused}"


def test_parameterized_reasons_are_documented_with_their_detail():
    text = (ROOT / "README.md").read_text()
    for reason in PARAMETERIZED:
        assert re.search(rf"`{reason}:<[a-z_]+>`", text), reason
        assert f"`{reason}`" not in text, f"{reason} documented without its detail"


def test_every_ingest_reason_is_emitted_somewhere():
    code = "\n".join(t for p, t in _sources().items() if p.name != "reasons.py")
    unused = [
        r.name for r in IngestReason if not re.search(rf"\b(R|IngestReason)\.{r.name}\b", code)
    ]
    assert not unused, f"registered but never emitted: {unused}"


def test_ingest_code_uses_the_registry_not_literals():
    values = {r.value for r in IngestReason}
    modules = (
        "stages/ingest.py",
        "stages/scan.py",
        "manifest.py",
        "images.py",
        "boxes.py",
        "storage.py",
    )
    for name in modules:
        text = (ROOT / "lgt_ops" / name).read_text()
        literals = set(re.findall(LITERAL, text)) & values
        assert not literals, f"{name} spells reasons as strings: {literals}"


def test_unregistered_stages_document_only_reasons_the_code_spells():
    """Until their reasons move into the registry, each documented code at least exists."""
    code = "\n".join(_sources().values())
    for stage, reasons in readme_reasons().items():
        if stage in REGISTRY:
            continue
        missing = {r for r in reasons if f'"{r}"' not in code and f"'{r}'" not in code}
        assert not missing, f"{stage}: {missing} in README but nowhere in the code"
