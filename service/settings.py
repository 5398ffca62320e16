"""One validated settings object, read from GRADTUNE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
# The Host header names a loopback-bound API answers by default ([::1] is how a client writes ::1).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADTUNE_", extra="ignore")

    # Where the embedded defaults keep their files (SQLite database, broker folders).
    data_dir: Path = Field(default=Path("./data"))
    # SQLAlchemy URL. Empty means SQLite at <data_dir>/gradtune.db.
    database_url: str = ""
    # Celery broker URL. Empty means the filesystem transport under <data_dir>/broker (no server).
    broker_url: str = ""

    # Request limits (documented in README).
    max_body_bytes: int = 32 * 1024 * 1024
    max_tasks: int = 32  # the held-out benchmark needs about 32 tasks to transfer on its noisiest family
    max_steps: int = 10_000
    max_iterations: int = 1_000
    # one hypergradient through a task's own unroll (its draws batched), by gradtune.spec.costs; also
    # the budget under which method auto takes reverse (worker/runner.meta_config)
    max_unroll_bytes: int = 2 * 1024**3
    # the peak of a whole job as the engine batches it: every task, draw and screened candidate in
    # one unroll, the data, the hypergradient (gradtune.spec.costs); a larger job gets 422
    max_job_memory_bytes: int = 8 * 1024**3
    # the total compute of a whole job (gradtune.spec.costs: every screen, hypergradient and the final
    # evaluation, 2 FLOPs per multiply-add); a larger job gets 422. The default is about an hour of a
    # 2-core CPU (measured on the engine: about 10 GFLOP/s per core in float32, docs/benchmarks.md)
    max_job_flops: float = Field(default=7.2e13, gt=0)
    max_upload_bytes: int = 1024**3  # one dataset file; larger uploads get 413 while streaming
    max_dataset_bytes: int = 4 * 1024**3  # a dataset's values once decoded (npz and parquet compress)
    # Uploads received and checked at once by one API process; one more is answered 503 with Retry-After.
    max_concurrent_uploads: int = Field(default=4, ge=1)

    # Artifact store (uploaded datasets). Empty means file://<data_dir>/artifacts.
    artifact_url: str = ""
    # Endpoint of an S3-compatible service for s3:// artifact URLs (empty: AWS itself).
    s3_endpoint_url: str = ""

    # Long-job profile.
    chunk_iterations: int = 5  # meta-iterations per Celery task
    heartbeat_seconds: float = 5.0  # a running chunk refreshes its claim this often
    stale_after_seconds: float = 30.0  # a claim older than this belongs to a dead worker
    sweep_seconds: float = 10.0  # how often each worker looks for stale or orphaned jobs
    queue_name: str = "gradtune"
    # A chunk's share of time: past it the runner stops the chunk between two iterations (it
    # predicts from the longest iteration so far) and enqueues the next one.
    chunk_seconds: float = Field(default=300.0, gt=0)
    # Deadlines (meta.max_seconds): the default when a job gives none, and the largest accepted.
    default_job_seconds: float = Field(default=3600.0, gt=0)
    max_job_seconds: float = Field(default=86400.0, gt=0)
    # Claims of one iteration that ended without a commit (worker killed, out of memory, ...)
    # before the job fails with "worker lost N times at iteration i".
    max_attempts: int = Field(default=3, ge=1)

    # Workers register in the workers table and refresh it every heartbeat_seconds; one not seen for
    # worker_stale_seconds (database clock) is not live. /readyz answers 503 "no live worker" when
    # none is live, unless ready_needs_worker is false (an API-only deployment).
    worker_stale_seconds: float = Field(default=60.0, gt=0)
    ready_needs_worker: bool = True

    # Prometheus (GET /metrics, service/metrics.py): worker processes write the chunk duration histogram
    # to files in a folder of their host's under this directory, which the API reads at each scrape.
    # Empty means <data_dir>/metrics; API and workers must see the same directory (a shared volume).
    metrics_dir: str = ""

    # Worker
    device: str = "auto"  # auto | cpu | cuda
    torch_threads: int = 1

    # Log lines (service/logs.py): json (one object per line) or console. Unset: console for
    # `gradtune serve` and the workers, and a plain `uvicorn --factory service.main:create_app` keeps
    # uvicorn's own logging; set, create_app configures it (uvicorn's lines included).
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    # Host headers the API answers (DNS rebinding: a web page whose name resolves to 127.0.0.1 must
    # not reach a local server). Unset: the loopback names, and "*" (any) when ``host`` is not a
    # loopback address (``gradtune serve --host 0.0.0.0``). Comma-separated in the environment.
    allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    # Origins a browser may call the API from (CORS); none unless configured. Comma-separated.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Keys and tenants (service/keys.py). A key is looked up in the database at most once per
    # key_cache_seconds per API process: a revoked key stops working within that time.
    key_cache_seconds: float = Field(default=2.0, ge=0)
    # GET /v1/jobs/{id}: polls of one job that arrive while its status is being read share that
    # read; with this > 0 an answer is also kept that long per process (a cancel through the same
    # process drops it at once). service/api/status_cache.py; docs/benchmarks.md "Load".
    status_cache_seconds: float = Field(default=0.0, ge=0)
    # How often an open GET /v1/jobs/{id}/events stream reads its job for new iterations.
    events_poll_seconds: float = Field(default=0.5, gt=0)
    # Per-tenant quotas (defaults; ``gradtune keys quota`` overrides them per tenant).
    tenant_max_active_jobs: int = Field(default=100, ge=0)  # queued + running; one more: 429
    tenant_max_stored_bytes: int = Field(default=20 * 1024**3, ge=0)  # datasets + models; past it: 413
    tenant_max_concurrent_uploads: int = Field(default=2, ge=0)  # uploads in progress; one more: 429
    # The concurrent-upload quota counts rows in the database (service/upload_quota.py), so it holds
    # across API processes; a row stops counting this long after its upload began (a process that
    # died mid-upload cannot hold the tenant's quota longer).
    upload_slot_seconds: float = Field(default=3600.0, gt=0)

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return (value.strip().lower() or None) if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def resolved_allowed_hosts(self) -> list[str]:
        """``allowed_hosts``, or its default for the address the API is bound to."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if self.host in LOOPBACK_ADDRESSES or self.host == "localhost":
            return list(LOOPBACK_NAMES)
        return ["*"]

    def job_seconds(self, requested: float | None) -> float:
        """A job's deadline: what it asked for, else the default (never above the ceiling)."""
        return float(requested) if requested is not None else min(self.default_job_seconds, self.max_job_seconds)

    def visibility_timeout_seconds(self) -> float:
        """How long Redis waits before it redelivers a message a worker took but never acknowledged,
        and how old an outstanding message may get before the sweep presumes it lost.

        A chunk lasts its share (``chunk_seconds``) plus at most one iteration, since the runner
        stops between iterations; this is four shares, and at least an hour. A redelivered message
        finds the lease still held and does nothing, so a chunk outlasting it wastes no work.
        """
        return max(3600.0, 4.0 * self.chunk_seconds)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gradtune.db').resolve()}"

    def resolved_artifact_url(self) -> str:
        if self.artifact_url:
            return self.artifact_url
        return (self.data_dir / "artifacts").resolve().as_uri()

    def artifact_store(self):
        """The store named by ``resolved_artifact_url()`` (service.storage; opens no connection)."""
        from service.storage import open_store

        return open_store(self.resolved_artifact_url(), s3_endpoint_url=self.s3_endpoint_url or None)

    def resolved_metrics_dir(self) -> Path:
        return Path(self.metrics_dir).resolve() if self.metrics_dir else (self.data_dir / "metrics").resolve()

    def tmp_dir(self) -> Path:
        """Where uploads are spooled while they stream in (created on demand)."""
        return (self.data_dir / "tmp").resolve()

    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_transport_options(self) -> dict:
        if self.resolved_broker_url().startswith("filesystem://"):
            folder = (self.data_dir / "broker").resolve()
            return {
                "data_folder_in": str(folder / "queue"),
                "data_folder_out": str(folder / "queue"),
                "processed_folder": str(folder / "processed"),
                "control_folder": str(folder / "control"),
                "store_processed": False,
                "polling_interval": 0.2,
            }
        return {}

    def ensure_dirs(self) -> None:
        if not self.database_url or self.resolved_broker_url().startswith("filesystem://"):
            self.data_dir.mkdir(parents=True, exist_ok=True)
        opts = self.broker_transport_options()
        for key in ("data_folder_in", "processed_folder", "control_folder"):
            if key in opts:
                Path(opts[key]).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
