"""Portable releases: a release carries its images, so a copy of it trains anywhere.

Two pipelines on the sample, each with its own store and lineage DB in its own folder, publish
`method/v1`: the same content hash (nothing in a release depends on where the store lives).
One release is copied elsewhere and its store deleted; every config of its card then loads
with Hugging Face `datasets` and every image decodes to the bytes its `image_id` names. Two
releases with the same name and version but different rows, loaded through one `datasets`
cache (even from the same folder, one after the other), each give their own rows.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import datasets
import yaml
from PIL import Image

from lgt_ops.release.manage import verify
from lgt_ops.runctx import new_cli_run
from lgt_ops.stages.base import StageEnv
from tests.conftest import make_settings
from tests.release_checks import run_pipeline
from tests.samples import upload_sample

IMAGE_COLUMNS = ("image", "images")


def _env(root: Path, sim) -> StageEnv:  # noqa: ANN001
    settings = make_settings(f"sqlite:///{root / 'lineage.db'}", (root / "store").as_uri(), sim)
    env = StageEnv.open(settings, new_cli_run("test"))
    env.show_progress = False
    env.store.ensure_bucket()
    return env


def _publish(root: Path, sim, **params) -> tuple[StageEnv, object]:  # noqa: ANN001
    env = _env(root, sim)
    upload_sample(env.store, "sources/sample/")
    release = run_pipeline(env, release_version="v1", k_rollouts=2, **params).release
    return env, release


def _configs(release_dir: Path) -> dict[str, list[str]]:
    card = (release_dir / "README.md").read_text()
    configs = yaml.safe_load(card.split("---")[1])["configs"]
    return {c["config_name"]: c["data_files"][0]["path"] for c in configs}


def _load(release_dir: Path, config: list[str], cache: Path) -> datasets.Dataset:
    files = [str(release_dir / glob) for glob in config]
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))


def _check_images(ds: datasets.Dataset) -> int:
    """Decode every image of every row; each is the image its row's `image_id` names."""
    column = next(c for c in IMAGE_COLUMNS if c in ds.column_names)
    decoded = 0
    for row in ds:
        values = row[column] if column == "images" else [row[column]]
        assert values, row["row_id"]
        for im in values:
            assert isinstance(im, Image.Image)
            im.load()
            assert im.size[0] > 0 and im.size[1] > 0
            decoded += 1
    undecoded = datasets.Image(decode=False)
    raw = ds.cast_column(column, datasets.List(undecoded) if column == "images" else undecoded)
    for row in raw:
        values = row[column] if column == "images" else [row[column]]
        for v in values:  # the embedded bytes are the image itself; the path names only it
            assert hashlib.sha256(v["bytes"]).hexdigest() == row["image_id"]
            assert "/" not in v["path"] and v["path"].startswith(row["image_id"])
    return decoded


def test_a_copied_release_loads_without_its_store(tmp_path, sim):
    env_a, rel_a = _publish(tmp_path / "a", sim.base_url)
    env_b, rel_b = _publish(tmp_path / "elsewhere" / "b", sim.base_url)
    assert rel_a.content_sha256 == rel_b.content_sha256  # the store's place is not content
    assert rel_a.manifest["method"]["embed_images"] is True

    assert verify(env_a, "method/v1").ok  # every listed file re-hashed, embedded images too

    copy = tmp_path / "downloaded" / "method-v1"
    shutil.copytree(env_a.store.local_path("releases/method/v1"), copy)
    for env in (env_a, env_b):
        env.db.dispose()
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "elsewhere")

    configs = _configs(copy)
    assert set(configs) >= {"questions", "sft_stage1", "dpo_stage1", "rl"}
    decoded = 0
    for name, globs in configs.items():
        ds = _load(copy, globs, tmp_path / "cache")
        expect = sum(rel_a.counts[s] for s in _splits(name))
        assert len(ds) == expect, name
        if len(ds):
            decoded += _check_images(ds)
    assert decoded >= rel_a.counts["questions"]


def _splits(config: str) -> list[str]:
    return ["sft_stage1", "sft_stage2"] if config == "sft_stage2_merged" else [config]


def test_releases_with_the_same_version_do_not_share_a_cache_entry(tmp_path, sim):
    env_a, rel_a = _publish(tmp_path / "a", sim.base_url)
    env_b, rel_b = _publish(tmp_path / "b", sim.base_url, sample_size=6)  # fewer images
    assert rel_a.release_id == rel_b.release_id == "method/v1"
    assert rel_a.content_sha256 != rel_b.content_sha256
    cache = tmp_path / "cache"
    src = {
        "a": env_a.store.local_path("releases/method/v1"),
        "b": env_b.store.local_path("releases/method/v1"),
    }
    want = {}
    for key, folder in src.items():
        ds = _load(folder, _configs(folder)["questions"], cache)
        want[key] = sorted(ds["row_id"])
    assert want["a"] != want["b"]
    assert len(want["b"]) == (rel_b.counts["questions"]) < rel_a.counts["questions"]

    # The same folder, the same name and version, one after the other (mtimes kept by copy2).
    place = tmp_path / "data" / "v1"
    for key in ("a", "b", "a"):
        if place.exists():
            shutil.rmtree(place)
        shutil.copytree(src[key], place)
        ds = _load(place, _configs(place)["questions"], cache)
        assert sorted(ds["row_id"]) == want[key], key
        by_dir = datasets.load_dataset(str(place), "questions", split="train", cache_dir=str(cache))
        assert sorted(by_dir["row_id"]) == want[key], key
