"""Schemathesis over the whole OpenAPI: no input gives a server error (5xx).

Every operation of ``/openapi.json`` is driven with requests schemathesis generates from the
schema: valid ones (positive mode) and ones that break it (negative mode: wrong types, values out
of range, missing fields, control characters...), seeded (``derandomize``), on a migrated SQLite
and PostgreSQL database. The operations that take an id also run with the ids of a job, a dataset
and a model that exist. Each response goes through schemathesis's ``not_a_server_error`` check.
Nothing is excluded: the multipart uploads (``POST /v1/datasets``, ``/v1/models``) get the
multipart bodies schemathesis generates from their request schema. Negative mode is skipped only
where schemathesis finds nothing that breaks the schema (``/healthz``, ``/readyz``, ``/metrics`` take no
input).

Counts are printed (``pytest -s``); the test asserts at least 1,000 requests, every operation
reached, and 0 server errors. About 25-35 s per database on 2 cores.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from sqlalchemy.orm import Session

from service import repository
from service.main import create_app
from tests.helpers.support import api_key, bearer
from tests.service.conftest import job_body

# max_examples per (operation, mode): 17 operations, two modes, plus the existing-id pass.
EXAMPLES = 34
EXISTING_ID_EXAMPLES = 5
MIN_REQUESTS = 1000


def _seed(app) -> dict[str, str]:
    """A job, a dataset, a model and a study that exist, so some requests find something."""
    from tests.helpers.support import keyed_client

    with keyed_client(app) as client:
        job = client.post("/v1/jobs", json=job_body())
        assert job.status_code == 202, job.text
        ds = client.post("/v1/datasets", files={"file": ("d.csv", b"a,b,y\n0,1,0\n1,0,1\n1,1,0\n0,0,1\n")})
        assert ds.status_code == 201, ds.text
        study = client.post("/v1/studies", json={"name": "fuzz"})
        assert study.status_code == 201, study.text
    with Session(app.state.engine) as session:
        model = repository.create_model(
            session,
            filename="m.pt2",
            sha256="0" * 64,
            size=1,
            program={
                "input_shape": [2],
                "output_width": 2,
                "operators": ["linear"],
                "nodes": [{"op": "linear", "output_shape": [2], "parameters": ["0.weight", "0.bias"]}],
                "parameters": [
                    {"name": "0.weight", "shape": [2, 2], "dtype": "float32"},
                    {"name": "0.bias", "shape": [2], "dtype": "float32"},
                ],
                "parameter_count": 6,
                "default_init": True,
            },
        )
        session.commit()
        model_id = model.id
    return {
        "job_id": job.json()["id"],
        "dataset_id": ds.json()["id"],
        "model_id": model_id,
        "study_id": study.json()["id"],
    }


def _run(operation, mode: GenerationMode, examples: int, record, headers: dict[str, str], **fixed: Any) -> bool:
    """Drive one operation in one mode; False when schemathesis could generate nothing for it."""

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @hsettings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def drive(case) -> None:
        try:
            response = case.call(headers=headers)
        except Exception as exc:  # an unhandled exception the test transport re-raised: a 500
            record(operation.label, mode.value, 500, f"raised {type(exc).__name__}: {exc}", case)
            return
        try:
            case.validate_response(response, checks=[not_a_server_error])
            failure = None
        except Exception as exc:  # schemathesis's failure (group): a server error
            failure = f"{type(exc).__name__}: {exc}"
        record(operation.label, mode.value, response.status_code, failure, case)

    try:
        drive()
    except Unsatisfiable:
        return False
    return True


def test_no_server_error_from_generated_requests(tmp_path, db_url, make_settings, capsys):
    app = create_app(make_settings(tmp_path, database_url=db_url))
    ids = _seed(app)
    headers = bearer(api_key(app))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: collections.Counter = collections.Counter()
    per_operation: collections.Counter = collections.Counter()
    errors: list[str] = []

    def record(label: str, mode: str, status: int, failure: str | None, case) -> None:
        statuses[status] += 1
        per_operation[label] += 1
        if failure is not None or status >= 500:
            errors.append(f"{label} [{mode}] -> {status}: {case.as_curl_command()[:400]}\n  {failure}")

    started = time.monotonic()
    labels, skipped = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if not _run(operation, mode, EXAMPLES, record, headers):
                skipped.append(f"{operation.label} [{mode.value}]")
        names = [p.name for p in operation.path_parameters]
        if names:
            fixed = {name: ids[name] for name in names}
            _run(operation, GenerationMode.POSITIVE, EXISTING_ID_EXAMPLES, record, headers, path_parameters=fixed)
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    with capsys.disabled():
        print(
            f"\nfuzz ({db_url.split(':', 1)[0]}): {total} requests over {len(labels)} operations in {elapsed:.1f}s, "
            f"{len(errors)} server errors; statuses {dict(sorted(statuses.items()))}"
        )
        for label in labels:
            print(f"  {per_operation[label]:5d}  {label}")
        if skipped:
            print("  no negative case could be generated for: " + ", ".join(skipped))
        for line in errors[:20]:
            print("  " + line)
    assert not errors, f"{len(errors)} server errors, first: {errors[0]}"
    assert total >= MIN_REQUESTS
    assert all(per_operation[label] > 0 for label in labels), per_operation
    assert any(s == 202 for s in statuses), "no generated job was accepted: the positive mode reached no handler"
