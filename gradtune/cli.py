"""The ``gradtune`` command: run the service (serve, worker, migrate) and talk to it (submit, status, ...)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from gradtune.extras import fail, require
from gradtune.keys_cli import keys_cli

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def worker_argv(queue: str, loglevel: str = "INFO", quiet: bool = False) -> list[str]:
    """The command line of one worker process (solo pool: one chunk at a time, one device);
    ``quiet``: without Celery's start banner (JSON log lines only)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        *(["--quiet"] if quiet else []),
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        queue,
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        loglevel,
    ]


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    require("migrate", "api")
    from service.db.migrate import upgrade
    from service.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url())
    typer.echo(f"database at head: {_redact(settings.resolved_database_url())}")


@cli.command()
def worker(
    loglevel: str | None = typer.Option(None, help="Log level (default GRADTUNE_LOG_LEVEL, INFO).", show_default=False),
    device: str | None = typer.Option(
        None,
        "--device",
        help="cuda: take cuda and auto jobs (refused without CUDA); cpu: take cpu and auto jobs; auto: cuda "
        "when available (default GRADTUNE_DEVICE, auto).",
        show_default=False,
    ),
) -> None:
    """Run one worker process: it drains its device's queue and the shared one, one chunk at a time."""
    require("worker", "worker")
    from service.settings import get_settings

    if device is not None:
        from worker.device import DeviceUnavailable, resolve

        _check_device(device, resolve, DeviceUnavailable)
        os.environ["GRADTUNE_DEVICE"] = device  # the worker process reads it (worker/device.py)
        get_settings.cache_clear()
    settings = get_settings()
    settings.ensure_dirs()
    argv = worker_argv(settings.queue_name, loglevel or settings.log_level, quiet=settings.log_format == "json")
    os.execv(argv[0], argv)


def _check_device(device: str, resolve: Any, unavailable: type[Exception]) -> None:
    """Refuse an unknown --device, and --device cuda on a machine without CUDA (worker.device's
    resolve raises ``unavailable``), before starting Celery."""
    from gradtune.spec.devices import JOB_DEVICES

    if device not in JOB_DEVICES:
        _fail(ValueError(f"--device must be one of {', '.join(JOB_DEVICES)}, not {device!r}"))
    if device == "cuda":
        try:
            resolve(device)
        except unavailable as exc:
            _fail(exc)


@cli.command()
def serve(
    host: str | None = typer.Option(None, help="Bind address (default GRADTUNE_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default GRADTUNE_PORT, 8000)."),
    workers: int = typer.Option(1, min=0, help="Embedded worker processes to start (0: none)."),
) -> None:
    """API on :8000 plus embedded workers, restarted when they die; SQLite and a server-less broker
    unless configured. Exits 1 when a worker cannot start at all; stops its workers when it stops."""
    require("serve", *(("api", "worker") if workers else ("api",)))
    import uvicorn

    from gradtune.supervisor import Supervisor
    from service.db.migrate import upgrade
    from service.logs import configure_logging
    from service.main import create_app
    from service.settings import get_settings

    settings = get_settings()
    configure_logging(settings)  # uvicorn's lines too: it is given no logging config of its own
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url())
    _first_admin_key(settings)
    bind = host or settings.host
    if settings.allowed_hosts is None and bind != settings.host:  # the allowlist follows --host
        settings = settings.model_copy(update={"host": bind})
    config = uvicorn.Config(
        create_app(settings), host=bind, port=port or settings.port, timeout_graceful_shutdown=5, log_config=None
    )
    server = uvicorn.Server(config)
    json_logs = settings.log_format == "json"
    supervisor = Supervisor(
        worker_argv(settings.queue_name, settings.log_level, quiet=json_logs),
        workers,
        on_fatal=lambda _reason: setattr(server, "should_exit", True),
        **({"log": _serve_log().warning} if json_logs else {}),
    )
    stopped_by = _stop_on_signals(server, supervisor)
    _say(
        settings,
        f"gradtune: database {_redact(settings.resolved_database_url())}, "
        f"broker {_redact(settings.resolved_broker_url())}, {workers} embedded worker(s)",
    )
    if workers:
        supervisor.start()
    try:
        server.run()
    finally:
        supervisor.stop()
    if supervisor.fatal:
        _fail(RuntimeError(f"{supervisor.fatal}; stopping"))
    if stopped_by:  # die by the signal, as uvicorn alone would, now that the workers are gone
        signal.signal(stopped_by[0], signal.SIG_DFL)
        signal.raise_signal(stopped_by[0])


def _first_admin_key(settings) -> None:
    """On first start (no key in the database): tenant default, an admin key printed once and
    written to <data_dir>/admin.key (mode 0600), which the CLI on this machine reads by itself."""
    require("serve", "api")
    from service.db.session import scoped_session
    from service.keys import first_admin_key

    with scoped_session(settings.resolved_database_url()) as session:
        made = first_admin_key(session, settings.data_dir)
    if made is not None:
        path, key = made
        if settings.log_format == "json":  # log lines get shipped and kept: the key stays in its file
            _serve_log().warning(  # at WARNING: shown at every log level
                "gradtune: created tenant default and its admin key, written to %s (mode 0600; not logged)", path
            )
            return
        typer.echo(f"gradtune: created tenant default and its admin key, written to {path} (mode 0600):")
        typer.echo(key)


def _serve_log():
    import logging

    return logging.getLogger("gradtune.serve")


def _say(settings, message: str) -> None:
    """serve's words to whoever started it: plain on stdout, or a log line (JSON, on standard error,
    with every other line) under GRADTUNE_LOG_FORMAT=json."""
    if settings.log_format == "json":
        _serve_log().info(message)
    else:
        typer.echo(message)


def _stop_on_signals(server, supervisor) -> list[int]:
    """SIGTERM and SIGINT make uvicorn exit and start stopping the workers at once; the returned list
    collects the signals received. (uvicorn installs its own handlers while it serves and re-raises
    the signal at its end: with the default handler there, serve died before stopping its workers.)"""
    received: list[int] = []

    def handle(sig: int, _frame: object) -> None:
        received.append(sig)
        server.should_exit = True
        supervisor.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return received


DEFAULT_URL = "http://localhost:8000"
KEY_HELP = "API key (default: GRADTUNE_API_KEY, else <GRADTUNE_DATA_DIR>/admin.key for a server on this machine)."
# A subcommand's own --url / --key (None when not on its command line) win over the ones given before
# the subcommand, which default to the environment variables (see _global_options).
URL = typer.Option(
    None, "--url", help=f"The gradtune API (default: GRADTUNE_URL, else {DEFAULT_URL}).", show_default=False
)
KEY = typer.Option(None, "--key", help=KEY_HELP, show_default=False)
_GLOBAL: dict[str, str | None] = {}


@cli.callback()
def _global_options(
    url: str = typer.Option(
        DEFAULT_URL, "--url", envvar="GRADTUNE_URL", help="The gradtune API, for every subcommand."
    ),
    key: str | None = typer.Option(
        None, "--key", envvar="GRADTUNE_API_KEY", help=KEY_HELP + " For every subcommand.", show_default=False
    ),
) -> None:
    """--url and --key before the subcommand: ``gradtune --url U --key K status ID``."""
    _GLOBAL.clear()
    _GLOBAL.update(url=url, key=key)


@contextmanager
def _api(url: str | None, key: str | None = None) -> Iterator:
    """A client whose refused requests end the command: exit 1 with the server's message. ``url`` and
    ``key``: the subcommand's own options, else the global ones."""
    from gradtune.client import Client, GradtuneError

    url = url or _GLOBAL.get("url") or os.environ.get("GRADTUNE_URL") or DEFAULT_URL
    key = key or _GLOBAL.get("key")
    with Client(url, api_key=key) as client:
        try:
            yield client
        except GradtuneError as exc:
            _fail(exc)


def _fail(exc: Exception) -> None:
    fail(str(exc))


def _job_line(job: dict) -> str:
    p = job["progress"]
    parts = [f"{job['id']}  {job['status']:<9}  {job['name']}  {p['iteration']}/{p['iterations']}"]
    if p.get("meta_loss") is not None:
        parts.append(f"meta-loss {p['meta_loss']:.4g}")
    if p.get("lr") is not None:
        parts.append(f"lr {p['lr']:.4g}  momentum {p['momentum']:.4g}")
    if job.get("device", "auto") != "auto":
        parts.append(f"device {job['device']}")
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    if job.get("waiting"):
        parts.append(job["waiting"])
    return "  ".join(parts)


class _NoWorkerNotice:
    """Says once, on stderr, that a job waits while no worker takes it: the job's ``waiting`` (e.g. a
    cuda job with no live GPU worker), or, from a server whose bodies lack it, no live worker at all
    (GET /v1/workers), checked every ``every`` seconds while the job has not ended."""

    def __init__(self, client, every: float = 10.0) -> None:
        self.client, self.every = client, every
        self.said, self.next_check = False, 0.0

    def __call__(self, job: dict) -> None:
        from gradtune.client import TERMINAL, GradtuneError

        if self.said or job["status"] in TERMINAL:
            return
        if "waiting" in job:  # the server says what the job waits for, if anything
            if job["waiting"]:
                self.said = True
                typer.echo(f"gradtune: job {job['id']} is {job['status']}, {job['waiting']}", err=True)
            return
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.every
        try:
            body = self.client.workers(limit=1)
        except GradtuneError:  # an older server without /v1/workers, or a hiccup: say nothing
            return
        if body.get("live", 1) == 0:
            self.said = True
            typer.echo(
                f"gradtune: job {job['id']} is {job['status']} and there is no live worker (none seen in the "
                f"last {body.get('stale_after_seconds', 0):g} s); it waits until one starts "
                "(gradtune worker, or gradtune serve)",
                err=True,
            )


def _wait(client, job_id: str, timeout: float | None = None) -> dict:
    from gradtune.progress import job_progress

    notice = _NoWorkerNotice(client)
    last: dict = {"status": "queued"}

    def on_progress(job: dict) -> None:
        last.update(job)
        show(job)
        notice(job)

    try:
        with job_progress(job_id) as show:
            return client.wait(job_id, timeout=timeout, on_progress=on_progress)
    except TimeoutError:
        _fail(
            TimeoutError(
                f"timed out after {timeout:g} s: job {job_id} is still {last['status']} (it goes on; "
                f"follow it with: gradtune status {job_id})"
            )
        )
        raise  # unreachable: _fail exits


@cli.command()
def submit(
    job_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A job body (JSON)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it ends."),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0, help="With --wait: give up after this many seconds (exit 1; the job goes on)."
    ),
    device: str | None = typer.Option(
        None,
        "--device",
        help="auto, cpu or cuda: where the job runs (instead of the body's device; default auto).",
        show_default=False,
    ),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Submit a tuning job; prints its id (and, with --wait, follows it to the end: exit 1 unless it
    succeeded, or when --timeout runs out). Says on stderr when no worker takes it (a cuda job with
    no live GPU worker, or no live worker at all)."""
    if timeout is not None and not wait:
        _fail(ValueError("--timeout goes with --wait"))
    try:
        body = json.loads(job_file.read_text())
    except ValueError as exc:
        _fail(ValueError(f"{job_file} is not valid JSON: {exc}"))
    if device is not None and isinstance(body, dict):
        body["device"] = device  # the server checks it (422 naming `device`)
    with _api(url, key) as client:
        job = client.submit(body)
        typer.echo(job["id"])
        if wait:
            job = _wait(client, job["id"], timeout)
            typer.echo(_job_line(job))
            if job["status"] != "succeeded":
                raise typer.Exit(1)


@cli.command()
def status(job_id: str, url: str | None = URL, key: str | None = KEY) -> None:
    """Status and progress of one job."""
    with _api(url, key) as client:
        typer.echo(_job_line(client.job(job_id)))


@cli.command()
def jobs(
    status: str | None = typer.Option(None, help="Only jobs with this status."),
    study: str | None = typer.Option(None, help="Only the jobs of this study (its id)."),
    limit: int = typer.Option(20, help="How many (1..100)."),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Jobs, newest first."""
    with _api(url, key) as client:
        page = client.jobs(status=status, limit=limit, study=study)
    for job in page["items"]:
        typer.echo(_job_line(job))


@cli.command()
def settings(
    job_id: str,
    format: str = typer.Option("json", "--format", help="json, or python: the torch code that builds the optimizer."),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """The learned settings of a succeeded job."""
    _print_settings(format, url, key, lambda client: client.settings(job_id))


def _print_settings(format: str, url: str | None, key: str | None, fetch: Any) -> None:
    """Print the settings ``fetch(client)`` returns (TunedSettings) as JSON or as the torch code."""
    if format not in ("json", "python"):
        _fail(ValueError(f"--format must be json or python, not {format!r}"))
    with _api(url, key) as client:
        s = fetch(client)
    typer.echo(json.dumps(s.raw, indent=2) if format == "json" else s.python().rstrip())


@cli.command()
def cancel(job_id: str, url: str | None = URL, key: str | None = KEY) -> None:
    """Cancel a job (a running one stops within one heartbeat, between evaluations)."""
    with _api(url, key) as client:
        typer.echo(_job_line(client.cancel(job_id)))


datasets_cli = typer.Typer(no_args_is_help=True, help="Upload and list datasets.")
cli.add_typer(datasets_cli, name="datasets")


@datasets_cli.command("upload")
def datasets_upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A .safetensors, .npz, .csv or .parquet file."),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Upload a dataset file; prints its id and the tensors or columns found."""
    with _api(url, key) as client:
        ds = client.upload_dataset(file)
    typer.echo(ds["id"])
    for item in ds.get("tensors") or ds.get("columns") or []:
        typer.echo(f"  {item['name']}  {item['dtype']}  {tuple(item['shape'])}")


@datasets_cli.command("list")
def datasets_list(url: str | None = URL, key: str | None = KEY) -> None:
    """Datasets, newest first."""
    with _api(url, key) as client:
        page = client.datasets()
    for ds in page["items"]:
        typer.echo(f"{ds['id']}  {ds['format']:<11}  {ds['size']:>10}  {ds['filename']}")


cli.add_typer(keys_cli, name="keys")

studies_cli = typer.Typer(no_args_is_help=True, help="Studies: settings that keep learning across jobs.")
cli.add_typer(studies_cli, name="studies")


@studies_cli.command("create")
def studies_create(
    name: str = typer.Option("study", help="A name."),
    lr: float = typer.Option(0.01, help="Starting learning rate."),
    momentum: float = typer.Option(0.9, help="Starting momentum."),
    per_layer: bool = typer.Option(False, help="One lr and momentum per layer."),
    schedule_segments: int = typer.Option(1, help="Values shared over this many blocks of steps."),
    holdout_every: int = typer.Option(4, help="Every k-th task to join is held out (never trained on)."),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Create a study; prints its id (name it in a job: "study": "<id>")."""
    with _api(url, key) as client:
        study = client.create_study(
            name,
            lr=lr,
            momentum=momentum,
            per_layer=per_layer,
            schedule_segments=schedule_segments,
            holdout_every=holdout_every,
        )
    typer.echo(study["id"])


def _study_line(s: dict) -> str:
    pool, st = s["pool"], s["settings"]
    return (
        f"{s['id']}  {s['name']}  version {s['version']}  jobs {s['jobs']}  tasks {pool['tasks']} "
        f"({pool['held_out']} held out)  lr={st['lr']:.4g} momentum={st['momentum']:.4g}"
    )


@studies_cli.command("list")
def studies_list(url: str | None = URL, key: str | None = KEY) -> None:
    """Studies, newest first."""
    with _api(url, key) as client:
        page = client.studies()
    for s in page["items"]:
        typer.echo(_study_line(s))


@studies_cli.command("show")
def studies_show(study_id: str, url: str | None = URL, key: str | None = KEY) -> None:
    """A study, and how its settings changed with each job."""
    with _api(url, key) as client:
        typer.echo(_study_line(client.study(study_id)))
        for h in client.study_history(study_id):
            a, held = h["after"], h.get("held_out_mean_val_loss")
            typer.echo(
                f"  v{h['version']}  after job {h['job_id']}: lr={a['lr']:.4g} momentum={a['momentum']:.4g}"
                + (f"  held-out loss {held:.4g}" if held is not None else "")
            )


@studies_cli.command("settings")
def studies_settings(
    study_id: str,
    format: str = typer.Option("json", "--format", help="json, or python: the torch code that builds the optimizer."),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """The study's current settings, with their evaluation on its held-out tasks."""
    _print_settings(format, url, key, lambda client: client.study_settings(study_id))


models_cli = typer.Typer(no_args_is_help=True, help="Upload and list exported models (.pt2).")
cli.add_typer(models_cli, name="models")


@models_cli.command("upload")
def models_upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A .pt2 archive written by torch.export.save."),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Upload an exported model; prints its id, the example shape, outputs and parameters."""
    with _api(url, key) as client:
        m = client.upload_model(file)
    typer.echo(m["id"])
    typer.echo(f"  input {tuple(m['input_shape'])} -> {m['output_width']} outputs: {' '.join(m['operators'])}")
    for p in m["parameters"]:
        typer.echo(f"  {p['name']}  {p['dtype']}  {tuple(p['shape'])}")


@models_cli.command("list")
def models_list(url: str | None = URL, key: str | None = KEY) -> None:
    """Uploaded models, newest first."""
    with _api(url, key) as client:
        page = client.models()
    for m in page["items"]:
        shape = str(tuple(m["input_shape"]))
        typer.echo(f"{m['id']}  {shape:<14} -> {m['output_width']:<4} {m['size']:>10}  {m['filename']}")


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
