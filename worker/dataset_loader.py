"""Arrays for a ``source: dataset`` task: fetch the uploaded files, read, select, split.

``load_dataset_task_data(data, settings)`` returns ``(x_train, y_train, x_val, y_val)`` as numpy
arrays: features as float32 of shape (N, F) (images (N, C, H, W) for a cnn); targets as int64
when the tensor or column holds integers (or booleans), else float32, with the shape they have in
the file ((N,) or (N, K)).
Without ``val`` the train rows are split exactly like a builtin dataset::

    perm = numpy.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction)); val = perm[:n_val]; train = perm[n_val:]

Files come from the artifact store (``GRADTUNE_ARTIFACT_URL``): a local store is read in place,
a remote one is downloaded once into ``<data_dir>/cache/artifacts/<sha256>`` (checked against
its sha256 before it is used). Parsing goes through ``service.dataset_files``, the same code
that checked the file at upload: no pickle (npz with ``allow_pickle=False``).

Imports numpy, but not torch: the runner turns the arrays into tensors.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.dataset_files import TENSOR_FORMATS, read_columns, read_tensor
from service.db.models import Dataset
from service.schemas import DatasetData, DatasetRef
from service.settings import Settings, get_settings
from service.storage import ArtifactStore, ObjectMissing

__all__ = ["DatasetUnavailable", "LruCache", "load_dataset_task_data", "local_copy"]


class DatasetUnavailable(RuntimeError):
    """A dataset the job names is gone (deleted, or its stored file is missing) or no longer
    matches what the job was validated against. ``str()`` is a sentence for the job's error."""


# ---------------------------------------------------------------- files


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


_download_lock = threading.Lock()


def local_copy(store: ArtifactStore, sha256: str, cache_dir: Path) -> Path:
    """A local path holding the object ``sha256``: the store's own file, or a verified cached copy."""
    direct = store.local_path(sha256)
    if direct is not None:
        return direct
    dest = cache_dir / sha256
    if dest.is_file():
        return dest
    with _download_lock:
        if dest.is_file():
            return dest
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{sha256}.", suffix=".part")
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            try:
                store.get_file(sha256, tmp_path)
            except ObjectMissing:
                raise DatasetUnavailable(
                    f"the stored file {sha256} is missing from the artifact store {store.url}"
                ) from None
            got = _sha256_of(tmp_path)
            if got != sha256:
                raise DatasetUnavailable(
                    f"the file downloaded for {sha256} from {store.url} has sha256 {got}: the stored object is corrupt"
                )
            os.replace(tmp_path, dest)
        finally:
            tmp_path.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- reading (with a small cache)


class LruCache:
    """A small thread-safe cache that drops its least recently used entry past ``size`` entries
    (read results here, and worker/model_loader's programs). Values are never None."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The value cached under ``key`` (now the most recently used), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = LruCache(4)  # (path, format, x, y) -> (x, y)


def _targets(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind in "biu":
        return np.ascontiguousarray(y, dtype=np.int64)
    return np.ascontiguousarray(y, dtype=np.float32)


def _read_xy(path: Path, fmt: str, ref: DatasetRef, label: str) -> tuple[np.ndarray, np.ndarray]:
    """x (float32, (N, F)) and y of one reference, read-only and cached per (file, x, y)."""
    key = (str(path), fmt, ref.x if isinstance(ref.x, str) else tuple(ref.x), ref.y)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        if fmt in TENSOR_FORMATS:
            if not isinstance(ref.x, str):
                raise DatasetUnavailable(f"{label} holds tensors: x must name one tensor")
            x = read_tensor(path, fmt, ref.x)
            y = read_tensor(path, fmt, ref.y)
        else:
            names = [ref.x] if isinstance(ref.x, str) else list(ref.x)
            cols = read_columns(path, fmt, list(dict.fromkeys([*names, ref.y])))
            x = np.stack([np.asarray(cols[n], dtype=np.float32) for n in names], axis=1)
            y = cols[ref.y]
    except KeyError as exc:
        raise DatasetUnavailable(f"{label} has no tensor or column {exc.args[0]!r}") from None
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = _targets(np.asarray(y))
    if x.ndim not in (2, 4) or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise DatasetUnavailable(
            f"{label}: x has shape {list(x.shape)} and y {list(y.shape)}; expected (N, F) or images "
            "(N, C, H, W), and N targets"
        )
    x.flags.writeable = False
    y.flags.writeable = False
    _cache.put(key, (x, y))
    return x, y


def clear_cache() -> None:
    _cache.clear()


# ---------------------------------------------------------------- database


@lru_cache(maxsize=4)
def _sessionmaker(url: str):
    from sqlalchemy.orm import sessionmaker

    from service.db.session import make_engine

    return sessionmaker(bind=make_engine(url), expire_on_commit=False)


def _rows(session: Session, ids: list[str], tenant: str | None) -> dict[str, tuple[str, str, str]]:
    query = session.query(Dataset).filter(Dataset.id.in_(ids))
    if tenant is not None:
        query = query.filter(Dataset.tenant == tenant)
    out = {}
    for d in query.all():
        out[d.id] = (d.format, d.sha256, d.filename)
    return out


# ---------------------------------------------------------------- entry point


def load_dataset_task_data(
    data_spec: DatasetData | dict[str, Any],
    settings: Settings | None = None,
    *,
    session: Session | None = None,
    store: ArtifactStore | None = None,
    tenant: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_val, y_val)`` for a task whose ``data`` has ``source: dataset``.

    ``data_spec`` is the task's ``data`` (the model or its JSON form). Dataset rows are read with
    ``session`` when given, else through a connection of ``settings``' database; the files come
    from ``store`` when given, else from ``settings.artifact_store()``. Raises
    ``DatasetUnavailable`` when a dataset or its file is gone, or (with ``tenant``) is not that
    tenant's: a job's data is its own tenant's only.
    """
    settings = settings or get_settings()
    data = data_spec if isinstance(data_spec, DatasetData) else DatasetData.model_validate(data_spec)
    refs = data.references()
    ids = list(dict.fromkeys(ref.dataset for _split, ref in refs))
    if session is not None:
        rows = _rows(session, ids, tenant)
    else:
        with _sessionmaker(settings.resolved_database_url())() as own:
            rows = _rows(own, ids, tenant)
    store = store or settings.artifact_store()
    cache_dir = (settings.data_dir / "cache" / "artifacts").resolve()

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, ref in refs:
        if ref.dataset not in rows:
            raise DatasetUnavailable(
                f"dataset {ref.dataset} ({split}) no longer exists"
                + (f" for tenant {tenant!r}" if tenant is not None else "; it was deleted")
            )
        fmt, sha256, filename = rows[ref.dataset]
        label = f"dataset {ref.dataset} ({filename})"
        path = local_copy(store, sha256, cache_dir)
        arrays[split] = _read_xy(path, fmt, ref, label)

    x, y = arrays["train"]
    if data.val is not None:
        xv, yv = arrays["val"]
        return x.copy(), y.copy(), xv.copy(), yv.copy()
    n = x.shape[0]
    perm = np.random.default_rng(data.seed).permutation(n)
    n_val = max(1, round(n * data.val_fraction))
    if n_val >= n:
        raise DatasetUnavailable(f"val_fraction {data.val_fraction:g} of {n} rows leaves no training rows")
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
