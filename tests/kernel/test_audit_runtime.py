"""Audit mode switched at runtime (`l7lab audit on|off`) on a lab brought up with `l7lab up`:
a flow the policy drops passes once its destination is in audit mode, and `observe` reports it
AUDITED; switched off, it is dropped again; a change naming an unknown pod changes nothing."""

from __future__ import annotations

import json

import pytest

from tests.support.cli_lab import agent_status, l7lab, observe, reaches

pytestmark = pytest.mark.kernel

INVENTORY = "http://inventory-api:8080/api/inventory/1"


def audited_endpoints(lab: str) -> set[str]:
    return {e["name"] for e in agent_status(lab)["endpoints"] if e.get("audit")}


def test_audit_on_and_off_at_runtime(retail: str) -> None:
    # retail's policy lets only the frontend reach the inventory: reporting is dropped.
    assert not reaches(retail, "reporting", INVENTORY, False)
    assert audited_endpoints(retail) == set()

    out = l7lab("audit", "on", "inventory-api", "--lab", retail)
    assert out.returncode == 0, out
    assert "audit mode on: retail/inventory-api" in out.stdout, out.stdout
    assert audited_endpoints(retail) == {"retail/inventory-api"}
    assert reaches(retail, "reporting", INVENTORY, True)  # the would-be drop passes

    def audited(records: list) -> bool:
        return any(r.type == "L3_L4" and r.verdict == "AUDIT" and r.source.name == "retail/reporting"
                   for r in records)
    records = observe(retail, audited)
    audit = [r for r in records if r.type == "L3_L4" and r.verdict == "AUDIT"]
    assert audit and all((r.source.name, r.destination.name, r.drop_reason, r.deciding_endpoint.name) ==
                         ("retail/reporting", "retail/inventory-api", "POLICY_DENIED", "retail/inventory-api")
                         for r in audit), audit
    text = l7lab("observe", retail, "--type", "policy-verdict").stdout.splitlines()
    assert any("retail/reporting:" in line and "retail/inventory-api:8080" in line and "INGRESS AUDITED" in line
               for line in text), text

    out = l7lab("audit", "off", "--lab", retail, "--json")  # no target: every endpoint
    assert out.returncode == 0, out
    reply = json.loads(out.stdout)
    assert reply["ok"] and reply["audit_off"] == ["retail/inventory-api"] and reply["audit"] == [], reply
    assert audited_endpoints(retail) == set()
    assert not reaches(retail, "reporting", INVENTORY, False)  # enforced again, for a new connection


def test_audit_of_an_unknown_pod_changes_nothing(retail: str) -> None:
    out = l7lab("audit", "on", "inventory-api", "nobody", "--lab", retail)
    assert out.returncode == 1, out
    assert "no pod 'nobody' in lab" in out.stderr and "retail/inventory-api" in out.stderr, out.stderr
    assert "nothing changed" in out.stderr
    assert audited_endpoints(retail) == set()  # inventory-api, named beside it, was not switched either
    assert not reaches(retail, "reporting", INVENTORY, False)

    out = l7lab("audit", "maybe", "--lab", retail)
    assert out.returncode == 1 and "expected 'on' or 'off'" in out.stderr, out
