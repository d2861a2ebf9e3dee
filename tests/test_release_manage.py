"""Operating releases: list, verify (tampering is caught), diff, and the report plots."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from lgt_ops.cli import main
from lgt_ops.release import report
from lgt_ops.release.errors import ReleaseError
from lgt_ops.release.manage import diff, list_releases, load_manifest, verify
from lgt_ops.runctx import RunContext
from tests.release_checks import run_pipeline
from tests.samples import new_photos, upload_sample


@pytest.fixture
def two_releases(local_env):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    run_pipeline(env, release_version="v1", k_rollouts=2)
    new_photos(env.store, "sources/sample/images/")
    run_pipeline(env.with_run(RunContext("second")), release_version="v2", k_rollouts=2)
    return env


def test_list_shows_newest_first_and_the_latest_pointer(two_releases):
    rows = list_releases(two_releases, "method")
    assert [r["release_id"] for r in rows] == ["method/v2", "method/v1"]
    assert [r["latest"] for r in rows] == [True, False]
    assert rows[0]["counts"]["questions"] > rows[1]["counts"]["questions"]
    latest = json.loads(two_releases.store.get("releases/method/latest.json"))
    assert latest["release_id"] == "method/v2"


def test_verify_passes_untouched_and_catches_every_kind_of_tampering(
    two_releases, capsys, monkeypatch
):
    env = two_releases
    clean = verify(env, "method/v1")
    manifest = json.loads(env.store.get("releases/method/v1/manifest.json"))
    n_parts = sum(len(s["files"]) for s in manifest["splits"].values())
    # parts, report plots, the bucket index, the card
    assert clean.ok and clean.files_checked == n_parts + 4 + 1 + 1
    part = manifest["splits"]["sft_stage1"]["files"][0]["path"]
    key = f"releases/method/v1/{part}"
    data = bytearray(env.store.get(key))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    env.store.put(key, bytes(data))
    env.store.delete("releases/method/v1/report/skills.png")
    env.store.put("releases/method/v1/README.md", b"# edited card\n")
    problems = verify(env, "method/v1").problems
    assert sorted(problems) == sorted([
        f"{part}: sha256 differs from the manifest",
        "releases/method/v1/report/skills.png: missing",
        "README.md: sha256 differs from the manifest",
    ])
    monkeypatch.setenv("LGT_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("LGT_STORE_URL", env.settings.store_url)
    assert main(["release", "verify", "method/v2"]) == 0
    assert main(["release", "verify", "method/v1"]) == 1  # the CLI exits non-zero
    out = capsys.readouterr().out
    v2 = verify(env, "method/v2").files_checked
    assert f"method/v2: {v2} file(s) checked against the manifest: ok" in out
    assert "FAIL README.md: sha256 differs from the manifest" in out
    # A rewritten manifest (hashes "fixed" to match) no longer matches the publish record.
    manifest["splits"]["sft_stage1"]["files"][0]["sha256"] = "0" * 64
    env.store.put("releases/method/v1/manifest.json", json.dumps(manifest).encode())
    assert any("recorded at publish" in p for p in verify(env, "method/v1").problems)


def test_diff_names_exactly_the_rows_of_the_new_images(two_releases):
    env = two_releases
    d = diff(env, "method/v1", "method/v2")
    assert all(not ids for ids in d.removed.values())
    assert d.added["questions"] and d.added["sft_stage1"]
    for split, (a, b) in d.rows.items():
        assert b - a == len(d.added[split]), split
    stage1 = d.mix["stage"]["1"]
    assert stage1[1] > stage1[0]
    with pytest.raises(ReleaseError, match="not published"):
        diff(env, "method/v1", "method/nope")


def test_report_plots_compare_with_the_previous_release(two_releases):
    env = two_releases
    manifest = json.loads(env.store.get("releases/method/v2/manifest.json"))
    assert [f["path"] for f in manifest["report"]] == [
        "report/behaviours.png", "report/difficulty.png", "report/skills.png",
        "report/trace_length.png"]
    for f in manifest["report"]:
        with Image.open(io.BytesIO(env.store.get(f"releases/method/v2/{f['path']}"))) as im:
            assert im.format == "PNG" and im.size == (700, 360)
    parent = json.loads(env.store.get("releases/method/v1/manifest.json"))
    now, before = report.series(manifest), report.series(parent)
    assert sum(now["skills"].values()) > sum(before["skills"].values())
    assert sum(now["trace_length"].values()) == manifest["counts"]["splits"]["sft_stage1"][
        "rows"] + manifest["counts"]["splits"]["sft_stage2"]["rows"]
    assert 0 < now["behaviours"]["verification"] <= 1


@pytest.mark.parametrize("store", ["local_env", "pg_s3_env"])
def test_verify_reports_every_file_the_manifest_does_not_list(store, request, capsys, monkeypatch):
    """A dropped-in part would be read by the card's loading glob: verify must fail on it."""
    from lgt_ops.release.publish import publish
    from tests.test_release import _stage1

    env = request.getfixturevalue(store)
    spec = _stage1(env)
    publish(env, spec, name="t", version="v1", allow_simulated=True)
    prefix = "releases/t/v1"
    assert verify(env, "t/v1").ok
    first = load_manifest(env, "t/v1")["splits"]["questions"]["files"][0]["path"]
    part = env.store.get(f"{prefix}/{first}")
    env.store.put(f"{prefix}/dpo/stage1/part-99999.parquet", part)  # a valid Parquet file
    env.store.put(f"{prefix}/report/extra.png", b"not listed")
    env.store.put(f"{prefix}/notes.txt", b"hello")
    env.store.put(f"{prefix}/dpo/stage1/.hidden.parquet", part)  # hidden files count too
    env.store.put(f"{prefix}/new/deep/blob", b"no extension, a folder of its own")
    env.store.put("releases/t/v10/stray.parquet", b"x")  # another version's prefix: not ours
    assert sorted(verify(env, "t/v1").problems) == [
        "dpo/stage1/.hidden.parquet: not listed in the manifest",
        "dpo/stage1/part-99999.parquet: not listed in the manifest",
        "new/deep/blob: not listed in the manifest",
        "notes.txt: not listed in the manifest",
        "report/extra.png: not listed in the manifest",
    ]
    monkeypatch.setenv("LGT_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("LGT_STORE_URL", env.settings.store_url)
    if env.settings.s3_endpoint_url:
        monkeypatch.setenv("LGT_S3_ENDPOINT_URL", env.settings.s3_endpoint_url)
    assert main(["release", "verify", "t/v1"]) == 1
    assert (
        "FAIL dpo/stage1/part-99999.parquet: not listed in the manifest" in capsys.readouterr().out
    )
