"""The dry-run gate: every scenario in scenarios/ loads, its policies parse, and the oracle's
verdict equals the expectation of every probe (the kernel must then agree with the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.fqdn.oracle import expected_outcomes
from dataplane.policy import PolicyEngine, explain_text
from dataplane.scenario import load_scenario, meets

SCENARIOS = sorted((Path(__file__).resolve().parents[3] / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_expectations_match_the_oracle(path):
    engine = PolicyEngine(load_scenario(path))
    mismatches = []
    for step, probe, decision in expected_outcomes(engine):
        if not meets(probe.expect, decision.expectation):
            mismatches.append(f"{probe.location}: {step.name}: expected {probe.expect}, oracle says "
                              f"{decision.expectation}\n{explain_text(decision)}")
    assert not mismatches, "\n\n".join(mismatches)


def test_seed_scenarios_exist():
    names = {p.stem for p in SCENARIOS}
    assert {"protect-inventory-api", "allow-get-products", "fqdn-example-com", "k8s-tutorial"} <= names
