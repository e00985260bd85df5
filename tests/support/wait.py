"""Waiting for something to happen without fixed sleeps: poll a check until it holds or a
generous deadline passes (deadlines are for a loaded machine; no test asserts a timing).

Every bound given here is an ordinary machine's seconds; `wait_for` scales it to this machine
(dataplane/timescale.py), so callers pass the nominal figure and never scale it themselves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from dataplane.timescale import scaled

T = TypeVar("T")

DEADLINE = 30.0  # "eventually" on a loaded machine


def wait_for(what: str, check: Callable[[], T], timeout: float = DEADLINE, every: float = 0.02) -> T:
    """The first truthy result of `check()`; AssertionError naming `what` once `timeout` (scaled
    to this machine) passed."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} ({timeout:g}s)")
        time.sleep(every)
