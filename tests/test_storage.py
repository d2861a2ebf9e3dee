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


def test_unaddressable_keys_are_listed_with_a_problem_not_raised(s3_url, s3_endpoint):
    """One folder marker or `//` key used to fail the whole listing's consumer."""
    import boto3

    bucket = s3_url.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for key, body in (("p/dir/", b""), ("p/a//b.jpg", b"x"), ("p/ok.jpg", b"x")):
        client.put_object(Bucket=bucket, Key=key, Body=body)
    listed = {o.key: o.problem for o in S3Store(bucket, endpoint_url=s3_endpoint).list("p/")}
    assert listed == {"p/dir/": "folder_marker", "p/a//b.jpg": "invalid_key", "p/ok.jpg": None}


@pytest.mark.timeout(60)
def test_local_reads_refuse_special_files_and_links_out_of_the_root(tmp_path):
    import os

    from lgt_ops.storage import ObjectRefused

    s = LocalStore(tmp_path / "bucket")
    s.put("in/real.txt", b"inside")
    (tmp_path / "outside.txt").write_bytes(b"secret")
    os.mkfifo(s.root / "in" / "pipe.png")
    os.symlink(tmp_path / "outside.txt", s.root / "in" / "out.txt")
    os.symlink("real.txt", s.root / "in" / "link.txt")
    os.symlink("loop", s.root / "in" / "loop")
    listed = {o.key: o.problem for o in s.list("in/")}
    assert listed == {
        "in/link.txt": None,
        "in/loop": "symlink_loop",
        "in/out.txt": "link_outside_root",
        "in/pipe.png": "special_file",
        "in/real.txt": None,
    }
    assert s.get("in/link.txt") == b"inside"  # a link inside the root is followed
    for key, reason in (
        ("in/pipe.png", "special_file"),  # refused without blocking on the FIFO
        ("in/out.txt", "link_outside_root"),
        ("in/loop", "symlink_loop"),
    ):
        with pytest.raises(ObjectRefused) as exc:
            s.get(key)
        assert exc.value.reason == reason
    with pytest.raises(ObjectMissing):
        s.get("in/none.txt")


def test_read_prefix(store):
    store.put("r/long", b"0123456789")
    store.put("r/empty", b"")
    assert store.read_prefix("r/long", 4) == b"0123"
    assert store.read_prefix("r/long", 100) == b"0123456789"
    assert store.read_prefix("r/empty", 4) == b""
    with pytest.raises(ObjectMissing):
        store.read_prefix("r/none", 4)
