"""Fixtures of the real-traffic tests that share one lab per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dataplane import runner
from tests.conftest import unique_lab
from tests.support.cli_lab import RETAIL, l7lab, leftovers, nothing_left
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
    name = unique_lab("ag")
    up = l7lab("up", str(RETAIL), "--name", name)
    assert up.returncode == 0, up.stderr
    try:
        yield name
    finally:
        assert l7lab("down", name).returncode == 0
        assert nothing_left(name), leftovers(name)
