"""A small HTTP client for the gradtune API (httpx only: no server dependencies).

Installed by ``pip install gradtune`` alone; it never imports ``service`` or ``worker``. torch and
numpy are imported inside the functions that handle models and tensors (``tune``,
``TunedSettings.sgd``), from the user's own environment.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gradtune.errors import GradtuneError, refused
from gradtune.errors import format_detail as format_detail  # re-exported: gradtune.client.format_detail
from gradtune.spec.vocab import ADMIN_KEY_FILE
from gradtune.sse import ServerEvent, follow, stream_lines
from gradtune.studies import StudiesMixin

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class TunedSettings:
    """Learned SGD settings, as returned by GET /v1/jobs/{id}/settings.

    ``lr`` and ``momentum`` are the best constant pair. With per-layer or scheduled settings,
    ``param_groups`` and ``boundaries`` are there too: ``sgd(model)`` then builds one param group
    per entry, and ``apply_schedule(optimizer, step)`` before each ``optimizer.step()`` switches
    the values at the segment boundaries (the momentum buffers carry over, as the engine trained).
    """

    lr: float
    momentum: float
    evaluation: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] | None = None
    boundaries: list[int] | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TunedSettings:
        return cls(
            lr=body["lr"],
            momentum=body["momentum"],
            evaluation=body.get("evaluation") or {},
            raw=body,
            param_groups=body.get("param_groups"),
            boundaries=body.get("boundaries"),
        )

    def sgd(self, model_or_params, constant: bool = False):
        """``torch.optim.SGD`` with the learned values.

        Given an ``nn.Module`` and per-layer or scheduled settings (unless ``constant``), one param
        group per learned group, by parameter name; otherwise the constant pair for all parameters.
        """
        import torch

        if self.param_groups and not constant and isinstance(model_or_params, torch.nn.Module):
            from gradtune.torch_utils import make_optimizer

            return make_optimizer(model_or_params, self.param_groups, self.boundaries or [0])
        params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def apply_schedule(self, optimizer, step: int) -> None:
        """Set each param group's lr and momentum for ``step`` (no-op for constant settings)."""
        if self.param_groups:
            from gradtune.torch_utils import apply_schedule

            apply_schedule(optimizer, self.param_groups, self.boundaries or [0], step)

    def python(self) -> str:
        """The lines of torch code that build the optimizer (and apply a schedule, if any)."""
        if not self.param_groups:
            return (
                "import torch\n"
                f"optimizer = torch.optim.SGD(model.parameters(), lr={self.lr!r}, momentum={self.momentum!r})\n"
            )
        lines = [
            "import bisect",
            "import torch",
            "",
            "named = dict(model.named_parameters())",
            f"boundaries = {list(self.boundaries or [0])!r}",
            "param_groups = [",
        ]
        for g in self.param_groups:
            lines.append(f"    {{'params': {g['params']!r}, 'lr': {g['lr']!r}, 'momentum': {g['momentum']!r}}},")
        lines += [
            "]",
            "optimizer = torch.optim.SGD(",
            "    [{'params': [named[n] for n in g['params']], 'lr': g['lr'][0], 'momentum': g['momentum'][0]}",
            "     for g in param_groups], lr=param_groups[0]['lr'][0])",
            "",
            "def apply_schedule(step):  # call before optimizer.step() at every step",
            "    seg = max(0, bisect.bisect_right(boundaries, step) - 1)",
            "    for group, g in zip(optimizer.param_groups, param_groups):",
            "        group['lr'], group['momentum'] = g['lr'][seg], g['momentum'][seg]",
        ]
        return "\n".join(lines) + "\n"


def local_admin_key(url: str) -> str | None:
    """For a server on this machine (a loopback URL): the admin key the first `gradtune serve` wrote
    to <GRADTUNE_DATA_DIR>/admin.key (default ./data), if this user can read it."""
    from urllib.parse import urlsplit

    if (urlsplit(url).hostname or "") not in ("localhost", "127.0.0.1", "::1"):
        return None
    path = Path(os.environ.get("GRADTUNE_DATA_DIR") or "./data") / ADMIN_KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Client(StudiesMixin):
    """The gradtune API. ``api_key``: the key sent as ``Authorization: Bearer`` (every /v1 route
    needs one); default GRADTUNE_API_KEY, else, for a server on this machine, the admin key that
    `gradtune serve` wrote on its first start (``local_admin_key``)."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        key = api_key or os.environ.get("GRADTUNE_API_KEY") or local_admin_key(self.url)
        headers = {"Authorization": f"Bearer {key.strip()}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise GradtuneError(0, f"cannot reach {self.url}: {exc}") from exc
        if r.status_code >= 400:
            raise refused(r)
        return r.json() if r.content else None

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/jobs", json=job)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(
        self, status: str | None = None, limit: int = 20, offset: int = 0, study: str | None = None
    ) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"items", "total", "limit", "offset"}``; ``status`` and
        ``study`` (a study id) keep only the jobs with that status, of that study."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if study:
            params["study"] = study
        return self._call("GET", "/v1/jobs", params=params)

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/history")["items"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def _tuned(self, body: dict[str, Any]) -> TunedSettings:
        return TunedSettings.from_body(body)

    def settings(self, job_id: str) -> TunedSettings:
        body = self._call("GET", f"/v1/jobs/{job_id}/settings")
        return TunedSettings.from_body(body)

    def upload_dataset(self, file: str | Path | bytes, filename: str | None = None) -> dict[str, Any]:
        """Upload a .safetensors/.npz/.csv/.parquet file (a path, or bytes with a filename)."""
        if isinstance(file, bytes):
            if not filename:
                raise ValueError("filename is needed with bytes (its extension names the format)")
            return self._call("POST", "/v1/datasets", files={"file": (filename, file)})
        path = Path(file)
        with path.open("rb") as fh:
            return self._call("POST", "/v1/datasets", files={"file": (filename or path.name, fh)})

    def datasets(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", "/v1/datasets", params={"limit": limit, "offset": offset})

    def upload_model(self, file: str | Path | bytes, filename: str | None = None) -> dict[str, Any]:
        """Upload a ``.pt2`` archive written by ``torch.export.save`` (a path, or its bytes); returns
        the server's description (id, input_shape, output_width, operators, parameters)."""
        if isinstance(file, (bytes, bytearray)):
            return self._call("POST", "/v1/models", files={"file": (filename or "model.pt2", bytes(file))})
        path = Path(file)
        with path.open("rb") as fh:
            return self._call("POST", "/v1/models", files={"file": (filename or path.name, fh)})

    def models(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", "/v1/models", params={"limit": limit, "offset": offset})

    def workers(self, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """The registered workers (``items``, each with ``live``), and ``live``: how many are live."""
        return self._call("GET", "/v1/workers", params={"limit": limit, "offset": offset})

    def tune(
        self,
        model,
        train,
        val,
        *,
        loss: str,
        steps: int,
        batch_size: int,
        lr: float = 0.01,
        momentum: float = 0.9,
        iterations: int | None = None,
        seed: int = 0,
        name: str = "tune",
        progress: bool = True,
        timeout: float | None = None,
        init: str = "default",
        per_layer: bool = False,
        schedule_segments: int = 1,
        method: str = "auto",
        search: str | None = None,
        device: str = "auto",
        study: str | None = None,
    ) -> TunedSettings:
        """Learn SGD settings for ``model`` trained on ``train = (x, y)``, judged on ``val = (x, y)``.

        A model ``describe_model`` can describe (an ``nn.Sequential`` of ``Linear`` layers with
        Tanh/ReLU/Sigmoid/GELU between them, or a CNN of Conv2d/ReLU/Tanh/MaxPool2d/AvgPool2d/
        Flatten/Linear on images (N, C, H, W)) is sent by its architecture. Any other model is
        exported (``torch.export.export(model, (x_train[:batch_size],))``, static shapes), saved
        with ``torch.export.save`` and uploaded (``upload_model``); the server reads the program as
        data and refuses, with the reason, what it cannot train. With ``init="default"`` the server
        trains fresh PyTorch-default initializations (drawn layer by layer in call order), so your
        model's current weights are not used; ``init="uploaded"`` always exports the model and
        starts every training run from its current weights. The tensors are uploaded as
        safetensors. ``per_layer``, ``schedule_segments``, ``method``, ``search`` (``"stencil"`` or
        ``"line"``; None: the server's default), ``iterations`` (None: the server's default for the search)
        and ``device`` (``auto``, ``cpu`` or ``cuda``: which workers run it) are the job options of
        the same names (the settings then carry ``param_groups``: ``settings.sgd(model)`` and
        ``settings.apply_schedule(optimizer, step)`` use them). With ``study`` (an id, see
        ``create_study``) the job joins it: it starts from the study's settings and bounds (``lr``,
        ``momentum``, ``per_layer`` and ``schedule_segments`` are the study's). Blocks until the job ends (with a
        progress bar when ``progress``); raises GradtuneError with the server's message if it fails.
        """
        if init not in ("default", "uploaded"):
            raise ValueError("init must be 'default' or 'uploaded'")
        spec = None
        if init == "default":
            try:
                spec = describe_model(model)
            except ValueError:
                spec = None  # not declarative: exported below
        xs, ys = _as_float32(train[0]), _targets(train[1], loss)
        want_out = (
            int(max(ys.max(), _targets(val[1], loss).max())) + 1
            if loss == "cross_entropy"
            else (1 if ys.ndim == 1 else ys.shape[1])
        )
        if spec is None:
            spec = {
                "kind": "exported",
                "model": self._export_and_upload(model, xs, batch_size, loss, want_out, name),
                "init": init,
            }
        else:
            _check_declared(model, spec, xs, loss, want_out)
        ids = []
        for part, (x, y) in (("train", train), ("val", val)):
            blob = safetensors_bytes({"x": _as_float32(x), "y": _targets(y, loss)})
            ids.append(self.upload_dataset(blob, filename=f"{name}-{part}.safetensors")["id"])
        job = {
            "name": name,
            "tasks": [
                {
                    "name": name,
                    "data": {
                        "source": "dataset",
                        "train": {"dataset": ids[0], "x": "x", "y": "y"},
                        "val": {"dataset": ids[1], "x": "x", "y": "y"},
                    },
                    "model": spec,
                    "loss": loss,
                    "steps": steps,
                    "batch_size": batch_size,
                }
            ],
            "hyperparameters": {
                "lr": lr,
                "momentum": momentum,
                "per_layer": per_layer,
                "schedule_segments": schedule_segments,
            },
            "meta": {
                "seed": seed,
                "method": method,
                **({} if search is None else {"search": search}),
                **({} if iterations is None else {"iterations": iterations}),
            },
            "device": device,
        }
        if study is not None:
            del job["hyperparameters"]
            job["study"] = study
        job_id = self.submit(job)["id"]
        if progress:
            from gradtune.progress import job_progress

            with job_progress(job_id) as show:
                final = self.wait(job_id, timeout=timeout, on_progress=show)
        else:
            final = self.wait(job_id, timeout=timeout)
        if final["status"] != "succeeded":
            raise GradtuneError(409, f"job {job_id} {final['status']}: {final.get('error') or ''}".strip())
        return self.settings(job_id)

    def _export_and_upload(self, model, xs, batch_size: int, loss: str, want_out: int, name: str) -> str:
        """torch.export the model on a batch of x_train, check its output, upload it; the model id."""
        import io

        import torch

        params = list(model.parameters())
        dtype = params[0].dtype if params else torch.float32
        example = torch.as_tensor(xs[: max(1, min(len(xs), batch_size))], dtype=dtype)
        try:
            with torch.no_grad():
                out = model(example[:1])
        except Exception as exc:
            raise ValueError(f"the model cannot run on x_train's examples {list(xs.shape[1:])}: {exc}") from None
        if out.dim() != 2:
            raise ValueError(f"the model outputs shape {list(out.shape)}; it must output (rows, outputs)")
        width = int(out.shape[1])
        if (loss == "cross_entropy" and width < want_out) or (loss == "mse" and width != want_out):
            raise ValueError(f"the model has {width} outputs; the {loss} targets need {want_out}")
        try:
            program = torch.export.export(model, (example,))
        except Exception as exc:
            raise ValueError(f"torch.export.export could not export the model: {type(exc).__name__}: {exc}") from None
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return self.upload_model(buf.getvalue(), filename=f"{name}.pt2")["id"]

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """The job's live events (GET /v1/jobs/{id}/events, Server-Sent Events), as ``ServerEvent``
        (``event``, ``id``, ``data`` parsed): ``iteration`` per committed meta-iteration (id ``N``),
        ``status`` per status change (id ``N:status``, data: the job's body); it ends after a
        finished job's status. ``last_event_id`` resumes after that event. GradtuneError when the
        server refuses or cannot be reached; httpx.TransportError if the connection drops."""
        with closing(stream_lines(self._http, job_id, last_event_id)) as lines:
            yield from (event for event in lines if event is not None)

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the job until it finishes; returns the final job (whatever its status).

        Follows the job's events: ``on_progress`` gets the job's body at each status change and, at
        each committed iteration, the last body with that iteration's progress. Against a server
        without the events route (404/405), or after the stream dropped twice (it is resumed once),
        it polls GET /v1/jobs/{id} every ``poll`` seconds instead. ``timeout``: TimeoutError once
        past it; while following events that is seen at the next event or keep-alive ping (the
        server pings every 15 s; a read waits at most until the deadline), so it may come late by
        up to that much.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        followed = follow(
            self._http,
            job_id,
            fetch=lambda: self.job(job_id),
            deadline=deadline,
            timeout=timeout,
            on_progress=on_progress,
        )
        if followed is not None:
            return followed
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)


def _check_declared(model, spec: dict[str, Any], xs, loss: str, want_out: int) -> None:
    """x_train and the targets against a model sent by its architecture (mlp or cnn)."""
    first, last = model[0], model[-1]
    if spec["kind"] == "cnn":
        if xs.ndim != 4 or xs.shape[1] != first.in_channels:
            raise ValueError(f"the model takes images (N, {first.in_channels}, H, W); x_train has shape {xs.shape}")
        import torch

        try:
            with torch.no_grad():
                out = model(torch.as_tensor(xs[:1], dtype=next(model.parameters()).dtype))
        except RuntimeError as exc:
            raise ValueError(f"the model cannot run on x_train's images {xs.shape[1:]}: {exc}") from None
        if tuple(out.shape) != (1, want_out):
            raise ValueError(f"the model outputs {list(out.shape[1:])} per image; the {loss} targets need {want_out}")
    elif xs.ndim != 2 or xs.shape[1] != first.in_features:
        raise ValueError(f"the model takes {first.in_features} features; x_train has shape {xs.shape}")
    if last.out_features != want_out:
        raise ValueError(f"the model has {last.out_features} outputs; the {loss} targets need {want_out}")


_ACTIVATIONS = {"Tanh": "tanh", "ReLU": "relu", "Sigmoid": "sigmoid", "GELU": "gelu"}


_CNN_ONLY = ("Conv2d", "MaxPool2d", "AvgPool2d", "Flatten")


def _square(value, what: str, i: int, layer) -> int:
    """An int from an int or a square pair (3 or (3, 3)); ValueError otherwise."""
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return int(value[0])
    raise ValueError(f"layer {i} ({layer!r}): gradtune takes a square {what} (one integer), got {value!r}")


def describe_cnn(model) -> dict[str, Any]:
    """The job's ``cnn`` model for an ``nn.Sequential`` of Conv2d, ReLU, Tanh, MaxPool2d, AvgPool2d,
    Flatten and Linear (ending with Linear); ValueError naming the layer otherwise."""
    import torch.nn as nn

    layers: list[dict[str, Any]] = []
    for i, layer in enumerate(model):
        kind = type(layer).__name__
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or _square(layer.dilation, "dilation", i, layer) != 1:
                raise ValueError(f"layer {i} ({layer!r}): groups and dilation must be 1")
            if layer.bias is None or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"layer {i} ({layer!r}): needs a bias and numeric zero padding")
            layers.append(
                {
                    "type": "conv2d",
                    "out_channels": layer.out_channels,
                    "kernel_size": _square(layer.kernel_size, "kernel_size", i, layer),
                    "stride": _square(layer.stride, "stride", i, layer),
                    "padding": _square(layer.padding, "padding", i, layer),
                }
            )
        elif isinstance(layer, (nn.ReLU, nn.Tanh)) and type(layer) in (nn.ReLU, nn.Tanh):
            layers.append({"type": kind.lower()})
        elif type(layer) in (nn.MaxPool2d, nn.AvgPool2d):
            k = _square(layer.kernel_size, "kernel_size", i, layer)
            stride = _square(layer.stride if layer.stride is not None else k, "stride", i, layer)
            plain = _square(layer.padding, "padding", i, layer) == 0 and not layer.ceil_mode
            if isinstance(layer, nn.MaxPool2d):
                plain = plain and _square(layer.dilation, "dilation", i, layer) == 1 and not layer.return_indices
            else:
                plain = plain and layer.divisor_override is None
            if not plain:
                raise ValueError(
                    f"layer {i} ({layer!r}): pools need padding 0, ceil_mode False (and no "
                    "dilation, indices or divisor_override)"
                )
            layers.append(
                {
                    "type": "maxpool" if isinstance(layer, nn.MaxPool2d) else "avgpool",
                    "kernel_size": k,
                    "stride": stride,
                }
            )
        elif type(layer) is nn.Flatten:
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise ValueError(f"layer {i} ({layer!r}): Flatten must keep the batch dimension (start_dim=1)")
            layers.append({"type": "flatten"})
        elif type(layer) is nn.Linear:
            if layer.bias is None:
                raise ValueError(f"layer {i} ({layer!r}): Linear needs a bias")
            layers.append({"type": "linear", "out_features": layer.out_features})
        else:
            raise ValueError(
                f"layer {i} is {layer!r}; a gradtune cnn takes Conv2d, ReLU, Tanh, MaxPool2d, "
                "AvgPool2d, Flatten and Linear"
            )
    if not layers or layers[-1]["type"] != "linear":
        raise ValueError("a gradtune cnn must end with a Linear layer")
    return {"kind": "cnn", "layers": layers}


def describe_model(model) -> dict[str, Any]:
    """The job's ``model``: ``mlp`` for an ``nn.Sequential(Linear, act, ..., Linear)``, ``cnn`` for
    an ``nn.Sequential`` with Conv2d, pools or Flatten (see describe_cnn); ValueError otherwise."""
    import torch.nn as nn

    layers = list(model) if isinstance(model, nn.Sequential) else None
    if layers and any(type(layer).__name__ in _CNN_ONLY for layer in layers):
        return describe_cnn(model)
    why = "gradtune can tune an nn.Sequential of Linear layers with one activation between them"
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ValueError(f"{why}; got {type(model).__name__}")
    hidden, acts = [], set()
    for i, layer in enumerate(layers):
        if i % 2 == 0:
            if not isinstance(layer, nn.Linear) or layer.bias is None:
                raise ValueError(f"{why}; layer {i} is {layer!r}")
            if i < len(layers) - 1:
                hidden.append(layer.out_features)
        else:
            kind = _ACTIVATIONS.get(type(layer).__name__)
            if kind is None or (kind == "gelu" and getattr(layer, "approximate", "none") != "none"):
                raise ValueError(f"{why}; layer {i} is {layer!r} (Tanh, ReLU, Sigmoid or GELU)")
            acts.add(kind)
    if len(acts) > 1:
        raise ValueError(f"{why}; it mixes activations {sorted(acts)}")
    return {"kind": "mlp", "hidden": hidden, "activation": acts.pop() if acts else "tanh"}


def _as_float32(x):
    import numpy as np

    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _targets(y, loss: str):
    import numpy as np

    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    return np.ascontiguousarray(y, dtype=np.int64 if loss == "cross_entropy" else np.float32)


_ST_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}


def safetensors_bytes(arrays: dict[str, Any]) -> bytes:
    """Serialize numpy arrays in the safetensors format (little-endian, no pickle)."""
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name, a in arrays.items():
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)
