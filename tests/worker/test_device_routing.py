"""The worker's side of queues by device, on CPU by the code path a GPU worker takes: a ``cuda`` job's
every next chunk goes back to the cuda queue (run here by the runner on CPU); a worker adds its
device's queue when it starts, and one asked for CUDA without it stops with the reason."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from gradtune.spec import job_queue
from service.db.models import Job
from service.queue import make_celery
from tests.e2e.conftest import small_job
from worker import device as worker_device


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_every_chunk_message_of_a_job_goes_to_its_devices_queue(runner_env, monkeypatch, device):
    from worker import runner

    app, client = runner_env.start(chunk_iterations=2)
    sent: list[tuple[str, int, str | None]] = []
    monkeypatch.setattr(runner, "enqueue", lambda job_id, it, dev=None: sent.append((job_id, it, dev)))
    monkeypatch.setattr(worker_device, "_device", torch.device("cpu"))  # this worker computes on CPU
    jid = client.post("/v1/jobs", json={**small_job(iterations=3, tasks=1), "device": device}).json()["id"]
    outcomes = []
    sent.append((jid, 0, device))  # the API's message
    while sent and len(outcomes) < 10:
        job_id, it, dev = sent.pop(0)
        assert dev == device, (it, dev)
        outcomes.append(runner.run_chunk(job_id, it, owner="t"))
    assert outcomes == ["committed", "committed", "succeeded"]
    job = client.get(f"/v1/jobs/{jid}").json()
    assert (job["status"], job["device"], job["waiting"]) == ("succeeded", device, None)
    with app.state.sessionmaker() as s:
        assert s.get(Job, jid).device == "cpu"  # where it ran


def test_resolve_the_device_a_worker_is_started_with():
    assert [worker_device.resolve(d, lambda: False) for d in ("auto", "cpu")] == ["cpu", "cpu"]
    assert [worker_device.resolve(d, lambda: True) for d in ("auto", "cpu", "cuda")] == ["cuda", "cpu", "cuda"]
    with pytest.raises(worker_device.DeviceUnavailable, match="CUDA is not available on this machine"):
        worker_device.resolve("cuda", lambda: False)
    with pytest.raises(worker_device.DeviceUnavailable, match="one of auto, cpu, cuda, not 'gpu'"):
        worker_device.resolve("gpu", lambda: True)


def _instance(make_settings, tmp_path):
    """What celeryd_after_setup hands its receivers: the worker, whose app consumes the -Q queue."""
    celery = make_celery(make_settings(tmp_path))
    celery.amqp.queues.select(["gt-base"])
    return types.SimpleNamespace(app=celery)


@pytest.mark.parametrize("want, cuda, added", [("cpu", True, "cpu"), ("auto", False, "cpu"), ("cuda", True, "cuda")])
def test_a_starting_worker_consumes_its_devices_queue(make_settings, tmp_path, monkeypatch, want, cuda, added):
    from worker import celery_app

    monkeypatch.setattr(celery_app.settings, "queue_name", "gt-base")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(worker_device, "_device", None)  # restored after: later tests run on CPU
    monkeypatch.setattr(worker_device, "get_settings", lambda: make_settings(tmp_path, device=want))
    instance = _instance(make_settings, tmp_path)
    celery_app._device_queue(sender="w@h", instance=instance)
    assert sorted(instance.app.amqp.queues.consume_from) == ["gt-base", job_queue("gt-base", added)]
    assert worker_device._device == torch.device(added)


def test_a_worker_asked_for_cuda_without_it_stops_with_the_reason(make_settings, tmp_path, monkeypatch, caplog):
    from worker import celery_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(worker_device, "_device", None)
    monkeypatch.setattr(worker_device, "get_settings", lambda: make_settings(tmp_path, device="cuda"))
    instance = _instance(make_settings, tmp_path)
    with caplog.at_level(logging.CRITICAL, logger="gradtune.worker"), pytest.raises(SystemExit) as stop:
        celery_app._device_queue(sender="w@h", instance=instance)
    assert stop.value.code == 1
    assert "cannot start: device cuda: CUDA is not available on this machine" in caplog.text
    assert list(instance.app.amqp.queues.consume_from) == ["gt-base"]  # it took no queue
