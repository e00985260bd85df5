"""The seeds' mistakes against a real lab: `apply` of a policy with a typographic quote in its
port or a wildcard in matchName is refused with the same message `validate` gives, by the CLI
and by the lab's agent alike, and the lab's policies stay as they were; `up` of a scenario that
uses such a policy builds nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane import agent
from tests.conftest import REPO, unique_lab
from tests.support.cli_lab import agent_status, l7lab, leftovers, nothing_left

pytestmark = pytest.mark.kernel

MISTAKES = REPO / "scenarios" / "mistakes"
CASES = {
    "allow-get-data-curly-quote.yaml": (20, "spec.ingress[0].toPorts[0].ports[0].port: invalid port '\u201c80\u201d': "
                                            "typographic quote \u201c in the port: write 80 or \"80\""),
    "egress-matchname-wildcard.yaml": (13, "spec.egress[0].toFQDNs[0].matchName: invalid matchName '*.example.com': "
                                           "matchName takes no wildcards: use matchPattern: '*.example.com'"),
}


def test_apply_of_a_seed_mistake_is_refused_and_changes_nothing(retail: str) -> None:
    before = agent_status(retail)["agent"]["policies"]
    for name, (line, message) in CASES.items():
        path = MISTAKES / name
        out = l7lab("apply", str(path), "--lab", retail)
        assert out.returncode == 1, out
        assert f"{path}:{line}:" in out.stderr and message in out.stderr, out.stderr
        # Straight to the agent, as a client that skips the CLI's own check would send it.
        reply = agent.request(retail, {"op": "change", "apply": [{"path": name, "text": path.read_text()}]}, timeout=30)
        assert reply["ok"] is False, reply
        assert any(e.startswith(f"{name}:{line}:") and message in e for e in reply["errors"]), reply
    assert agent_status(retail)["agent"]["policies"] == before


def test_up_of_a_scenario_with_a_seed_mistake_builds_nothing(tmp_path: Path) -> None:
    name = unique_lab("sm")
    scenario = tmp_path / "seed.yaml"
    scenario.write_text((REPO / "scenarios" / "get-data-seed.yaml").read_text().replace(
        "policies/allow-get-data-seed.yaml", str(MISTAKES / "allow-get-data-curly-quote.yaml")))
    try:
        out = l7lab("up", str(scenario), "--name", name)
        assert out.returncode == 1, out
        line, message = CASES["allow-get-data-curly-quote.yaml"]
        assert f"allow-get-data-curly-quote.yaml:{line}:" in out.stderr and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert not any(leftovers(name).values()), leftovers(name)
    finally:
        if any(leftovers(name).values()):
            l7lab("down", name)
        assert nothing_left(name), leftovers(name)
