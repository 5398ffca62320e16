"""Concurrent uploads are bounded (issue 10): at most GRADTUNE_MAX_CONCURRENT_UPLOADS are received
and checked at once per API process; one more is answered at once with 503 and Retry-After, and
a slot is given back however an upload ends (stored, refused, too large)."""

from __future__ import annotations

import threading

import pytest

from tests.helpers.dataset_files import npz_bytes
from tests.helpers.support import stored_files, temp_files

SLOW = 30  # seconds a held upload waits at most (the test releases it long before)


@pytest.fixture
def one_slot_client(tmp_path, db_url, make_settings, monkeypatch):
    """A client of an app with one upload slot, and a gate: while it is closed, a dataset upload
    stops inside its check (after its body was received) and sets ``inside``."""
    import service.api.routes.datasets as datasets
    from service.main import create_app
    from tests.helpers.support import keyed_client

    inside, gate = threading.Event(), threading.Event()
    real = datasets.inspect_file

    def held(*args, **kwargs):
        inside.set()
        assert gate.wait(SLOW)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "inspect_file", held)
    app = create_app(make_settings(tmp_path, database_url=db_url, max_concurrent_uploads=1, max_upload_bytes=4096))
    with keyed_client(app) as client:
        yield client, app, inside, gate
    gate.set()


def _upload_dataset(client, data: bytes, name: str = "d.npz"):
    return client.post("/v1/datasets", files={"file": (name, data, "application/octet-stream")})


def test_one_upload_past_the_limit_is_503_with_retry_after_and_the_slot_comes_back(one_slot_client):
    import numpy as np

    client, app, inside, gate = one_slot_client
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=_upload_dataset(client, npz_bytes(x=np.arange(3)))))
    worker.start()
    assert inside.wait(SLOW), "the first upload never reached its check"
    for path, name in (("/v1/datasets", "e.npz"), ("/v1/models", "m.pt2")):  # datasets and models share the slots
        r = client.post(path, files={"file": (name, b"whatever", "application/octet-stream")})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert (
            "GRADTUNE_MAX_CONCURRENT_UPLOADS" in r.json()["detail"] and "try again in 5 seconds" in r.json()["detail"]
        )
    gate.set()
    worker.join(SLOW)
    assert first["r"].status_code == 201, first["r"].text
    r = _upload_dataset(client, npz_bytes(x=np.arange(4)))  # the slot was given back
    assert r.status_code == 201, r.text
    assert temp_files(app) == []


def test_a_refused_or_oversized_upload_gives_its_slot_back(one_slot_client):
    client, app, inside, gate = one_slot_client
    gate.set()
    for _ in range(3):
        r = _upload_dataset(client, b"not a zip")
        assert r.status_code == 422, r.text
        r = _upload_dataset(client, b"\0" * 10_000)  # over max_upload_bytes (4096)
        assert r.status_code == 413, r.text
        r = client.post("/v1/datasets", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415, r.text
    assert stored_files(app) == [] and temp_files(app) == []


def test_the_setting_is_documented_and_at_least_one():
    from pathlib import Path

    from pydantic import ValidationError

    from service.settings import Settings

    assert Settings().max_concurrent_uploads == 4
    with pytest.raises(ValidationError):
        Settings(max_concurrent_uploads=0)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`GRADTUNE_MAX_CONCURRENT_UPLOADS` | 4 |" in readme
