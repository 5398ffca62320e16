"""GradtuneError: what the client raises when the server refuses a request (httpx only)."""

from __future__ import annotations

from typing import Any

import httpx


class GradtuneError(Exception):
    """The server refused a request; ``str()`` is the server's message after its HTTP status.
    ``status_code`` 0: the server could not be reached (``str()`` is then the message alone)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        message = format_detail(detail)
        super().__init__(f"{status_code}: {message}" if status_code else message)


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{d.get('field') or d.get('loc')}: {d.get('msg')}" for d in detail if isinstance(d, dict))
    return str(detail)


def refused(r: httpx.Response) -> GradtuneError:
    """The error for a response with a 4xx/5xx status (its body read): the server's ``detail``."""
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return GradtuneError(r.status_code, detail)
