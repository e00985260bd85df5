"""Fixtures of the kernel tests: the lab a real-traffic module shares, a lab brought up with
`l7lab up`, and the datapaths the tests on test packets (BPF_PROG_TEST_RUN) run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dataplane import runner
from dataplane.datapath import Datapath
from tests.conftest import require_kernel, unique_lab
from tests.support.cli_lab import RETAIL, up_lab
from tests.support.kernel_lab import KernelLab, close_lab, open_lab


@pytest.fixture(scope="module")
def klab(request: pytest.FixtureRequest, datapath) -> Iterator[KernelLab]:  # noqa: ANN001 - session fixture
    """The module's lab, built from its `make_scenario()` and named with its `LAB_PREFIX`."""
    module = request.module
    k = open_lab(module.make_scenario(), datapath, unique_lab(getattr(module, "LAB_PREFIX", "k")))
    try:
        yield k
    finally:
        close_lab(k)


@pytest.fixture
def wide_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """All-pairs probing: many probes at once, since each dropped one costs a timeout."""
    monkeypatch.setattr(runner, "PROBE_CONCURRENCY", 96)


@pytest.fixture
def retail() -> Iterator[str]:
    """A lab of scenarios/retail.yaml brought up with `l7lab up` (so it has an agent); down afterwards."""
    yield from up_lab(RETAIL, "ag")


@pytest.fixture(scope="session")
def dp(datapath: Datapath) -> Datapath:
    """The session's shared datapath (tests/conftest.py) for the tests that run the programs on test
    packets (tests/kernel/test_bpf_*.py): one compile serves every test."""
    return datapath


@pytest.fixture(scope="session")
def dp_audit() -> Iterator[Datapath]:
    """A second datapath compiled in audit mode (-DAUDIT_ALL=1)."""
    require_kernel()
    with Datapath(audit=True) as d:
        yield d


@pytest.fixture(autouse=True)
def _fresh_datapath(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test on the programs alone (`dp`, `dp_audit`) starts with no tracked flows and no pending
    events."""
    for name in ("dp", "dp_audit"):
        if name in request.fixturenames:
            d = request.getfixturevalue(name)
            d.flush_conntrack()
            d.poll_events()
    yield
