"""Processes as /proc shows them: a process's start time (what tells a pid's owner from a later
process that reused the pid), whether it is a zombie, and a Popen-like handle on a process this
one did not start (or is no longer the parent of, after a fork), watched by pid."""

from __future__ import annotations

import os
import signal
import time


def start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat),
    or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_zombie(pid: int) -> bool:
    """Whether process `pid` has exited and waits for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class WatchedProcess:
    """The parts of Popen a lab uses (pid, poll, send_signal, wait), for a process that is not
    this one's child: it is gone once its pid is gone, reused (another start time) or a zombie.
    Its exit status belongs to its real parent, which may never reap it, so it reads as -1."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = start_time(pid)
        self.returncode: int | None = None
        self.stdout = None  # its READY line was read by whoever started it

    def poll(self) -> int | None:
        if self.returncode is None and (self._start is None or start_time(self.pid) != self._start
                                        or is_zombie(self.pid)):
            self.returncode = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still running")
            time.sleep(0.01)
        return self.returncode if self.returncode is not None else -1
