"""Shared test plumbing.

Kernel tests (tier 2) need root, network namespaces and BCC. Outside CI they skip when the
machine cannot run them; in CI (CI=true) a kernel test that would skip fails instead, because a
green run that skipped the kernel proves nothing.

Slow machines (emulated VMs, loaded runners): every bound a test waits for is an ordinary
machine's seconds scaled by `dataplane.timescale` (one factor, measured here once, before the
workers start, and handed to them and to every process the tests start through
L7LAB_TIME_SCALE). A slow machine makes the suite wait longer, never skip.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not os.path.isdir("/proc/self/ns"):
        return "needs network namespaces"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs BCC (python3-bpfcc)"
    return None


def require_kernel() -> None:
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"kernel test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"kernel test: {reason}")


def unique_lab(prefix: str = "t") -> str:
    """A lab name no other test (or parallel run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def patient(scenario: Any, timeout: float = 5.0) -> Any:
    """The scenario with every probe that expects an answer given `timeout` seconds (which
    `run_probe` scales to this machine): on a loaded machine a slow answer must not pass for a
    drop. Probes that expect `dropped` keep theirs (they always wait it out)."""
    steps = tuple(dataclasses.replace(step, probes=tuple(
        p if p.expect == "dropped" else dataclasses.replace(p, timeout=max(p.timeout, timeout)) for p in step.probes))
        for step in scenario.steps)
    return dataclasses.replace(scenario, steps=steps)


def pytest_configure(config: pytest.Config) -> None:
    # The machine's slowness factor, measured (or read from L7LAB_TIME_SCALE) once here: it is
    # then in the environment, so pytest-xdist workers and every process a test starts inherit it.
    from dataplane import timescale  # noqa: PLC0415
    from dataplane.errors import SetupError  # noqa: PLC0415

    try:
        timescale.factor()
    except SetupError as exc:
        raise pytest.UsageError(str(exc)) from None
    # A shell without job control starts background commands with SIGINT ignored, and children
    # inherit that: the tests that stop `observe --follow` or `monitor` with SIGINT (Ctrl-C)
    # need it delivered. Python's own handler is reset to the default in the children it starts.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config: pytest.Config) -> str:
    from dataplane import timescale  # noqa: PLC0415

    return f"l7lab time scale: {timescale.factor():g} ({timescale.ENV})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The kernel tier runs in one process, in order: its tests share one compiled datapath (a
    # compile costs seconds) and some watch the whole machine's labs. With pytest-xdist
    # (`-n 2 --dist loadgroup`, as scripts/test.sh runs) the group keeps them on one worker while
    # the unit tier runs on the other, and with it the walkthrough checks, which only run
    # `l7lab` commands on labs of their own names.
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/kernel" in path:
            item.add_marker(pytest.mark.kernel)
            group = "walkthroughs" if path.endswith("/test_walkthroughs.py") else "kernel"
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _kernel_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is not None:
        require_kernel()


@pytest.fixture(scope="session")
def datapath():  # noqa: ANN201 - a dataplane.datapath.Datapath
    """One compiled datapath for the whole session (a BCC compile costs seconds); labs that use
    it one after another each leave it empty when they go down."""
    require_kernel()
    from dataplane.datapath import Datapath  # noqa: PLC0415 - imports bcc

    with Datapath() as dp:
        yield dp
