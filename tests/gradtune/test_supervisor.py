"""gradtune.supervisor with real processes: fake workers (python -c ...) that sleep, exit or crash.

A worker that dies is restarted (new pid) with a doubling, capped pause and its exit code or signal
logged; one that cannot start is fatal with the reason; stop() leaves no process (SIGTERM, then
SIGKILL); a worker dies with its supervising process even when that one is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradtune.supervisor import Supervisor, describe_exit, launcher_argv

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
CRASHER = [sys.executable, "-c", "import sys; sys.exit(3)"]
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)",
]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")


class Log:
    """A log callback that keeps (time, message) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            self.lines.append((time.monotonic(), message))

    def text(self) -> str:
        return "\n".join(m for _, m in self.lines)

    def matching(self, pattern: str) -> list[tuple[float, re.Match]]:
        with self._lock:
            return [(t, m) for t, line in self.lines if (m := re.search(pattern, line))]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fast(argv, count: int = 1, **kw) -> tuple[Supervisor, Log]:
    log = Log()
    options = dict(initial_backoff=0.05, max_backoff=0.4, poll_interval=0.02, stop_timeout=2.0, log=log)
    options.update(kw)
    return Supervisor(argv, count, **options), log


def test_describe_exit_names_the_code_or_the_signal():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"
    assert describe_exit(-200) == "killed by signal 200"


def test_a_killed_worker_is_restarted_with_a_new_pid_and_the_signal_is_logged():
    sup, log = fast(SLEEPER, count=2)
    with sup:
        first = wait_for(lambda: all(sup.pids()) and sup.pids(), 10, "two workers")
        killed_at = time.monotonic()
        os.kill(first[0], signal.SIGKILL)
        new = wait_for(lambda: (p := sup.pids())[0] not in (None, first[0]) and p, 10, "the restart")
        latency = time.monotonic() - killed_at
        assert new[1] == first[1], "the other worker was left alone"
        assert sup.restarts() == [1, 0]
        assert not alive(first[0])
        print(f"restart latency after kill -9: {latency:.2f} s")
        assert latency < 2.0
    assert f"worker 1 (pid {first[0]}) died after" in log.text()
    assert "killed by SIGKILL; restarting in 0.05 s" in log.text()
    assert sup.fatal is None
    assert not any(alive(p) for p in [*first, *new])


def test_the_pause_before_a_restart_doubles_up_to_the_cap():
    sup, log = fast(CRASHER, start_window=60, max_quick_deaths=1000, max_backoff=0.2)
    with sup:
        wait_for(lambda: len(log.matching(r"restarting in")) >= 6, 20, "six restarts")
    delays = [float(m.group(1)) for _, m in log.matching(r"exit code 3; restarting in ([0-9.]+) s")]
    assert delays[:6] == [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
    # and each start really waited its pause after the death before it
    deaths = [t for t, _ in log.matching(r"died after")]
    starts = [t for t, _ in log.matching(r"started \(pid")][1:]
    for died, started, delay in zip(deaths, starts, delays, strict=False):
        assert started - died >= delay - 0.01


def test_the_pause_resets_after_a_worker_ran_long_enough():
    runs_a_while = [sys.executable, "-c", "import sys, time; time.sleep(0.4); sys.exit(1)"]
    sup, log = fast(runs_a_while, healthy_after=0.3, start_window=0.3, max_quick_deaths=2)
    with sup:
        wait_for(lambda: len(log.matching(r"restarting in")) >= 3, 20, "three restarts")
    delays = {m.group(1) for _, m in log.matching(r"exit code 1; restarting in ([0-9.]+) s")}
    assert delays == {"0.05"}
    assert sup.fatal is None  # it lived past start_window each time: never "cannot start"


def test_a_worker_that_cannot_start_is_fatal_with_the_reason():
    reasons: list[str] = []
    sup, log = fast(CRASHER, max_quick_deaths=3, on_fatal=reasons.append)
    sup.start()
    wait_for(lambda: not sup.running, 20, "the supervisor to give up")
    assert sup.fatal is not None and reasons == [sup.fatal]
    assert "worker 1 cannot start: it died 3 times in a row within 20 s of starting" in sup.fatal
    assert "exit code 3" in sup.fatal
    assert sup.restarts() == [2] and sup.pids() == [None]
    sup.stop()


def test_a_missing_command_is_fatal_at_once():
    sup, log = fast(["/nonexistent/gradtune-worker", "--flag"])
    sup.start()
    wait_for(lambda: not sup.running, 10, "the supervisor to give up")
    assert sup.fatal == "worker 1 cannot start: /nonexistent/gradtune-worker is not an executable"


def test_stop_sends_sigterm_then_sigkill_and_leaves_nothing():
    polite, log = fast(SLEEPER, count=2)
    polite.start()
    pids = wait_for(lambda: all(polite.pids()) and polite.pids(), 10, "two workers")
    t0 = time.monotonic()
    polite.stop()
    assert time.monotonic() - t0 < 2.0  # SIGTERM was enough
    assert not any(alive(p) for p in pids) and "SIGKILL" not in log.text()

    stubborn, log = fast(STUBBORN, stop_timeout=0.5, stdout=subprocess.PIPE)
    stubborn.start()
    pid = wait_for(lambda: stubborn.pids()[0], 10, "the worker")
    proc = stubborn._slots[0].proc
    assert proc is not None and proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is in place
    t0 = time.monotonic()
    stubborn.stop()
    assert 0.5 <= time.monotonic() - t0 < 3.0
    assert not alive(pid)
    assert f"worker pid {pid} still there 0.5 s after SIGTERM: SIGKILL" in log.text()
    # nothing was restarted while stopping
    assert not log.matching(r"restarting in")


_PARENT = """
import json, sys, time
from gradtune.supervisor import Supervisor
sup = Supervisor({argv!r}, 2, log=lambda m: None, poll_interval=0.02).start()
while not all(sup.pids()):
    time.sleep(0.02)
print(json.dumps(sup.pids()), flush=True)
time.sleep(120)
"""


def _execed(pid: int) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    return b"time.sleep(120)" in cmdline and b"PR_SET_PDEATHSIG" not in cmdline


def test_workers_die_with_their_supervisor_even_when_it_is_killed():
    """kill -9 of the supervising process (serve) leaves no worker: PR_SET_PDEATHSIG in the launcher."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT.format(argv=SLEEPER)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and all(alive(p) for p in pids)
        # past the launcher's parent check: exec'd into the worker command, PDEATHSIG set
        wait_for(lambda: all(_execed(p) for p in pids), 10, "the launchers to exec the worker command")
        # in their own sessions: a Ctrl-C in the terminal reaches the supervisor, not them
        assert all(os.getsid(p) == p for p in pids)
        parent.kill()
        parent.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in pids), 5, "the workers to die with their parent")
        print(f"workers gone {time.monotonic() - t0:.2f} s after kill -9 of their supervisor")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_launcher_does_not_start_a_command_whose_parent_is_gone(tmp_path):
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    gone = subprocess.run(launcher_argv(argv, parent_pid=1), capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "the supervising process is gone" in gone.stderr
    assert not marker.exists()
    ours = subprocess.run(launcher_argv(argv), capture_output=True, text=True, timeout=30)
    assert ours.returncode == 0 and marker.exists()
