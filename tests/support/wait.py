"""Waiting for something to happen without fixed sleeps: poll a check until it holds or a
generous deadline passes (deadlines are for a loaded machine; no test asserts a timing)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 30.0  # "eventually" on a loaded machine


def wait_for(what: str, check: Callable[[], T], timeout: float = DEADLINE, every: float = 0.02) -> T:
    """The first truthy result of `check()`; AssertionError naming `what` once `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
