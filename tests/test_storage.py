"""Object stores: the local directory and a real S3 API over HTTP behave the same."""

from __future__ import annotations

import pytest

from lgt_ops.storage import LocalStore, ObjectExists, ObjectMissing, S3Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_url, s3_endpoint):
    if request.param == "local":
        s = LocalStore(tmp_path / "bucket")
    else:
        s = S3Store(s3_url.removeprefix("s3://"), "root/prefix", endpoint_url=s3_endpoint)
    s.ensure_bucket()
    return s


def test_put_get_head_delete(store):
    store.put("a/b.txt", b"hello")
    assert store.get("a/b.txt") == b"hello"
    info = store.head("a/b.txt")
    assert info is not None and info.size == 5 and info.etag
    with store.open("a/b.txt") as fh:
        assert fh.read(2) == b"he"  # streaming read
    store.delete("a/b.txt")
    assert store.head("a/b.txt") is None
    with pytest.raises(ObjectMissing):
        store.get("a/b.txt")


def test_conditional_put_never_overwrites(store):
    store.put("m.json", b"1", if_absent=True)
    with pytest.raises(ObjectExists):
        store.put("m.json", b"2", if_absent=True)
    assert store.get("m.json") == b"1"
    store.put("m.json", b"3")  # unconditional writes still replace
    assert store.get("m.json") == b"3"


def test_etag_changes_when_content_changes(store):
    store.put("x.bin", b"one")
    first = store.head("x.bin").etag
    store.put("x.bin", b"other content")
    assert store.head("x.bin").etag != first


def test_list_is_sorted_prefix_scoped_and_paginates(store):
    keys = [f"p/{i:04d}.txt" for i in range(230)] + ["q/other.txt", "pq.txt"]
    for k in reversed(keys):
        store.put(k, b"x")
    if isinstance(store, S3Store):
        store.page_size = 50  # 230 keys -> 5 ListObjectsV2 pages
    listed = [o.key for o in store.list("p/")]
    assert listed == sorted(k for k in keys if k.startswith("p/"))
    assert len(listed) == 230


def test_copy_and_uri(store):
    store.put("src/f", b"data")
    store.copy("src/f", "dst/f")
    assert store.get("dst/f") == b"data"
    assert store.uri("dst/f").endswith("dst/f")


def test_invalid_keys_are_refused(store):
    for bad in ("", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")


def test_open_store_by_url(tmp_path):
    assert isinstance(open_store((tmp_path / "d").as_uri()), LocalStore)
    with pytest.raises(ValueError):
        open_store("ftp://nowhere/x")
