"""Object storage: S3-compatible buckets (AWS, MinIO) and a local directory, one interface.

Keys are '/'-separated and relative to the store's root (`s3://bucket/root` or a directory).
Writes are atomic per object: a local write goes to a temporary file then `os.replace`; an S3
PUT is atomic by nature. `put(..., if_absent=True)` is the commit primitive for releases: it
fails with `ObjectExists` instead of overwriting (S3 conditional write `If-None-Match: *`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from lgt_ops import chaos
from lgt_ops.config import ConfigError, Settings


class ObjectExists(Exception):
    """A conditional write found the key already present."""


class ObjectMissing(KeyError):
    """The key does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    url: str
    bucket: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def get(self, key: str) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def copy(self, src_key: str, dst_key: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...
    def ensure_bucket(self) -> None: ...


def _clean_key(key: str) -> str:
    key = key.lstrip("/")
    if not key or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """A directory standing in for a bucket (embedded runs and the demo).

    ETags are `size-mtime_ns`: cheap to list, and they change whenever the file is rewritten.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.url = self.root.as_uri()
        self.bucket = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / prefix if prefix and prefix.endswith("/") else self.root
        if not base.exists():
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".lgt-tmp")]
            for name in filenames:
                if name.startswith(".lgt-tmp"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        for key in sorted(found):  # S3 lists in key order; so do we
            info = self.head(key)
            if info is not None:
                yield info

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lgt-tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError as exc:
                    raise ObjectExists(key) from exc
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _written(key)

    def put_file(self, key: str, path: Path) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lgt-tmp", dir=dst.parent)
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)

    def copy(self, src_key: str, dst_key: str) -> None:
        self.put_file(dst_key, self._path(src_key))
        _written(dst_key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        return self._path(key)


class S3Store:
    """An S3 bucket (or a prefix of one) through boto3; works with AWS, MinIO and moto."""

    def __init__(
        self,
        bucket: str,
        root: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.root = root.strip("/")
        self.page_size = 1000  # ListObjectsV2 page size (S3's maximum)
        self.url = f"s3://{bucket}/{self.root}".rstrip("/")
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or "us-east-1",
            config=Config(
                retries={"max_attempts": 8, "mode": "adaptive"},
                max_pool_connections=32,
                s3={"addressing_style": "path"} if endpoint_url else {},
            ),
        )

    def _full(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.root}/{key}" if self.root else key

    def _rel(self, full: str) -> str:
        return full[len(self.root) + 1 :] if self.root else full

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._client.create_bucket(Bucket=self.bucket)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.root}/{prefix}" if self.root else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self.page_size}
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    key=self._rel(obj["Key"]), size=obj["Size"], etag=obj["ETag"].strip('"')
                )

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(key=key, size=r["ContentLength"], etag=r["ETag"].strip('"'))

    def get(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            r = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(key) from exc
            raise
        return r["Body"]

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ObjectExists(key) from exc
            raise
        _written(key)

    def put_file(self, key: str, path: Path) -> None:
        self._client.upload_file(str(path), self.bucket, self._full(key))

    def copy(self, src_key: str, dst_key: str) -> None:
        self._client.copy(
            {"Bucket": self.bucket, "Key": self._full(src_key)}, self.bucket, self._full(dst_key)
        )
        _written(dst_key)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=expires_s,
        )


def _written(key: str) -> None:
    if key.startswith("releases/"):
        chaos.point("release")  # test-only crash point while publishing (no-op otherwise)


def open_store(url: str, settings: Settings | None = None) -> ObjectStore:
    """A store for `s3://bucket[/root]` or `file:///dir` (a bare path means a directory)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"store URL {url!r} names no bucket")
        secret = settings and settings.s3_secret_key
        access = settings and settings.s3_access_key
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=settings.s3_endpoint_url if settings else None,
            access_key=access.get_secret_value() if access else None,
            secret_key=secret.get_secret_value() if secret else None,
            region=settings.s3_region if settings else None,
        )
    if parsed.scheme in ("file", ""):
        return LocalStore(Path(parsed.path if parsed.scheme else url))
    raise ConfigError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///dir")


def store_from_settings(settings: Settings) -> ObjectStore:
    return open_store(settings.store_url, settings)


def md5_etag(data: bytes) -> str:
    """The ETag S3 gives a single-part upload (used to check local copies)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
