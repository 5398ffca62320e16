"""GET /metrics: Prometheus' text exposition format, without a key (like the probes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.metrics import metrics_of

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Jobs by status, the queue depth, live workers, meta-iterations and evaluations committed "
    "(counters), the workers' chunk durations and this API's request latencies (histograms), in Prometheus' "
    "text format. The database's values are read at each scrape; `gradtune_database_up` is 0 when it "
    "could not be read. No key: it names no job, tenant or id.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "The metrics."}},
)
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, metrics_of(request.app.state).registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
