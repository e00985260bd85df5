"""The proxy supervisor with stand-in proxies (real processes, no lab): an exit is reported with
its cause, a restart waits for READY without blocking, failed restarts back off doubling up to
the cap, and a proxy that came back is counted."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from dataplane.supervisor import ProxySupervisor, exit_text

READY_THEN_WAIT = "import sys, time; print('READY 0.0.0.0:15001', flush=True); time.sleep(60)"
FAIL_AT_ONCE = "import sys; print('cannot listen', file=sys.stderr); sys.exit(2)"


class StandInLab:
    proxy_log_file = "/run/l7lab/x/proxy.log"

    def __init__(self, script: str) -> None:
        self.script = script
        self.proxy_process: Any = subprocess.Popen([sys.executable, "-c", READY_THEN_WAIT], stdout=subprocess.PIPE)
        self.proxy_process.stdout.readline()
        self.proxy_process.stdout.close()
        self.started: list[Any] = []

    def start_proxy(self, wait: bool = True) -> None:
        assert not wait
        self.proxy_process = subprocess.Popen([sys.executable, "-c", self.script], stdout=subprocess.PIPE)
        self.started.append(self.proxy_process)

    def close(self) -> None:
        for proc in [self.proxy_process, *self.started]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_until(supervisor: ProxySupervisor, done: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor never got there"
        supervisor.tick()
        time.sleep(0.01)


def test_an_exited_proxy_is_reported_and_restarted() -> None:
    lab = StandInLab(READY_THEN_WAIT)
    events: list[tuple[str, str, int | None]] = []
    supervisor = ProxySupervisor(lab, lambda *e: events.append(e), min_backoff=0.05, max_backoff=1.0)
    try:
        first = lab.proxy_process.pid
        assert supervisor.up and supervisor.status()["pid"] == first
        lab.proxy_process.kill()
        run_until(supervisor, lambda: supervisor.state != "running")
        assert events[0][0] == "exited" and "killed by SIGKILL" in events[0][1] and events[0][2] == first
        assert supervisor.status()["state"] == "down" and supervisor.status()["last_exit"] == "killed by SIGKILL"
        run_until(supervisor, lambda: supervisor.up)
        assert [e[0] for e in events] == ["exited", "restarted"]
        assert supervisor.restarts == 1 and supervisor.status()["pid"] == lab.proxy_process.pid != first
    finally:
        lab.close()


def test_failed_restarts_back_off_doubling_to_the_cap() -> None:
    lab = StandInLab(FAIL_AT_ONCE)
    events: list[tuple[str, str, int | None]] = []
    supervisor = ProxySupervisor(lab, lambda *e: events.append(e), min_backoff=0.05, max_backoff=0.2)
    try:
        lab.proxy_process.kill()
        run_until(supervisor, lambda: len(events) >= 5)
        assert [e[0] for e in events[:5]] == ["exited"] + ["restart failed"] * 4
        assert all("exited with code 2 before it was ready" in e[1] or "exited before it was ready" in e[1]
                   for e in events[1:5])
        waits = [e[1].rsplit("next restart in ", 1)[1] for e in events[:5]]
        assert waits == ["0.05s", "0.1s", "0.2s", "0.2s", "0.2s"]
        assert supervisor.restarts == 0 and not supervisor.up
    finally:
        lab.close()


def test_exit_text() -> None:
    assert exit_text(-9) == "killed by SIGKILL"
    assert exit_text(2) == "exited with code 2"
    assert exit_text(None) == "still running"
