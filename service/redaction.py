"""Text that leaves the service (a job's ``error``) carries no store URLs, hosts or credentials.

``redact(text, settings)`` replaces the configured URLs (artifact store, database, broker, S3
endpoint) and the data directory by what they are (``<artifact store>``, ``<database>``, ...), then
any other URL by ``<url>`` and any ``user:password@`` left by ``***@``. The full text stays in the
worker's log, where the operator can read it.
"""

from __future__ import annotations

import re
from typing import Any

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)\]]+")
_CREDENTIALS = re.compile(r"[^\s/'\"@:]+:[^\s/'\"@]+@")


def _named(settings: Any) -> list[tuple[str, str]]:
    """(value, placeholder) pairs for this configuration's locations, longest value first."""
    pairs: list[tuple[str, str]] = []
    for getter, name in (
        (lambda: settings.resolved_artifact_url(), "<artifact store>"),
        (lambda: settings.resolved_database_url(), "<database>"),
        (lambda: settings.resolved_broker_url(), "<broker>"),
        (lambda: settings.s3_endpoint_url, "<artifact store>"),
        (lambda: str(settings.data_dir.resolve()), "<data dir>"),
    ):
        try:
            value = getter()
        except Exception:  # a setting that cannot be resolved has nothing to hide
            continue
        if value and len(value) > 3:
            pairs.append((value.rstrip("/"), name))
    return sorted(pairs, key=lambda p: -len(p[0]))


def redact(text: str, settings: Any = None) -> str:
    """``text`` without the locations of the artifact store, database and broker, nor credentials."""
    if settings is not None:
        for value, name in _named(settings):
            text = re.sub(re.escape(value) + r"(?=[/\s'\":,;)\]]|$)", name, text)
    text = _URL.sub("<url>", text)
    return _CREDENTIALS.sub("***@", text)
