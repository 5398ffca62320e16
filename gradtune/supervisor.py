"""Keeps ``gradtune serve``'s embedded worker processes alive (standard library only).

A ``Supervisor`` runs a thread that starts ``count`` copies of one command and watches them:

* A worker that dies is started again after a pause that doubles with each death that came soon
  after its start (``initial_backoff``, 2x, 4x, ... capped at ``max_backoff``) and goes back to
  ``initial_backoff`` once a worker has lived ``healthy_after`` seconds. Every death is logged with
  its exit code or the signal that killed it.
* A worker that cannot start at all (the command is missing, or it dies ``max_quick_deaths`` times
  in a row each within ``start_window`` seconds of its start) is fatal: the supervisor stops its
  workers, keeps the reason in ``fatal`` and calls ``on_fatal(reason)`` (serve then exits 1 with it).
* ``stop()`` sends SIGTERM to every worker (a Celery worker finishes its chunk), waits up to
  ``stop_timeout`` seconds and SIGKILLs what is left.
* Each worker also dies with the supervisor's process: it starts through a small launcher that asks
  Linux for SIGKILL when its parent goes (``prctl(PR_SET_PDEATHSIG)``), then ``exec``s the command,
  so even a ``kill -9`` of serve leaves no orphan. Each worker runs in its own session, so a Ctrl-C
  in the terminal reaches serve only, and serve stops its workers itself.

All processes are started and stopped from the supervisor's own thread: Linux ties PDEATHSIG to the
thread that forked, which lives until every worker is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

# Run as ``python -c LAUNCHER <parent pid> <argv...>``: die with the parent, then become argv.
LAUNCHER = """\
import os, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    import ctypes, signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
if os.getppid() != parent:
    sys.exit("gradtune: the supervising process is gone; not starting")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def launcher_argv(argv: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """The command line that runs ``argv`` as a process that dies with ``parent_pid`` (default: us)."""
    return [sys.executable, "-c", LAUNCHER, str(parent_pid or os.getpid()), *argv]


def describe_exit(returncode: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` (Popen reports a signal as a negative code)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _stderr(message: str) -> None:
    print(f"gradtune serve: {message}", file=sys.stderr, flush=True)


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = 0.0  # when to start it (0: at once; None: not to be started)
    deaths: int = 0  # deaths since a worker here last lived healthy_after seconds (drives the backoff)
    quick_deaths: int = 0  # consecutive deaths within start_window of their start (fatal at the limit)
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        count: int = 1,
        *,
        name: str = "worker",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
        start_window: float = 20.0,
        max_quick_deaths: int = 5,
        stop_timeout: float = 5.0,
        poll_interval: float = 0.2,
        die_with_parent: bool = True,
        log: Callable[[str], None] = _stderr,
        on_fatal: Callable[[str], None] | None = None,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.env, self.cwd = env, cwd
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self.healthy_after, self.start_window = healthy_after, start_window
        self.max_quick_deaths = max_quick_deaths
        self.stop_timeout, self.poll_interval = stop_timeout, poll_interval
        self.die_with_parent = die_with_parent
        self.log, self.on_fatal = log, on_fatal
        self.stdout, self.stderr = stdout, stderr
        self.fatal: str | None = None
        self._slots = [_Slot(i + 1) for i in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradtune-supervisor", daemon=True)

    # ------------------------------------------------------------------ public

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Begin stopping (from a signal handler: does not wait); ``stop()`` waits for the end."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching, SIGTERM the workers, SIGKILL those still there after ``stop_timeout``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout if timeout is not None else self.stop_timeout + 10)

    def pids(self) -> list[int | None]:
        """The pid of each slot's current process (None while it waits for its restart)."""
        return [s.proc.pid if s.proc is not None and s.proc.poll() is None else None for s in self._slots]

    def restarts(self) -> list[int]:
        return [s.restarts for s in self._slots]

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.fatal is None:
                self.check(time.monotonic())
                self._stop.wait(self.poll_interval)
        finally:
            self._terminate_all()
        if self.fatal is not None and self.on_fatal is not None:
            self.on_fatal(self.fatal)

    def check(self, now: float) -> None:
        """One round: note the workers that died, start those whose time has come."""
        for slot in self._slots:
            if slot.proc is not None:
                code = slot.proc.poll()
                if code is None:
                    continue
                self._died(slot, code, now)
            if self.fatal is not None:
                return
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot, now)

    def _spawn(self, slot: _Slot, now: float) -> None:
        if shutil.which(self.argv[0]) is None:  # the launcher would only find out after its exec
            self._give_up(f"{self.name} {slot.index} cannot start: {self.argv[0]} is not an executable")
            return
        argv = launcher_argv(self.argv) if self.die_with_parent else self.argv
        try:
            slot.proc = subprocess.Popen(
                argv, env=self.env, cwd=self.cwd, stdout=self.stdout, stderr=self.stderr, start_new_session=True
            )
        except OSError as exc:
            self._give_up(f"{self.name} {slot.index} cannot start: {self.argv[0]}: {exc}")
            return
        if slot.started:
            slot.restarts += 1
        slot.started, slot.restart_at = now, None
        self.log(f"{self.name} {slot.index} started (pid {slot.proc.pid})")

    def _died(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.proc is not None
        pid, lived = slot.proc.pid, now - slot.started
        slot.proc = None
        why = describe_exit(code)
        slot.deaths = 1 if lived >= self.healthy_after else slot.deaths + 1
        slot.quick_deaths = slot.quick_deaths + 1 if lived < self.start_window else 0
        if slot.quick_deaths >= self.max_quick_deaths:
            self._give_up(
                f"{self.name} {slot.index} cannot start: it died {slot.quick_deaths} times in a row within "
                f"{self.start_window:g} s of starting (last: pid {pid}, {why}); see its output above"
            )
            return
        delay = min(self.max_backoff, self.initial_backoff * 2 ** (slot.deaths - 1))
        slot.restart_at = now + delay
        self.log(f"{self.name} {slot.index} (pid {pid}) died after {lived:.1f} s: {why}; restarting in {delay:g} s")

    def _give_up(self, reason: str) -> None:
        self.fatal = reason
        self.log(reason)
        self._stop.set()

    def _terminate_all(self) -> None:
        alive = [s.proc for s in self._slots if s.proc is not None and s.proc.poll() is None]
        for p in alive:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in alive:
            if p.poll() is None:
                self.log(f"{self.name} pid {p.pid} still there {self.stop_timeout:g} s after SIGTERM: SIGKILL")
                _signal_group(p, signal.SIGKILL)
        for p in alive:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait
                pass
        for s in self._slots:
            s.proc = None


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal the worker's process group (it leads one: start_new_session), else the worker alone."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
