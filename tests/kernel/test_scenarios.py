"""Scenarios are tests: every file in scenarios/ runs end to end on real traffic, L7 included,
and must meet its own expectations, with the oracle's verdict equal to the kernel's for every
probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.lab import Lab
from dataplane.policy import PolicyEngine
from dataplane.runner import KernelExecutor, run_scenario
from dataplane.scenario import load_scenario
from tests.conftest import REPO, patient, unique_lab

SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_on_the_kernel(path: Path, datapath) -> None:  # noqa: ANN001 - fixture
    scenario = patient(load_scenario(path).with_name(unique_lab("sc")))
    with Lab(scenario, datapath=datapath, policy=PolicyEngine(scenario)) as lab:
        report = run_scenario(scenario, KernelExecutor(lab, lab.policy), lab.name)
    failed = [r.to_json() for r in report.results if not r.passed]
    assert not failed
    assert report.results and all(r.oracle is not None and r.kernel for r in report.results)
