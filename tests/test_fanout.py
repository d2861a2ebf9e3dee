"""Fan-out widths stay within Airflow's max_map_length, up to a 10M-image first run."""

from __future__ import annotations

import pytest

from lgt_ops.fanout import DEFAULT_MAX_MAP_LENGTH, fan_out
from lgt_ops.pipeline import image_shard_count
from lgt_ops.stages import ingest
from tests.conftest import make_settings
from tests.samples import upload_sample

TEN_MILLION = 10_000_000


@pytest.mark.parametrize("items", [1, 199, 200, 201, 204_800, 204_801, 1_000_000, TEN_MILLION])
def test_ingest_fan_out_is_capped_and_covers_every_item(items):
    plan = fan_out(items, 200, DEFAULT_MAX_MAP_LENGTH)
    assert 1 <= plan.shards <= DEFAULT_MAX_MAP_LENGTH
    assert plan.shards * plan.shard_size >= items  # every key lands in a shard file
    assert (plan.shards - 1) * plan.shard_size < items  # and no shard file is empty
    assert plan.shard_size >= 200


def test_ten_million_new_images_map_within_the_limit():
    plan = fan_out(TEN_MILLION, 200, DEFAULT_MAX_MAP_LENGTH)
    assert plan.shard_size == 9766  # ceil(10M / 1024) keys per ingest shard file
    assert plan.shards == 1024  # ceil(10M / 9766): exactly at the limit, not over
    settings = make_settings("sqlite://", "file:///tmp/unused")
    assert image_shard_count(TEN_MILLION, settings) == settings.max_shards == 512
    small_cap = settings.model_copy(update={"max_map_length": 300})
    assert image_shard_count(TEN_MILLION, small_cap) == 300
    assert image_shard_count(0, settings) == 1  # the shard stages always get one shard
    assert image_shard_count(1_000, settings) == 5  # small corpora keep 200 per shard


def test_no_items_means_no_ingest_shards_and_bad_limits_are_refused():
    assert fan_out(0, 200, 1024).shards == 0
    with pytest.raises(ValueError, match="cap"):
        fan_out(10, 200, 0)


def test_scan_writes_at_most_max_map_length_shard_files(pg_s3_env):
    env = pg_s3_env.with_settings(
        pg_s3_env.settings.model_copy(update={"max_map_length": 3, "shard_size": 2})
    )
    upload_sample(env.store, "sources/sample/")  # 10 images
    result = ingest.scan(env, "sources/sample/")
    assert result.pending == 10
    assert len(result.shard_keys) == 3  # 10 keys / cap 3 -> 4 per file, not 5 files of 2
    keys = [
        line
        for shard in result.shard_keys
        for line in env.store.get(shard).decode().splitlines()
        if line
    ]
    assert len(keys) == 10


def test_the_cap_is_read_from_airflow_configuration(monkeypatch):
    from lgt_ops.airflow_adapter import max_map_length

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "77")
    assert max_map_length() == 77
    monkeypatch.delenv("AIRFLOW__CORE__MAX_MAP_LENGTH")
    assert max_map_length() == DEFAULT_MAX_MAP_LENGTH
