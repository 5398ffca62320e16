"""The CLI's --url and --key before the subcommand, --wait's progress when standard error is not a
terminal (plain lines, no bar), and the message for a server that cannot be reached."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from typer.testing import CliRunner

import gradtune.client
from gradtune import cli
from gradtune.progress import job_progress
from tests.helpers.net import free_port

REAL_CLIENT = gradtune.client.Client


def record(monkeypatch, statuses: list[tuple[str, int]] | None = None) -> list[httpx.Request]:
    """A mock server: job j1 goes through ``statuses`` ((status, iteration), the last repeats); every
    request is recorded (its URL and its Authorization header)."""
    seen: list[httpx.Request] = []
    steps = statuses or [("queued", 0)]
    count = {"job": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/jobs" and request.method == "POST":
            return httpx.Response(202, json={"id": "j1", "status": "queued"})
        if request.url.path == "/v1/jobs/j1":
            status, iteration = steps[min(count["job"], len(steps) - 1)]
            count["job"] += 1
            progress = {"iteration": iteration, "iterations": 3, "meta_loss": 0.5, "lr": 0.1, "momentum": 0.9}
            return httpx.Response(200, json={"id": "j1", "name": "t", "status": status, "progress": progress})
        if request.url.path == "/v1/workers":
            return httpx.Response(200, json={"items": [], "total": 1, "live": 1, "stale_after_seconds": 60})
        return httpx.Response(404, json={"detail": "no"})

    def client(url, **kw):
        return REAL_CLIENT(url, api_key=kw.get("api_key"), transport=httpx.MockTransport(handler))

    monkeypatch.setattr(gradtune.client, "Client", client)
    monkeypatch.delenv("GRADTUNE_URL", raising=False)
    monkeypatch.delenv("GRADTUNE_API_KEY", raising=False)
    return seen


def invoke(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(cli.cli, args, env=env)


def test_url_and_key_before_the_subcommand(monkeypatch):
    seen = record(monkeypatch)
    r = invoke(["--url", "http://before.test:9", "--key", "gt_before", "status", "j1"])
    assert r.exit_code == 0, r.output
    assert "j1  queued" in r.stdout
    assert str(seen[-1].url) == "http://before.test:9/v1/jobs/j1"
    assert seen[-1].headers["authorization"] == "Bearer gt_before"


def test_the_subcommands_own_options_win(monkeypatch):
    seen = record(monkeypatch)
    r = invoke(["--url", "http://before.test", "--key", "gt_before", "status", "j1", "--url", "http://after.test"])
    assert r.exit_code == 0, r.output
    assert seen[-1].url.host == "after.test" and seen[-1].headers["authorization"] == "Bearer gt_before"
    r = invoke(["--key", "gt_before", "jobs", "--key", "gt_after", "--url", "http://after.test"])
    assert seen[-1].url.host == "after.test" and seen[-1].headers["authorization"] == "Bearer gt_after"


def test_environment_then_default(monkeypatch):
    seen = record(monkeypatch)
    r = invoke(["status", "j1"], env={"GRADTUNE_URL": "http://env.test", "GRADTUNE_API_KEY": "gt_env"})
    assert r.exit_code == 0, r.output
    assert seen[-1].url.host == "env.test" and seen[-1].headers["authorization"] == "Bearer gt_env"
    # the command line beats the environment, before or after the subcommand
    invoke(["--url", "http://cli.test", "status", "j1"], env={"GRADTUNE_URL": "http://env.test"})
    assert seen[-1].url.host == "cli.test"
    invoke(["status", "j1", "--url", "http://cli2.test"], env={"GRADTUNE_URL": "http://env.test"})
    assert seen[-1].url.host == "cli2.test"
    invoke(["status", "j1"])
    assert str(seen[-1].url).startswith("http://localhost:8000/")


def test_wait_prints_plain_lines_when_not_a_terminal(monkeypatch, tmp_path):
    steps = [("queued", 0), ("running", 1), ("running", 1), ("running", 2), ("succeeded", 3)]
    record(monkeypatch, steps)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"name": "t"}))
    r = invoke(["--url", "http://x.test", "submit", str(job), "--wait"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("j1  ")]
    # one line per change of status or iteration: the repeated (running, 1) is not printed twice
    assert [line.split()[1:3] for line in lines] == [
        ["0/3", "queued"],
        ["1/3", "running"],
        ["2/3", "running"],
        ["3/3", "succeeded"],
    ]
    assert "meta-loss 0.5  lr 0.1  momentum 0.9" in lines[-1]
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr and "━" not in r.stderr
    assert r.stdout.splitlines()[0] == "j1" and "succeeded" in r.stdout.splitlines()[-1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar():
    out = Terminal()
    with job_progress("j1", stream=out) as show:
        show({"status": "running", "progress": {"iteration": 2, "iterations": 4}})
    text = out.getvalue()
    assert "2/4" in text and "running" in text and "━" in text


def test_unreachable_server_message_has_no_status_prefix(monkeypatch):
    monkeypatch.delenv("GRADTUNE_API_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    with REAL_CLIENT(url, api_key="gt_x") as client, pytest.raises(gradtune.client.GradtuneError) as err:
        client.job("j1")
    assert err.value.status_code == 0
    assert str(err.value).startswith(f"cannot reach {url}")
    r = invoke(["--url", url, "--key", "gt_x", "status", "j1"])
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: cannot reach {url}"), r.stderr


def test_a_refusal_keeps_its_status():
    assert str(gradtune.client.GradtuneError(404, "no such job")) == "404: no such job"
