"""The dataset card (README.md with a Hugging Face YAML header), rendered from the manifest."""

from __future__ import annotations

import fnmatch
import json
from typing import Any

from lgt_ops.goodput import card_section
from lgt_ops.release.quality import unjudged
from lgt_ops.traces import BEHAVIOURS

_SIMULATED = (
    "> **SIMULATED DATA — NOT MODEL OUTPUT.** Every model reply behind this release came from "
    "the LGT-ETL simulator, a test double. Use it to test pipelines and loaders only; never to "
    "train or evaluate a model.\n"
)


def _yaml_list(items: list[str], indent: int) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}- {json.dumps(i)}" for i in items)


def config_files(manifest: dict[str, Any], globs: list[str]) -> list[str]:
    """A config's part files by name, not by glob: the names carry the parts' hashes, so
    `datasets`, which keys its cache on a folder's config and file names, can never serve one
    release's rows for another's with the same name and version in the same folder."""
    paths = [f["path"] for s in manifest["splits"].values() for f in s["files"]]
    return sorted(p for p in paths if any(fnmatch.fnmatchcase(p, g) for g in globs))


def render(manifest: dict[str, Any]) -> str:
    counts = manifest.get("counts", {})
    lines = [_header(manifest), "", f"# {manifest['name']} {manifest['version']}", ""]
    if manifest.get("simulated"):
        lines += [_SIMULATED]
    lines += _splits(manifest)
    lines += _provenance(manifest)
    lines += quality_section(manifest.get("quality"))
    lines += _method_sections(counts.get("splits", {}))
    lines += card_section(manifest)
    lines += _decontamination(counts.get("rejections", {}))
    lines += question_checks(manifest)
    lines += _rejections(counts.get("rejections", {}))
    return "\n".join(lines)


def _header(manifest: dict[str, Any]) -> str:
    """The Hugging Face YAML header: tags and one config per split glob set."""
    header = [
        "---",
        "license: other",
        "task_categories:",
        "- visual-question-answering",
        "- image-text-to-text",
        "tags:",
        "- reasoning",
        "- chain-of-thought",
        "- multiple-choice",
        "- lgt-etl",
    ]
    if manifest.get("simulated"):
        header.append("- simulated")
    header.append("configs:")
    for i, (name, globs) in enumerate(sorted(manifest["configs"].items())):
        header.append(f"- config_name: {name}")
        if i == 0:
            header.append("  default: true")
        header.append("  data_files:")
        header.append("  - split: train")
        header.append("    path:")
        header.append(_yaml_list(config_files(manifest, globs), 4))
    header.append("---")
    return "\n".join(header)


def _splits(manifest: dict[str, Any]) -> list[str]:
    lines = [
        "Grounded multiple-choice questions and long reasoning traces about images, built by "
        'LGT-ETL following "Long Grounded Thoughts" (Acuna et al., 2025).',
        "",
        "## Splits",
        "",
        "| config | rows | files |",
        "|---|---:|---:|",
    ]
    for name, split in sorted(manifest["splits"].items()):
        lines.append(f"| {name} | {split['rows']} | {len(split['files'])} |")
    return lines


def _provenance(manifest: dict[str, Any]) -> list[str]:
    counts = manifest.get("counts", {})
    return [
        "",
        "## Provenance",
        "",
        f"- release id: `{manifest['release_id']}`; parent: `{manifest.get('parent_release')}`",
        f"- content sha256: `{manifest['content_sha256']}`",
        f"- images: {counts.get('images', 0)} from `{manifest['source']['store']}`"
        f" prefix `{manifest['source']['prefix']}`",
        f"- pipeline run: `{manifest['run_id']}`",
        "- models requested: "
        + ", ".join(f"{r}=`{m}`" for r, m in manifest["models"]["requested"].items()),
        "- models that answered: "
        + (", ".join(f"`{m}`" for m in manifest["models"]["served"]) or "none"),
        "- stage fingerprints: "
        + ", ".join(f"{s}=`{f}`" for s, f in sorted(manifest["fingerprints"].items())),
        "",
        "Every row carries ids (question_id, image_id, request keys) that resolve in the "
        "LGT-ETL lineage database; see the project's sql/queries/.",
        "",
    ]


def _value(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric.endswith("_deviation") else str(int(value))


def quality_section(quality: dict[str, Any] | None) -> list[str]:
    """The release validator's figures (lgt_ops/release/quality.py), as measured at publish."""
    if not quality:
        return []
    figures = quality["figures"]
    failed = [f for f in figures if not f["passed"]]
    verdict = (
        f"All {len(figures)} checks passed."
        if not failed
        else f"**{len(failed)} of {len(figures)} checks FAILED.**"
    )
    lines = [
        "## Quality",
        "",
        f"{verdict} Counts must be 0; a deviation is the largest gap between a share of the "
        "correct letter (or of the correct value's rank among numeric options) and uniform "
        "(for a count, uniform over the ranks it can take; `value_rank_raw_deviation`, shown "
        "and not judged, is the gap to 1/k).",
        "",
        "| check | scope | value | max | n | result |",
        "|---|---|---:|---:|---:|---|",
    ]
    for f in figures:
        result = "ok" if f["passed"] else "FAIL: " + str(f["detail"]).replace("|", "\\|")
        limit = _value(f["metric"], f["max_allowed"])
        if unjudged(f["metric"], f["max_allowed"]):
            limit, result = "-", "shown, not judged"
        lines.append(
            f"| {f['metric']} | {f['scope']} | {_value(f['metric'], f['value'])} |"
            f" {limit} | {f['n']} | {result} |"
        )
    return [*lines, ""]


def _rejections(rejections: dict[str, dict[str, int]]) -> list[str]:
    lines = ["## Rejected items by reason", ""]
    if not rejections:
        lines.append("None.")
    for stage, reasons in sorted(rejections.items()):
        detail = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
        lines.append(f"- {stage}: {detail}")
    lines.append("")
    return lines


def _cue_table(sft: dict[str, dict[str, int]]) -> list[str]:
    """Behaviour shares per reflection cue, over all SFT configs; the injected cue itself is
    not counted ("Wait," is not backtracking by itself)."""
    rows: dict[str, int] = {}
    with_b: dict[tuple[str, str], int] = {}
    for c in sft.values():
        for key, n in c.items():
            if not key.startswith("cue:"):
                continue
            cue, _, b = key[4:].partition(":with_")
            if b:
                with_b[cue, b] = with_b.get((cue, b), 0) + n
            else:
                rows[cue] = rows.get(cue, 0) + n
    if not rows:
        return []
    lines = [
        "Per reflection cue (the cue itself not counted):",
        "",
        "| cue | traces | " + " | ".join(BEHAVIOURS) + " |",
        "|---|---:|" + "---:|" * len(BEHAVIOURS),
    ]
    for cue, n in sorted(rows.items()):
        shares = " | ".join(f"{with_b.get((cue, b), 0) / n:.0%}" for b in BEHAVIOURS)
        lines.append(f"| `{cue}` | {n} | {shares} |")
    return [*lines, ""]


def _method_sections(splits: dict[str, dict[str, int]]) -> list[str]:
    """Difficulty histogram, DPO pair rules and behaviour frequencies, when present."""
    lines: list[str] = []
    questions = splits.get("questions", {})
    buckets = {k.split(":", 1)[1]: v for k, v in questions.items() if k.startswith("difficulty:")}
    if buckets:
        lines += ["## Difficulty (VLM pass rate)", "", "| bucket | questions |", "|---|---:|"]
        lines += [f"| {b} | {n} |" for b, n in sorted(buckets.items())] + [""]
    sft = {k: v for k, v in sorted(splits.items()) if k.startswith("sft_") and v.get("rows")}
    if sft:
        lines += [
            "## Cognitive behaviours (share of SFT traces showing each)",
            "",
            "| config | traces | mean chars | " + " | ".join(BEHAVIOURS) + " |",
            "|---|---:|---:|" + "---:|" * len(BEHAVIOURS),
        ]
        for name, c in sft.items():
            shares = " | ".join(f"{c.get(f'with_{b}', 0) / c['rows']:.0%}" for b in BEHAVIOURS)
            lines.append(f"| {name} | {c['rows']} | {c.get('chars', 0) // c['rows']} | {shares} |")
        lines.append("")
        lines += _cue_table(sft)
    dpo = {k: v for k, v in sorted(splits.items()) if k.startswith("dpo_")}
    if any(dpo.values()):
        lines += ["## Preference pairs by rule", ""]
        for name, rules in dpo.items():
            detail = ", ".join(f"`{r}`: {n}" for r, n in sorted(rules.items())) or "none"
            lines.append(f"- {name}: {detail}")
        lines.append("")
    return lines


def _decontamination(rejections: dict[str, dict[str, int]]) -> list[str]:
    """Hits per evaluation benchmark: `contaminated:<benchmark>` rejections by stage."""
    hits: dict[str, dict[str, int]] = {}
    for stage, reasons in rejections.items():
        for reason, n in reasons.items():
            if reason.startswith("contaminated:"):
                per = hits.setdefault(reason.split(":", 1)[1], {})
                kind = "images" if stage == "ingest" else "questions"
                per[kind] = per.get(kind, 0) + n
    lines = ["## Decontamination", ""]
    if not hits:
        return lines + ["No image or question matched an evaluation benchmark.", ""]
    lines += [
        "Rejected before any model call as copies of evaluation benchmarks "
        "(images by perceptual hash, questions by n-gram overlap):",
        "",
        "| benchmark | images | questions |",
        "|---|---:|---:|",
    ]
    for name, per in sorted(hits.items()):
        lines.append(f"| {name} | {per.get('images', 0)} | {per.get('questions', 0)} |")
    return lines + [""]


# (stage, reason, questions-split stat of the questions that passed, what the check asks)
_CHECKS = (
    ("blind", "answerable_without_image", "stage1", "answerable without the image"),
    ("harden", "not_harder", "stage2", "composed, not harder than its parents"),
)


def question_checks(manifest: dict[str, Any]) -> list[str]:
    """Questions each check removed: the blind check (a text-only LLM answers from the text
    and options alone) and the hardness rule of composed questions (when they ran)."""
    counts = manifest.get("counts", {})
    rejections = counts.get("rejections", {})
    questions = counts.get("splits", {}).get("questions", {})
    rows = []
    for stage, reason, passed, what in _CHECKS:
        removed = rejections.get(stage, {}).get(reason, 0)
        checked = removed + questions.get(passed, 0)
        if stage in manifest.get("fingerprints", {}):
            share = f"{removed / checked:.1%}" if checked else "-"
            rows.append(f"| {what} (`{reason}`) | {checked} | {removed} | {share} |")
    if not rows:
        return []
    head = ["## Question checks", "", "| check | checked | rejected | rate |"]
    return [*head, "|---|---:|---:|---:|", *rows, ""]
