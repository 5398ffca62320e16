"""The meta-state as typed objects, and its JSON form (the checkpoint the worker stores).

Version 2 (written now) names every field, null where unset. Version 1 (written before the search
was unified) is read too: the same fields, with "method", "method_reason", "layout", "rich" and
"screen_next" absent until set. Both keep the constant pair's search at the top level, so
state["best"], state["theta"], state["grad"], state["method"] mean what they always did.

theta is every log lr (slot-major: slot 0's segments first), then every momentum logit
(gradtune.spec.hyper); the constant pair is the 1 x 1 table [log lr, logit].
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EngineError

STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Best:
    """The lowest finite meta-loss a search has seen: where, when, and its values [slot][segment]."""

    theta: list[float]
    meta_loss: float
    iteration: int
    lrs: list[list[float]]
    momenta: list[list[float]]

    @property
    def lr(self) -> float:
        return self.lrs[0][0]

    @property
    def momentum(self) -> float:
        return self.momenta[0][0]


@dataclass
class SearchState:
    """One search over a (slots x segments) table of (lr, momentum); the constant pair is 1 x 1.

    loss is the meta-loss at theta (None before the start), grad the hypergradient there (None when
    unknown or non-finite), step the current step in theta units. screen_next: the last line search
    found nothing lower, so the next iteration screens the stencil.
    """

    slots: int
    segments: int
    theta: list[float]
    loss: float | None
    grad: list[float] | None
    step: float
    converged: bool = False
    screen_next: bool = False
    best: Best | None = None


@dataclass
class Layout:
    """Parameter groups (names as named_parameters() gives them) and the step each segment starts at."""

    groups: list[list[str]]
    boundaries: list[int]

    @property
    def slots(self) -> int:
        return len(self.groups)


@dataclass
class MetaState:
    iteration: int
    start_lr: float
    start_momentum: float
    per_layer: bool
    segments: int
    constant: SearchState
    rich: SearchState | None = None
    layout: Layout | None = None
    method: str | None = None
    method_reason: str | None = None
    # the richer values' check on held-back tasks (loop.check_rich), once done: plain JSON
    rich_check: dict | None = None
    # a table to start the richer phase from (init_state's ``table``: a study's learned values),
    # {"lrs": [slot][segment], "momenta": [slot][segment], "boundaries": [...]}: plain JSON
    start_table: dict | None = None

    @property
    def rich_enabled(self) -> bool:
        return self.per_layer or self.segments > 1

    def to_json(self) -> dict:
        """The version-2 JSON form: plain dicts, lists, floats and strings, nothing shared with self."""
        c = self.constant
        return {
            "version": STATE_VERSION,
            "iteration": self.iteration,
            "start": {"lr": self.start_lr, "momentum": self.start_momentum},
            "hyper": {"per_layer": self.per_layer, "segments": self.segments},
            "method": self.method,
            "method_reason": self.method_reason,
            "layout": None
            if self.layout is None
            else {
                "groups": [list(g) for g in self.layout.groups],
                "slots": self.layout.slots,
                "boundaries": list(self.layout.boundaries),
            },
            **_search_json(c),
            "best": None
            if c.best is None
            else {
                "lr": c.best.lr,
                "momentum": c.best.momentum,
                "meta_loss": c.best.meta_loss,
                "theta": list(c.best.theta),
                "iteration": c.best.iteration,
            },
            "rich": None if self.rich is None else _table_json(self.rich),
            "rich_check": None if self.rich_check is None else dict(self.rich_check),
            "start_table": None if self.start_table is None else dict(self.start_table),
        }

    @classmethod
    def from_json(cls, state: dict) -> MetaState:
        """Read a version-1 or version-2 JSON state (EngineError for anything else)."""
        version = state.get("version") if isinstance(state, dict) else None
        if version not in READABLE_VERSIONS:
            raise EngineError("This meta-state was written by an incompatible version of the engine.")
        try:
            return _read(state, strict=version == STATE_VERSION)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineError(f"This meta-state is malformed ({type(exc).__name__}: {exc}).") from exc


# --------------------------------------------------------------------------- JSON helpers


def _floats(xs) -> list[float]:
    return [float(x) for x in xs]


def _table(rows) -> list[list[float]]:
    return [_floats(r) for r in rows]


def _search_json(s: SearchState) -> dict:
    return {
        "theta": list(s.theta),
        "loss": s.loss,
        "grad": None if s.grad is None else list(s.grad),
        "step": s.step,
        "converged": s.converged,
        "screen_next": s.screen_next,
    }


def _table_json(s: SearchState) -> dict:
    best = (
        None
        if s.best is None
        else {
            "theta": list(s.best.theta),
            "lrs": [list(r) for r in s.best.lrs],
            "momenta": [list(r) for r in s.best.momenta],
            "meta_loss": s.best.meta_loss,
            "iteration": s.best.iteration,
        }
    )
    return {"slots": s.slots, "segments": s.segments, **_search_json(s), "best": best}


def _get(d: dict, key: str, strict: bool, default=None):
    """d[key]; in a version-1 state a missing key means `default` (it was only written once set)."""
    return d[key] if strict else d.get(key, default)


def _read_search(d: dict, slots: int, segments: int, best: Best | None, strict: bool) -> SearchState:
    return SearchState(
        slots=slots,
        segments=segments,
        theta=_floats(d["theta"]),
        loss=None if d["loss"] is None else float(d["loss"]),
        grad=None if d["grad"] is None else _floats(d["grad"]),
        step=float(d["step"]),
        converged=bool(d["converged"]),
        screen_next=bool(_get(d, "screen_next", strict, False)),
        best=best,
    )


def _read_constant_best(b: dict | None) -> Best | None:
    if b is None:
        return None
    return Best(
        theta=_floats(b["theta"]),
        meta_loss=float(b["meta_loss"]),
        iteration=int(b["iteration"]),
        lrs=[[float(b["lr"])]],
        momenta=[[float(b["momentum"])]],
    )


def _read_table(d: dict | None, strict: bool) -> SearchState | None:
    if d is None:
        return None
    b = d["best"]
    best = (
        None
        if b is None
        else Best(
            theta=_floats(b["theta"]),
            meta_loss=float(b["meta_loss"]),
            iteration=int(b["iteration"]),
            lrs=_table(b["lrs"]),
            momenta=_table(b["momenta"]),
        )
    )
    return _read_search(d, int(d["slots"]), int(d["segments"]), best, strict)


def _read_layout(d: dict | None) -> Layout | None:
    if d is None:
        return None
    return Layout(groups=[[str(n) for n in g] for g in d["groups"]], boundaries=[int(b) for b in d["boundaries"]])


def _read(state: dict, strict: bool) -> MetaState:
    hyper = state["hyper"]
    constant = _read_search(state, 1, 1, _read_constant_best(state["best"]), strict)
    if len(constant.theta) != 2:
        raise ValueError("the constant pair needs two values")
    return MetaState(
        iteration=int(state["iteration"]),
        start_lr=float(state["start"]["lr"]),
        start_momentum=float(state["start"]["momentum"]),
        per_layer=bool(hyper["per_layer"]),
        segments=int(hyper["segments"]),
        constant=constant,
        rich=_read_table(_get(state, "rich", strict), strict),
        layout=_read_layout(_get(state, "layout", strict)),
        method=_get(state, "method", strict),
        method_reason=_get(state, "method_reason", strict),
        rich_check=state.get("rich_check"),  # absent from states written before the check existed
        start_table=state.get("start_table"),  # absent from states written before warm tables
    )
