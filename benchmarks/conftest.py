"""Benchmarks need root and BCC; they are run on purpose (`scripts/bench.sh`), never in CI."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def datapath():  # noqa: ANN201 - dataplane.datapath.Datapath
    if os.geteuid() != 0:
        pytest.skip("benchmarks of the datapath need root")
    from dataplane.datapath import Datapath  # noqa: PLC0415 - imports bcc

    with Datapath() as dp:
        yield dp
