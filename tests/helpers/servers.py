"""Throwaway Redis and PostgreSQL servers a test owns, on free loopback ports, to kill and restart.

The machine's shared servers (127.0.0.1:6379 and :5432) are never touched: the chaos tests
(tests/e2e/test_chaos.py) stop and restart these private ones instead.

* ``RedisServer``: ``redis-server`` in the foreground, no persistence (a restart loses every
  message, as a crashed broker without persistence would).
* ``PostgresServer``: a private cluster made by ``initdb`` in a fresh folder under /tmp, trust
  auth, run by ``pg_ctl``. PostgreSQL refuses to run as root, so as root both run as the
  ``postgres`` user (``runuser -u postgres --``) on a folder it owns.

``missing_redis()`` / ``missing_postgres()`` say why a server cannot be started here (None: it can).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.net import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing_redis() -> str | None:
    return None if os.access(REDIS_SERVER, os.X_OK) else f"redis-server not found ({REDIS_SERVER})"


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def missing_postgres() -> str | None:
    bindir = _pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        return "PostgreSQL server binaries (initdb, pg_ctl) not found"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _uid("postgres") is None):
        return "running as root without runuser or a postgres user to run PostgreSQL as"
    return None


def _uid(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``; ``stop()`` kills it (SIGKILL), ``start()`` brings it back."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = Path(log_dir) / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--daemonize", "no"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: _port_open(self.port) or self.proc.poll() is not None, timeout, f"redis on {self.port}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
        self.starts += 1
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1:``port`` (trust auth, user ``postgres``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        bindir = _pg_bin()
        assert bindir is not None, missing_postgres()
        self.bindir = bindir
        # Under /tmp, not pytest's tmp_path: the postgres user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="gradtune-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.starts = 0
        if os.geteuid() == 0:
            uid = _uid("postgres")
            assert uid is not None
            os.chown(self.root, uid, -1)
        os.chmod(self.root, 0o700)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", timeout=120)

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        argv = [*_as_postgres(), str(self.bindir / tool), *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")

    def _ctl(self, action: str, *extra: str) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", opts, "-w", *extra, action)

    def start(self) -> PostgresServer:
        self._ctl("start")
        _wait(lambda: _port_open(self.port), 30, f"postgres on {self.port}")
        self.starts += 1
        return self

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: every backend dies at once, no clean shutdown (a crash, as far as clients see)."""
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", mode)

    def restart(self, down_seconds: float = 0.0, mode: str = "immediate") -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.database_url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
