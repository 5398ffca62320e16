"""The artifact store: immutable files addressed by key, behind one small interface.

``open_store(url)`` picks the backend from the URL (setting ``GRADTUNE_ARTIFACT_URL``):

* ``file:///abs/path`` (the default, ``<data_dir>/artifacts``): a local directory, for one
  machine or a shared volume;
* ``s3://bucket/prefix``: an S3-compatible bucket, for workers on other machines. The endpoint
  comes from ``GRADTUNE_S3_ENDPOINT_URL`` (empty: AWS itself), credentials and region from the
  usual AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``...) or any other source boto3 reads. boto3 is imported on first use.

Invariants every backend keeps (the tests check both):

* Content addressing: callers use the sha256 (hex) of a file's bytes as its key, so an object
  never changes once written; ``put_file`` of a key that exists is allowed and changes nothing
  visible.
* Writes are atomic: a reader sees the whole object or no object, never part of one.
* ``delete`` of a missing key is not an error.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(RuntimeError):
    """The store could not be reached or refused an operation."""


class ObjectMissing(StoreError, LookupError):
    """No object under that key."""


def check_key(key: str) -> str:
    """Keys are flat names (a sha256 in practice): no slashes, no dot-dot, nothing to escape."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key:
        raise ValueError(f"invalid artifact key {key!r}")
    return key


class ArtifactStore(Protocol):
    url: str

    def put_file(self, key: str, local_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Store the file at ``local_path`` under ``key`` (the caller keeps its file). An object
        already there is kept unless ``overwrite`` (the same key holds the same bytes: overwriting
        costs the same time whether or not it was there, which uploads use so that their timing
        says nothing about other tenants' files)."""

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Copy the object to ``local_path`` (written atomically); ``ObjectMissing`` if absent."""

    def local_path(self, key: str) -> Path | None:
        """A path on this machine to read the object from directly, when the backend has one."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...


def _atomic_copy(src: str | os.PathLike, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary name in the same folder (hard link when possible)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
    try:
        try:
            os.link(src, tmp)  # same filesystem: no copy at all
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class LocalStore:
    """Objects as files ``<root>/<key[:2]>/<key>``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        key = check_key(key)
        return self.root / key[:2] / key

    def put_file(self, key: str, local_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        dest = self._path(key)
        if dest.is_file() and not overwrite:
            return  # content-addressed: the same key holds the same bytes
        try:
            _atomic_copy(local_path, dest)
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc}") from exc

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectMissing(f"no object {key} in {self.url}")
        _atomic_copy(src, Path(local_path))

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # the shard folder, once empty
        except OSError:
            pass


class S3Store:
    """Objects ``s3://<bucket>/<prefix>/<key>`` in an S3-compatible service."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        if not bucket:
            raise ValueError("an s3:// artifact URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3  # imported on first use only: the API need not load it otherwise
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
            )
        return self._client

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, key: str, exc: Exception) -> StoreError:
        return StoreError(f"{what} {self.url}/{key} failed: {type(exc).__name__}: {exc}")

    def put_file(self, key: str, local_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        name = self._key(key)
        if not overwrite and self.exists(key):
            return
        try:
            # One PUT (or a multipart upload) becomes visible only once complete: atomic.
            self.client.upload_file(str(local_path), self.bucket, name)
        except Exception as exc:
            raise self._fail("upload to", key, exc) from exc

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        name = self._key(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            try:
                self.client.download_file(self.bucket, name, tmp)
            except Exception as exc:
                if _is_not_found(exc):
                    raise ObjectMissing(f"no object {key} in {self.url}") from None
                raise self._fail("download from", key, exc) from exc
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return None

    def exists(self, key: str) -> bool:
        name = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=name)
            return True
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise self._fail("looking up", key, exc) from exc

    def delete(self, key: str) -> None:
        name = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            if not _is_not_found(exc):
                raise self._fail("deleting", key, exc) from exc


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def open_store(url: str, *, s3_endpoint_url: str | None = None) -> ArtifactStore:
    """The store for ``url``: ``file:///path`` or ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// artifact URLs must be absolute paths (file:///path), got {url!r}")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, unquote(parsed.path), endpoint_url=s3_endpoint_url)
    raise ValueError(f"unsupported artifact store URL {url!r}: use file:///absolute/path or s3://bucket/prefix")
