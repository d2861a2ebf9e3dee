"""Object storage: S3-compatible buckets (AWS, MinIO) and a local directory, one interface.

Keys are '/'-separated and relative to the store's root (`s3://bucket/root` or a directory).
Writes are atomic per object: a local write goes to a temporary file then `os.replace`; an S3
PUT is atomic by nature. `put(..., if_absent=True)` is the commit primitive for releases: it
fails with `ObjectExists` instead of overwriting (S3 conditional write `If-None-Match: *`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from lgt_ops import chaos
from lgt_ops.config import ConfigError, Settings
from lgt_ops.reasons import IngestReason


class ObjectExists(Exception):
    """A conditional write found the key already present."""


class ObjectMissing(KeyError):
    """The key does not exist in the store."""


class ObjectRefused(ValueError):
    """The key names something the store will not read (a link out of the root, a FIFO...)."""

    def __init__(self, key: str, reason: IngestReason, detail: str) -> None:
        super().__init__(f"{key}: {reason}: {detail}")
        self.key = key
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ObjectInfo:
    """A listed key. `problem` is set when the key cannot be read as an object (an S3 folder
    marker, a `//` key, a symlink loop, a FIFO...): listing reports it instead of failing."""

    key: str
    size: int
    etag: str
    problem: IngestReason | None = None
    detail: str = ""


class ObjectStore(Protocol):
    url: str
    bucket: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def get(self, key: str) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def read_prefix(self, key: str, n: int) -> bytes: ...
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


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """A real folder (a link to one is listed as a file, with a problem)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def key_problem(key: str, size: int) -> tuple[IngestReason, str] | None:
    """Why a listed key cannot be addressed as an object, or None if it can."""
    if key.endswith("/") and size == 0:
        return IngestReason.FOLDER_MARKER, "a zero-byte folder marker"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a local file name that is not UTF-8 arrives as surrogates
        return IngestReason.INVALID_KEY, f"key {key!r} is not valid UTF-8"
    try:
        _clean_key(key)
    except ValueError:
        return IngestReason.INVALID_KEY, f"key {key!r} has an empty, '.' or '..' part"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return IngestReason.INVALID_KEY, f"key {key!r} contains control characters"
    return None


def _listed(key: str, size: int, etag: str) -> ObjectInfo:
    found = key_problem(key, size)
    if found is None:
        return ObjectInfo(key=key, size=size, etag=etag)
    return ObjectInfo(key=key, size=size, etag=etag, problem=found[0], detail=found[1])


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


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
        """Files under the prefix in key order. Nothing is opened and no link is followed out
        of the root: links, loops and special files are listed with a `problem`."""
        base = self.root / prefix if prefix and prefix.endswith("/") else self.root
        if not base.is_dir() or not self._inside(os.path.realpath(base)):
            return
        yield from self._walk(str(base), prefix)

    def _walk(self, folder: str, prefix: str) -> Iterator[ObjectInfo]:
        """Depth first, each folder's names sorted with a folder as `name/`: that is the
        order of the whole keys (S3's), without holding more than one folder's names."""
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name + "/" if _is_dir(e) else e.name for e in it)
        except (FileNotFoundError, NotADirectoryError):  # removed while listing
            return
        cut = len(str(self.root)) + 1
        for name in names:
            if name.startswith(".lgt-tmp"):
                continue
            path = os.path.join(folder, name.rstrip("/"))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):  # a real folder (links to folders are not entered)
                yield from self._walk(path, prefix)
                continue
            key = path[cut:].replace(os.sep, "/")
            if key.startswith(prefix):
                yield self._entry_info(key, path, st)

    def _entry_info(self, key: str, path: str, st: os.stat_result) -> ObjectInfo:
        if stat.S_ISLNK(st.st_mode):
            try:
                _real, st = self._resolve(key, path)
            except ObjectRefused as exc:
                return ObjectInfo(key, 0, "", exc.reason, exc.detail)
            if stat.S_ISDIR(st.st_mode):
                detail = "a link to a folder in the store (its files are listed where they are)"
                return ObjectInfo(key, 0, "", IngestReason.LINKED_DIRECTORY, detail)
        if not stat.S_ISREG(st.st_mode):
            return ObjectInfo(key, 0, "", IngestReason.SPECIAL_FILE, _file_kind(st.st_mode))
        return _listed(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")

    def _inside(self, real: str) -> bool:
        root = os.path.realpath(self.root)
        return real == root or real.startswith(root + os.sep)

    def _resolve(self, key: str, path: str) -> tuple[str, os.stat_result]:
        """The real path (links followed, never out of the root) and its stat."""
        try:
            real = os.path.realpath(path, strict=True)
        except FileNotFoundError as exc:
            if os.path.lexists(path):
                detail = "the link's target is gone"
                raise ObjectRefused(key, IngestReason.BROKEN_LINK, detail) from exc
            raise ObjectMissing(key) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ObjectRefused(key, IngestReason.SYMLINK_LOOP, str(exc)) from exc
            raise
        if not self._inside(real):
            raise ObjectRefused(
                key, IngestReason.LINK_OUTSIDE_ROOT, "links to a path outside the store root"
            )
        return real, os.stat(real)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            _real, st = self._resolve(key, str(self._path(key)))
        except ObjectMissing:
            return None
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectRefused(key, IngestReason.SPECIAL_FILE, _file_kind(st.st_mode))
        return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}")

    def get(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def open(self, key: str) -> BinaryIO:
        """Open a regular file under the root. O_NONBLOCK keeps a FIFO swapped in after the
        check from hanging the open; fstat then refuses anything that is not a regular file."""
        real, _st = self._resolve(key, str(self._path(key)))
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc
        except IsADirectoryError as exc:
            raise ObjectMissing(key) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the final part became a link after the check
                raise ObjectRefused(key, IngestReason.SYMLINK_LOOP, str(exc)) from exc
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise ObjectMissing(key)
            raise ObjectRefused(key, IngestReason.SPECIAL_FILE, _file_kind(mode))
        return os.fdopen(fd, "rb")

    def read_prefix(self, key: str, n: int) -> bytes:
        """The first `n` bytes (all of them if the object is shorter)."""
        with self.open(key) as fh:
            return fh.read(n)

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
        """A hard link where the filesystem allows, else a byte copy. Sharing the inode is
        safe: objects are only ever replaced (a new file renamed in), never edited in place."""
        src, dst = self._path(src_key), self._path(dst_key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lgt-tmp", dir=dst.parent)
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not supported
            self.put_file(dst_key, src)
        else:
            os.replace(tmp, dst)
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
        try:
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
        except ValueError as exc:  # botocore: "Invalid endpoint: ..." (a setting, not an outage)
            raise ConfigError(
                f"object store endpoint {endpoint_url!r} is not usable ({exc}): set"
                " LGT_S3_ENDPOINT_URL (or the lgt_s3 connection's endpoint_url) to an http(s) URL"
            ) from exc

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
                yield _listed(self._rel(obj["Key"]), obj["Size"], obj["ETag"].strip('"'))

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

    def read_prefix(self, key: str, n: int) -> bytes:
        """The first `n` bytes (all of them if the object is shorter): one ranged GET."""
        from botocore.exceptions import ClientError

        try:
            r = self._client.get_object(
                Bucket=self.bucket, Key=self._full(key), Range=f"bytes=0-{n - 1}"
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(key) from exc
            if code in ("InvalidRange", "416"):  # an empty object
                return b""
            raise
        with r["Body"] as body:
            return body.read()

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
