"""The client's studies (/v1/studies): settings that keep learning across the jobs that name one.

``Client`` inherits these methods; a job joins a study with ``"study": "<id>"`` in its body, or
``Client.tune(..., study=id)``.
"""

from __future__ import annotations

from typing import Any


class StudiesMixin:
    """Study methods of ``gradtune.client.Client`` (they use its ``_call``)."""

    def _call(self, method: str, path: str, **kw: Any) -> Any:  # pragma: no cover - Client's
        raise NotImplementedError

    def _tuned(self, body: dict[str, Any]) -> Any:  # pragma: no cover - Client's (TunedSettings.from_body)
        raise NotImplementedError

    def create_study(
        self,
        name: str = "study",
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        lr_bounds: tuple[float, float] | None = None,
        momentum_bounds: tuple[float, float] | None = None,
        per_layer: bool = False,
        schedule_segments: int = 1,
        holdout_every: int = 4,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a study: its starting values and bounds (every job of it uses them), and every
        ``holdout_every``-th task to join held out (never trained on, only evaluated)."""
        hp: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "per_layer": per_layer,
            "schedule_segments": schedule_segments,
        }
        if lr_bounds is not None:
            hp["lr_bounds"] = list(lr_bounds)
        if momentum_bounds is not None:
            hp["momentum_bounds"] = list(momentum_bounds)
        body = {"name": name, "hyperparameters": hp, "holdout_every": holdout_every, "meta": meta or {}}
        return self._call("POST", "/v1/studies", json=body)

    def study(self, study_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/studies/{study_id}")

    def studies(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", "/v1/studies", params={"limit": limit, "offset": offset})

    def study_settings(self, study_id: str) -> Any:
        """The study's current settings (``TunedSettings``; ``raw`` holds the body: ``version``,
        ``evaluation`` on the held-out tasks)."""
        return self._tuned(self._call("GET", f"/v1/studies/{study_id}/settings"))

    def study_history(self, study_id: str) -> list[dict[str, Any]]:
        """One entry per update: the job after which it learned, the settings before and after."""
        return self._call("GET", f"/v1/studies/{study_id}/history")["items"]
