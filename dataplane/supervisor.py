"""Supervision of a lab's L7 proxy by the lab agent: notice when it exits, restart it with backoff.

While the proxy is down, every flow a policy redirects to it is dropped in the kernel (fail
closed); the supervisor makes the outage visible and short. The agent calls `tick()` on every
turn of its loop (about ten times a second):

- a running proxy that exited is reported ("exited", with its exit code or signal) through the
  agent's `report` callback, which writes a lifecycle record into the lab's flow records;
- a restart is attempted after a backoff that starts at `min_backoff` and doubles up to
  `max_backoff`; it is reset once a proxy has run `STABLE_AFTER` seconds;
- a restart never blocks the agent: the new proxy is spawned (`Lab.start_proxy(wait=False)`) and
  its READY line is awaited across ticks; one that exits or stays silent for `START_TIMEOUT`
  counts as a failed attempt ("restart failed") and the next one waits longer;
- "restarted" is reported once the new proxy is READY (it has loaded the policy in force).

`run --keep` hands the agent a proxy it did not start (watched by pid); it restarts it the same
way, as its own child from then on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import timescale
from .processes import WatchedProcess

if TYPE_CHECKING:
    from .lab import Lab

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0  # a proxy that ran this long resets the backoff
START_TIMEOUT = 20.0  # from spawn to READY on an ordinary machine (timescale.scaled() on this one)


def exit_text(code: int | None) -> str:
    """A Popen return code in words: 'exited with code 2', 'killed by SIGKILL'."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


class ProxySupervisor:
    """Watches `lab.proxy_process` and restarts it. States: running, down (waiting to restart),
    starting."""

    def __init__(self, lab: Lab, report: Callable[[str, str, int | None], None], *,
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF) -> None:
        self.lab = lab
        self.report = report  # (event, detail, pid)
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.backoff = min_backoff
        self.restarts = 0
        self.state = "running" if self._alive() else "down"
        self.since = time.time()  # when the current state began (wall clock, for people)
        self._started = time.monotonic()
        self.next_attempt = time.monotonic()  # a proxy found dead at the start is started at once
        self.last_exit = ""
        self._ready_deadline = 0.0
        self._ready_buffer = b""

    # -- queries ----------------------------------------------------------------------------
    def _alive(self) -> bool:
        proxy = self.lab.proxy_process
        return proxy is not None and proxy.poll() is None

    @property
    def up(self) -> bool:
        return self.state == "running"

    def status(self) -> dict[str, Any]:
        proxy = self.lab.proxy_process
        out: dict[str, Any] = {"state": self.state, "pid": proxy.pid if proxy is not None and self.state != "down" else None,
                               "restarts": self.restarts, "since": self.since, "last_exit": self.last_exit}
        if self.state == "down":
            out["next_restart_in"] = round(max(0.0, self.next_attempt - time.monotonic()), 1)
        return out

    # -- the loop ---------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if self.state == "running":
            proxy = self.lab.proxy_process
            code = proxy.poll() if proxy is not None else -1
            if code is None:
                if now - self._started >= STABLE_AFTER:
                    self.backoff = self.min_backoff
                return
            pid = proxy.pid if proxy is not None else None
            self.last_exit = exit_text(code) if code != -1 or self._is_child() else "exited"
            self._go_down(f"the L7 proxy {self.last_exit}; redirected flows are dropped until it is back", pid)
        elif self.state == "down":
            if now >= self.next_attempt:
                self._spawn()
        elif self.state == "starting":
            self._check_start(now)

    def ensure_ready(self, deadline: float) -> bool:
        """Wait (until the monotonic `deadline`) for a proxy that is starting; True if one runs."""
        while self.state == "starting" and time.monotonic() < deadline:
            self._check_start(time.monotonic(), wait=min(0.05, max(0.0, deadline - time.monotonic())))
        if self.state == "running" and not self._alive():
            self.tick()
        return self.state == "running"

    def _is_child(self) -> bool:
        proxy = self.lab.proxy_process
        return proxy is not None and not isinstance(proxy, WatchedProcess)  # ours, not watched by pid

    def _go_down(self, detail: str, pid: int | None, event: str = "exited") -> None:
        self.state = "down"
        self.since = time.time()
        self.next_attempt = time.monotonic() + self.backoff
        self.report(event, f"{detail}; next restart in {self.backoff:g}s", pid)
        self.backoff = min(self.backoff * 2, self.max_backoff)

    def _spawn(self) -> None:
        try:
            self.lab.start_proxy(wait=False)
        except Exception as exc:  # noqa: BLE001 - e.g. the namespace is gone; try again later
            self.last_exit = f"could not be started: {exc}"
            self._go_down(f"the L7 proxy {self.last_exit}", None, "restart failed")
            return
        self.state = "starting"
        self._ready_deadline = time.monotonic() + timescale.scaled(START_TIMEOUT)
        self._ready_buffer = b""

    def _check_start(self, now: float, wait: float = 0.0) -> None:
        proxy = self.lab.proxy_process
        assert proxy is not None  # the one _spawn started
        out = proxy.stdout
        if out is not None:
            readable, _, _ = select.select([out], [], [], wait)
            if readable:
                piece = os.read(out.fileno(), 4096)
                self._ready_buffer += piece
                if self._ready_buffer.startswith(b"READY") and b"\n" in self._ready_buffer:
                    out.close()
                    self.state = "running"
                    self.since = time.time()
                    self._started = time.monotonic()
                    self.restarts += 1
                    self.report("restarted", f"the L7 proxy is back (pid {proxy.pid}, restart {self.restarts}) "
                                             "with the policy in force", proxy.pid)
                    return
                if not piece or (len(self._ready_buffer) >= 5 and not self._ready_buffer.startswith(b"READY")):
                    self._failed_start(proxy, "exited before it was ready")
                    return
        if proxy.poll() is not None:
            self._failed_start(proxy, f"{exit_text(proxy.returncode)} before it was ready")
        elif now >= self._ready_deadline:
            self._failed_start(proxy, f"was not ready within {timescale.scaled(START_TIMEOUT):g}s")

    def _failed_start(self, proxy: Any, why: str) -> None:
        if proxy.poll() is None:
            with contextlib.suppress(OSError):
                proxy.kill()
            with contextlib.suppress(Exception):
                proxy.wait(timeout=timescale.scaled(5))
        if proxy.stdout is not None:
            proxy.stdout.close()
        self.last_exit = why
        log = getattr(self.lab, "proxy_log_file", "")
        self._go_down(f"the restarted L7 proxy {why} (log: {log})", proxy.pid, "restart failed")
