"""Where bundle files live: a local folder (embedded default) or an S3-compatible bucket.

Blobs are content addressed (``blobs/<sha256>``), written whole before anyone can name them:
the local store writes a temporary file and renames it, S3 makes an object visible only when
its upload completed. Visibility to devices is decided by the database, never by the store.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "f").write_bytes(b"hello")
    5
    >>> s = open_store(str(d / "store")); s.put("blobs/x", d / "f")
    >>> s.size("blobs/x"), b"".join(s.read("blobs/x", 1, 3))
    (5, b'ell')
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from edgekiln.errors import EdgekilnError

CHUNK = 1 << 16
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/") or "//" in key:
        raise EdgekilnError(f"blob key '{key}' is not a safe relative name")
    return key


class BlobStore(Protocol):
    def put(self, key: str, src: Path) -> None: ...
    def list(self, prefix: str) -> Iterator[tuple[str, float]]: ...
    def size(self, key: str) -> int | None: ...
    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def delete(self, key: str) -> None: ...


class LocalStore:
    """A folder; ``put`` copies into a temporary file beside the target, fsyncs and renames."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, src: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, CHUNK * 16)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``start`` .. ``end`` (inclusive, HTTP style) of the blob."""
        with open(self._path(key), "rb") as fh:
            fh.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = fh.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modification time) of every blob under ``prefix``."""
        base = self._path(prefix)
        if base.is_dir():
            for path in base.rglob("*"):
                if path.is_file() and not path.name.startswith("."):
                    yield path.relative_to(self.root).as_posix(), path.stat().st_mtime


class S3Store:
    """``s3://bucket/prefix`` through boto3; ``endpoint_url`` points at MinIO, moto, Ceph, ..."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 client: Any = None) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; all mean "unusable"
            raise EdgekilnError(f"s3://{bucket}: bucket not reachable ({_short(exc)})") from None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, src: Path) -> None:
        self.client.upload_file(str(src), self.bucket, self._key(key))

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end}"
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for obj in page.get("Contents", ()):
                yield obj["Key"][strip:], obj["LastModified"].timestamp()


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_store(url: str, *, endpoint_url: str | None = None) -> LocalStore | S3Store:
    """A folder path (or ``file://PATH``) or ``s3://bucket[/prefix]``."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise EdgekilnError(f"--store {url}: no bucket name")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise EdgekilnError(f"--store {url}: unsupported store URL (use a folder or s3://bucket/prefix)")
    return LocalStore(url)
