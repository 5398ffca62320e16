"""A small HTTP client for the gradtune API (httpx only: no server dependencies)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class GradtuneError(Exception):
    """The server refused a request; ``str()`` is the server's message."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"{status_code}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{d.get('field') or d.get('loc')}: {d.get('msg')}" for d in detail if isinstance(d, dict))
    return str(detail)


@dataclass
class TunedSettings:
    """Learned SGD settings, as returned by GET /v1/jobs/{id}/settings."""

    lr: float
    momentum: float
    evaluation: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def sgd(self, params):
        """``torch.optim.SGD`` with the learned values."""
        import torch

        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def python(self) -> str:
        """The lines of torch code that build the optimizer."""
        return (
            "import torch\n"
            f"optimizer = torch.optim.SGD(model.parameters(), lr={self.lr!r}, momentum={self.momentum!r})\n"
        )


class Client:
    def __init__(self, url: str = "http://localhost:8000", timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise GradtuneError(0, f"cannot reach {self.url}: {exc}") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise GradtuneError(r.status_code, detail)
        return r.json() if r.content else None

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/jobs", json=job)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(self, status: str | None = None, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._call("GET", "/v1/jobs", params=params)

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/history")["items"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def settings(self, job_id: str) -> TunedSettings:
        body = self._call("GET", f"/v1/jobs/{job_id}/settings")
        return TunedSettings(lr=body["lr"], momentum=body["momentum"], evaluation=body.get("evaluation", {}), raw=body)

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job finishes; returns the final job (whatever its status)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)
