"""gradtune.Client with a model describe_model cannot describe: tune() exports it with torch.export,
uploads the .pt2 to /v1/models and submits ``{"kind": "exported"}`` (against a mock transport; the
server side of the same bytes is tests/service/test_models.py), and upload_model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from gradtune.client import Client, GradtuneError, describe_model
from service.exported_files import describe_program, read_pt2
from service.schemas import JobCreate
from tests.helpers.support import mock_client


class Residual(nn.Module):  # not an nn.Sequential: describe_model refuses it
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def uploaded_pt2(request: httpx.Request, tmp: Path) -> Path:
    """The .pt2 bytes of a multipart upload, written to a file."""
    body = request.content
    ctype = request.headers["content-type"]
    boundary = ctype.split("boundary=")[1].encode()
    part = [p for p in body.split(b"--" + boundary) if b'name="file"' in p][0]
    assert b'filename="' in part and b'.pt2"' in part
    data = part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    path = tmp / "up.pt2"
    path.write_bytes(data)
    return path


def test_tune_exports_a_model_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError):
        describe_model(Residual())
    seen: dict = {}
    x, y = torch.randn(24, 5), torch.arange(24) % 3
    settings = mock_client(seen).tune(
        Residual(), (x, y), (x[:6], y[:6]), loss="cross_entropy", steps=5, batch_size=8, progress=False
    )
    assert (settings.lr, settings.momentum) == (0.1, 0.5)
    task = JobCreate.model_validate(seen["job"]).tasks[0]
    assert task.model.kind == "exported" and task.model.model == "m1" and task.model.init == "default"
    # what was uploaded is a program the server's reader accepts, with the model's own names
    summary = describe_program(read_pt2(uploaded_pt2(seen["models"][0], tmp_path)))
    assert summary["input_shape"] == [5] and summary["output_width"] == 3
    assert [p["name"] for p in summary["parameters"]] == ["a.weight", "a.bias", "b.weight", "b.bias"]


def test_init_uploaded_exports_even_a_declarable_model_and_checks_outputs(tmp_path):
    seen: dict = {}
    client = mock_client(seen)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(24, 5), torch.arange(24) % 3
    client.tune(
        mlp, (x, y), (x[:6], y[:6]), loss="cross_entropy", steps=5, batch_size=8, progress=False, init="uploaded"
    )
    assert seen["job"]["tasks"][0]["model"] == {"kind": "exported", "model": "m1", "init": "uploaded"}
    with pytest.raises(ValueError, match="targets need 4"):
        client.tune(
            Residual(),
            (x, torch.arange(24) % 4),
            (x[:6], y[:6]),
            loss="cross_entropy",
            steps=5,
            batch_size=8,
            progress=False,
        )
    with pytest.raises(ValueError, match="cannot run on x_train"):
        client.tune(
            Residual(),
            (torch.randn(24, 7), y),
            (x[:6], y[:6]),
            loss="cross_entropy",
            steps=5,
            batch_size=8,
            progress=False,
        )
    with pytest.raises(ValueError, match="init must be"):
        client.tune(Residual(), (x, y), (x, y), loss="cross_entropy", steps=5, batch_size=8, init="mine")


def test_upload_model_sends_a_path_or_bytes_and_surfaces_refusals(tmp_path):
    seen: dict = {}
    client = mock_client(seen)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Residual(), (torch.randn(2, 5),)), str(path))
    assert client.upload_model(path) == {"id": "m1"}
    assert client.upload_model(path.read_bytes()) == {"id": "m1"}
    names = [r.content.split(b'filename="')[1].split(b'"')[0] for r in seen["models"]]
    assert names == [b"net.pt2", b"model.pt2"]

    def refuse(request):
        return httpx.Response(
            422,
            json={
                "detail": [
                    {
                        "loc": ["body", "file"],
                        "field": "file",
                        "msg": "x.pt2: not a .pt2 archive",
                        "type": "unsupported_program",
                    }
                ]
            },
        )

    bad = Client("http://test", transport=httpx.MockTransport(refuse))
    with pytest.raises(GradtuneError, match="file: x.pt2: not a .pt2 archive"):
        bad.upload_model(b"junk", filename="x.pt2")


def test_cli_models_upload_and_list_against_a_live_app(tmp_path, sqlite_url, make_settings, monkeypatch):
    """`gradtune models upload FILE` / `models list` through the real API (in-process transport)."""
    from typer.testing import CliRunner

    import gradtune.client as client_mod
    from gradtune.cli import cli
    from service.main import create_app
    from tests.helpers.support import keyed_client

    app = create_app(make_settings(tmp_path, database_url=sqlite_url))
    with keyed_client(app) as live:
        real = client_mod.Client

        def bound(url, *a, **kw):  # the CLI's client, talking to the app in this process
            return real(url, transport=live._transport, api_key=live.key)

        monkeypatch.setattr(client_mod, "Client", bound)
        path = tmp_path / "res.pt2"
        torch.export.save(torch.export.export(Residual(), (torch.randn(2, 5),)), str(path))
        runner = CliRunner()
        r = runner.invoke(cli, ["models", "upload", str(path), "--url", "http://testserver"])
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert "input (5,) -> 3 outputs: linear relu linear" in lines[1]
        assert [ln.split()[0] for ln in lines[2:]] == ["a.weight", "a.bias", "b.weight", "b.bias"]
        r = runner.invoke(cli, ["models", "list", "--url", "http://testserver"])
        assert r.exit_code == 0 and lines[0] in r.output and "res.pt2" in r.output
        bad = tmp_path / "bad.pt2"
        bad.write_bytes(b"not a zip")
        r = runner.invoke(cli, ["models", "upload", str(bad), "--url", "http://testserver"])
        assert r.exit_code == 1 and "not a .pt2 archive" in r.output
