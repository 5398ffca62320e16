"""The uploaded model of a ``kind: exported`` task: fetch its ``.pt2`` and read it as data.

``load_program(model_id, settings)`` returns ``(program, weights)``: read_pt2's plain-data program
and read_weights' raw parameter bytes (service/exported_files.py: zipfile and json only, never
``torch.export.load``, never pickle), which worker/engine/exported.exported_task interprets.
The file comes from the artifact store exactly like a dataset's (worker/dataset_loader.local_copy:
a local store is read in place, a remote one downloaded once into ``<data_dir>/cache/artifacts``
and checked against its sha256). Results are cached per sha256 (the bytes never change).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.db.models import ExportedModel
from service.exported_files import ExportedProgramError, read_pt2, read_weights
from service.settings import Settings, get_settings
from service.storage import ArtifactStore
from worker.dataset_loader import DatasetUnavailable, LruCache, _sessionmaker, local_copy

__all__ = ["ModelUnavailable", "load_program"]


class ModelUnavailable(DatasetUnavailable):
    """The model a job names is gone (deleted, or its stored file is missing) or can no longer be
    read. A DatasetUnavailable, so the runner fails the job with ``str()`` as its error."""


_cache = LruCache(8)  # sha256 -> (program, weights)


def clear_cache() -> None:
    _cache.clear()


def load_program(
    model_id: str,
    settings: Settings | None = None,
    *,
    session: Session | None = None,
    store: ArtifactStore | None = None,
    tenant: str | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``(program, weights)`` of the uploaded model ``model_id``; ModelUnavailable if it is gone
    (or, with ``tenant``, is not that tenant's)."""
    settings = settings or get_settings()

    def find(db: Session) -> tuple[str, str] | None:
        row = db.get(ExportedModel, model_id)
        if row is None or (tenant is not None and row.tenant != tenant):
            return None
        return row.sha256, row.filename

    if session is not None:
        found = find(session)
    else:
        with _sessionmaker(settings.resolved_database_url())() as own:
            found = find(own)
    if found is None:
        where = f" for tenant {tenant!r}" if tenant is not None else "; it was deleted"
        raise ModelUnavailable(f"model {model_id} no longer exists{where}")
    sha256, filename = found
    cached = _cache.get(sha256)
    if cached is not None:
        return cached
    store = store or settings.artifact_store()
    try:
        path = local_copy(store, sha256, (settings.data_dir / "cache" / "artifacts").resolve())
    except DatasetUnavailable as exc:
        raise ModelUnavailable(f"model {model_id} ({filename}): {exc}") from None
    try:
        program = read_pt2(path, max_bytes=settings.max_dataset_bytes)
        weights = read_weights(path, program)
    except ExportedProgramError as exc:
        raise ModelUnavailable(f"model {model_id} ({filename}) cannot be read: {exc}") from None
    _cache.put(sha256, (program, weights))
    return program, weights
