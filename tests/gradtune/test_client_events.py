"""Client.events and Client.wait against an in-process app: wait follows GET /v1/jobs/{id}/events
(on_progress per iteration), resumes a dropped stream once with Last-Event-ID, polls a server
without the route (404/405) or after a second drop, and times out on a job that never runs; the
SSE parser on raw lines; ``gradtune submit --wait`` shows a line per iteration."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

import gradtune.client
from gradtune import cli
from gradtune.client import Client, GradtuneError
from gradtune.sse import ServerEvent, parse_sse
from tests.service.conftest import job_body

REAL_CLIENT = gradtune.client.Client


class Recording(httpx.BaseTransport):
    """Passes requests to the app's transport and keeps them (``answered``: those the app has
    answered); ``answer(request, n)`` (n: how many events requests came before) may answer instead."""

    def __init__(self, inner: httpx.BaseTransport, answer=None) -> None:
        self.inner, self.answer, self.requests = inner, answer, []
        self.answered: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        n = len(self.paths("/events"))
        self.requests.append(request)
        if self.answer is not None and request.url.path.endswith("/events"):
            response = self.answer(request, n)
            if response is not None:
                return response
        response = self.inner.handle_request(request)
        self.answered.append(request)
        return response

    def paths(self, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith(suffix)]


@pytest.fixture
def env(runner_env):
    app, client = runner_env.start(chunk_iterations=2, events_poll_seconds=0.05)
    return client, runner_env.sent


def api(testclient, answer=None) -> tuple[Client, Recording]:
    transport = Recording(testclient._transport, answer)
    return Client("http://testserver", transport=transport, api_key=testclient.key), transport


def run_all(sent, job_id: str) -> None:
    from worker import runner

    sent.append((job_id, 0))
    while sent:
        job_id, it = sent.pop(0)
        runner.run_chunk(job_id, it, owner="t")


def submit(client, iterations: int) -> str:
    return client.post("/v1/jobs", json=job_body(meta={"iterations": iterations, "seed": 0})).json()["id"]


def test_wait_on_a_finished_job_follows_the_events(env):
    client, sent = env
    job_id = submit(client, 5)
    run_all(sent, job_id)
    gt, transport = api(client)
    seen: list[dict] = []
    final = gt.wait(job_id, timeout=30, on_progress=seen.append)
    assert final == client.get(f"/v1/jobs/{job_id}").json() and final["status"] == "succeeded"
    history = client.get(f"/v1/jobs/{job_id}/history").json()["items"]
    assert [s["progress"]["iteration"] for s in seen] == [1, 2, 3, 4, 5, 5]  # one per iteration, then the status
    for s, h in zip(seen, history, strict=False):
        assert (s["progress"]["meta_loss"], s["progress"]["lr"], s["progress"]["momentum"]) == (
            h["meta_loss"],
            h["lr"],
            h["momentum"],
        )
    assert len(transport.paths("/events")) == 1
    assert len(transport.paths(job_id)) == 1  # the body the iterations before the status event update

    events = list(gt.events(job_id, last_event_id="4"))
    assert [(e.event, e.id) for e in events] == [("iteration", "5"), ("status", "5:succeeded")]
    assert events[0].data == history[4] and events[1].data == final


def test_wait_sees_the_iterations_of_a_running_job(env):
    client, sent = env
    job_id = submit(client, 6)
    gt, transport = api(client)
    seen: list[dict] = []
    listening, out = threading.Event(), {}

    def on_progress(job: dict) -> None:
        seen.append(job)
        listening.set()

    def follow() -> None:
        try:
            out["final"] = gt.wait(job_id, timeout=60, on_progress=on_progress)
        except BaseException as exc:  # reported below
            out["error"] = exc

    waiter = threading.Thread(target=follow, daemon=True)
    waiter.start()
    assert listening.wait(30), "no status event for the queued job"
    run_all(sent, job_id)
    waiter.join(60)
    assert not waiter.is_alive() and "error" not in out, out
    assert out["final"]["status"] == "succeeded" and out["final"]["progress"]["iteration"] == 6
    assert (seen[0]["status"], seen[0]["progress"]["iteration"]) == ("queued", 0)
    iterations = [s["progress"]["iteration"] for s in seen]
    assert iterations == sorted(iterations) and set(range(1, 7)) <= set(iterations)
    assert "running" in [s["status"] for s in seen]
    assert len(transport.paths("/events")) == 1 and transport.paths(job_id) == []  # no polling


def cut_after(response: httpx.Response, events: int) -> httpx.Response:
    """The response's first ``events`` events, then the connection drops."""
    text = response.read().decode()
    end = [m.end() for m in re.finditer(r"\r\n\r\n|\n\n", text)][events - 1]

    class Dropped(httpx.SyncByteStream):
        def __iter__(self):
            yield text[:end].encode()
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
    return httpx.Response(200, headers=headers, stream=Dropped())


def test_a_dropped_stream_is_resumed_once_with_last_event_id(env):
    client, sent = env
    job_id = submit(client, 5)
    run_all(sent, job_id)
    holder: dict = {}

    def answer(request, n):
        return cut_after(holder["t"].inner.handle_request(request), 2) if n == 0 else None

    gt, holder["t"] = api(client, answer)
    seen: list[dict] = []
    final = gt.wait(job_id, timeout=30, on_progress=seen.append)
    assert final["status"] == "succeeded"
    assert [s["progress"]["iteration"] for s in seen] == [1, 2, 3, 4, 5, 5]  # nothing twice, nothing lost
    first, resumed = holder["t"].paths("/events")
    assert "last-event-id" not in first.headers and resumed.headers["last-event-id"] == "2"


def test_polls_after_a_second_drop(env):
    client, sent = env
    job_id = submit(client, 3)
    run_all(sent, job_id)
    holder: dict = {}
    gt, holder["t"] = api(client, lambda request, n: cut_after(holder["t"].inner.handle_request(request), 1))
    final = gt.wait(job_id, poll=0.01, timeout=30)
    assert final == client.get(f"/v1/jobs/{job_id}").json()
    assert len(holder["t"].paths("/events")) == 2 and len(holder["t"].paths(job_id)) >= 1


@pytest.mark.parametrize("status", [404, 405])
def test_a_server_without_the_route_is_polled(env, status):
    client, sent = env
    job_id = submit(client, 3)
    run_all(sent, job_id)
    detail = "Not Found" if status == 404 else "Method Not Allowed"
    gt, transport = api(client, lambda request, n: httpx.Response(status, json={"detail": detail}))
    seen: list[dict] = []
    final = gt.wait(job_id, poll=0.01, timeout=30, on_progress=seen.append)
    assert final == client.get(f"/v1/jobs/{job_id}").json() and seen == [final]
    assert len(transport.paths("/events")) == 1 and len(transport.paths(job_id)) == 1
    with pytest.raises(GradtuneError) as err:  # a job that does not exist is told by polling
        gt.wait("nope", poll=0.01, timeout=5)
    assert err.value.status_code == 404 and "job nope not found" in str(err.value)


def test_events_refused_raise_gradtune_error(env):
    client, _ = env
    gt, _ = api(client)
    with pytest.raises(GradtuneError) as err:
        list(gt.events("nope"))
    assert err.value.status_code == 404 and str(err.value) == "404: job nope not found"
    with pytest.raises(GradtuneError) as err:
        Client("http://testserver", transport=client._transport, api_key="gt_wrong").wait("nope")
    assert err.value.status_code == 401


def test_timeout_on_a_job_that_never_runs(env, monkeypatch):
    from service.api.routes import events as route

    monkeypatch.setattr(route, "PING_SECONDS", 0.2)
    client, _ = env
    job_id = submit(client, 3)  # queued: no worker runs it
    gt, _ = api(client)
    seen: list[dict] = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=f"job {job_id} still queued after 1.0s"):
        gt.wait(job_id, timeout=1.0, on_progress=seen.append)
    assert 1.0 <= time.monotonic() - t0 < 10
    assert [s["status"] for s in seen] == ["queued"]


def test_the_sse_parser_on_raw_lines():
    lines = [
        ": a comment",
        "event: status",
        "id: 3:running",
        'data: {"a":',
        "data: 1}",
        "",
        "",  # a blank line with nothing pending dispatches nothing
        "id: 7",  # an id without data: no event, but it is the id of those after it
        "",
        "data:plain text",
        "retry: 10",
        "",
        "event: iteration",
        "data",  # a field name alone: an empty data line
        "data: x",
        "",
        "data: never dispatched",  # no blank line after it: dropped at the end
    ]
    assert list(parse_sse(lines)) == [
        ServerEvent("status", "3:running", {"a": 1}),
        ServerEvent("message", "7", "plain text"),
        ServerEvent("iteration", "7", "\nx"),
    ]


def test_submit_wait_prints_a_line_per_iteration(env, monkeypatch, tmp_path):
    client, sent = env
    transport = Recording(client._transport)
    monkeypatch.setattr(
        gradtune.client, "Client", lambda url, **kw: REAL_CLIENT(url, transport=transport, api_key=client.key)
    )
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_body(meta={"iterations": 4, "seed": 0})))
    ran: dict = {}

    def worker() -> None:  # runs the job once the CLI follows its events, as a worker would
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            streams = [r for r in transport.answered if r.url.path.endswith("/events")]
            if streams:
                ran["id"] = streams[0].url.path.split("/")[-2]
                run_all(sent, ran["id"])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    r = CliRunner().invoke(cli.cli, ["submit", str(path), "--wait", "--timeout", "60", "--url", "http://testserver"])
    thread.join(30)
    assert r.exit_code == 0, r.output
    job_id = ran["id"]
    assert r.stdout.splitlines()[0] == job_id and "succeeded" in r.stdout.splitlines()[-1]
    shown = [line.split()[1] for line in r.stderr.splitlines() if line.startswith(job_id[:8])]
    assert shown[0] == "0/4" and {"1/4", "2/4", "3/4", "4/4"} <= set(shown), r.stderr
