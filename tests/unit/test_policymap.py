"""`l7lab policy get` and `identity list` without a kernel: the policy map entry read back
(`unpack_policy`, the inverse of `pack_policy`), the comparison of the kernel's map with the
resolver's state on two maps in memory, the agent's reply and its rows, and the command line's
pieces (LAB/POD, the rendering of a difference)."""

from __future__ import annotations

import json

import pytest

from dataplane.abi import IDENTITY_ANY, PROTO_ANY, PROTO_TCP, PROTO_UDP, PROXY_PORT, Direction, Verdict
from dataplane.cli.common import UsageError
from dataplane.cli.inspect import lab_and_pod
from dataplane.datapath import as_kernel_holds, pack_policy, unpack_policy
from dataplane.mapstate import PolicyEntry, PolicyKey, RuleAttribution
from dataplane.policy import PolicyEngine
from dataplane.policymap import (
    DIFFERS,
    KERNEL_ONLY,
    MISSING,
    OK,
    PolicyDump,
    compare,
    difference_text,
    dump_reply,
    identities_json,
    port_range,
    port_text,
    rule_json,
)
from dataplane.scenario import load_scenario
from tests.conftest import REPO

RETAIL = REPO / "scenarios" / "retail.yaml"
IN, OUT = Direction.INGRESS, Direction.EGRESS


def test_unpack_policy_inverts_pack_policy_keeping_what_the_kernel_keeps() -> None:
    cases = [
        (PolicyKey(7, IN, 256, PROTO_TCP, 8080, 16), PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (3,))),
        (PolicyKey(1, OUT, IDENTITY_ANY, PROTO_ANY), PolicyEntry(Verdict.ALLOW)),
        (PolicyKey(65535, OUT, (1 << 24) + 2, PROTO_UDP, 8000, 12), PolicyEntry(Verdict.DENY, 0, (9,))),
    ]
    for key, entry in cases:
        assert unpack_policy(*pack_policy(key, entry)) == (key, entry)
    # the value holds the first rule id only, and only the port's prefix bits are kept
    assert as_kernel_holds(PolicyKey(2, IN, 256, PROTO_TCP, 8085, 12), PolicyEntry(Verdict.ALLOW, 0, (4, 5))) == \
        (PolicyKey(2, IN, 256, PROTO_TCP, 8080, 12), PolicyEntry(Verdict.ALLOW, 0, (4,)))
    key, value = pack_policy(*cases[0])
    bad = bytearray(key)
    bad[0] = 100  # a prefix length no entry of ours has
    with pytest.raises(ValueError, match="prefix length 100"):
        unpack_policy(bytes(bad), value)


def test_ports_are_shown_as_the_range_their_prefix_covers() -> None:
    assert port_text(PolicyKey(1, IN, 0, PROTO_ANY)) == "ANY"
    assert port_text(PolicyKey(1, IN, 0, PROTO_TCP, 0, 0)) == "ANY/TCP"
    assert port_text(PolicyKey(1, IN, 0, PROTO_TCP, 8080, 16)) == "8080/TCP"
    assert port_text(PolicyKey(1, IN, 0, PROTO_UDP, 8080, 12)) == "8080-8095/UDP"
    assert port_range(PolicyKey(1, IN, 0, PROTO_TCP, 1500, 6)) == (1024, 2047)  # bits past the prefix: not the port's
    assert port_text(PolicyKey(1, IN, 0, 132, 1, 16)) == "1/SCTP"


def _retail() -> tuple[PolicyEngine, dict[PolicyKey, PolicyEntry]]:
    """The retail scenario's engine, and its map state as the kernel holds it after a sync."""
    engine = PolicyEngine(load_scenario(RETAIL))
    kernel = dict(as_kernel_holds(k, e) for k, e in engine.map_state().policy.items())
    return engine, kernel


def test_the_kernel_holding_the_intended_state_is_no_difference() -> None:
    engine, kernel = _retail()
    state = engine.map_state()
    assert {c.check for c in compare(kernel, state.policy)} == {OK}
    # several rules behind one entry: the kernel's one rule id is the first of them
    key = next(iter(state.policy))
    more = {**state.policy, key: PolicyEntry(state.policy[key].verdict, state.policy[key].proxy_port, (1, 99))}
    assert {c.check for c in compare({**kernel, key: PolicyEntry(more[key].verdict, more[key].proxy_port, (1,))}, more)} == {OK}


def test_every_kind_of_difference_is_found() -> None:
    engine, kernel = _retail()
    intended = engine.map_state().policy
    keys = sorted(kernel)
    gone, changed, extra = keys[0], keys[1], PolicyKey(2, OUT, 999, PROTO_TCP, 22, 16)
    behind_its_back = dict(kernel)
    del behind_its_back[gone]
    behind_its_back[changed] = PolicyEntry(Verdict.DENY, 0, kernel[changed].rule_ids)
    behind_its_back[extra] = PolicyEntry(Verdict.ALLOW, 0, ())
    found = {c.key: c.check for c in compare(behind_its_back, intended) if c.check != OK}
    assert found == {gone: MISSING, changed: DIFFERS, extra: KERNEL_ONLY}


def _dump(engine: PolicyEngine, kernel: dict[PolicyKey, PolicyEntry], endpoint_id: int | None = None) -> PolicyDump:
    """What the CLI gets: the agent's reply, through JSON."""
    reply = dump_reply(kernel, engine.map_state(), engine.identities, endpoint_id)
    return PolicyDump.from_reply(json.loads(json.dumps(reply)))


def test_rows_name_the_redirect_of_frontend_app_to_the_inventory() -> None:
    engine, kernel = _retail()
    state = engine.map_state()
    inventory = next(i for i, ep in state.endpoints.items() if ep.name == "retail/inventory-api")
    frontend = next(ep.identity for ep in state.endpoints.values() if ep.name == "retail/frontend-app")
    endpoints = _dump(engine, kernel, inventory).endpoints()
    assert [ep["endpoint"] for ep in endpoints] == ["retail/inventory-api"]
    (ep,) = endpoints
    assert ep["differences"] == 0 and ep["kernel_entries"] == ep["intended_entries"] == len(ep["entries"])
    (row,) = [r for r in ep["entries"] if r["identity"] == frontend]
    assert row["direction"] == "ingress" and row["ports"] == "8080/TCP" and row["protocol"] == "TCP"
    assert row["verdict"] == "redirect" and row["proxy_port"] == PROXY_PORT and row["check"] == OK
    assert "k8s:app=frontend-app" in row["identity_labels"]
    (rule,) = row["rules"]
    assert rule["rule"] == "CiliumNetworkPolicy retail/inventory-read-only ingress[0]"
    assert (rule["kind"], rule["namespace"], rule["name"]) == ("CiliumNetworkPolicy", "retail", "inventory-read-only")
    assert "kernel" not in row  # both sides are shown only where they differ
    # without an endpoint: every endpoint of the lab, grouped, the unprotected ones with no entries
    every = _dump(engine, kernel).endpoints()
    assert [e["endpoint"] for e in every] == sorted((ep.name for ep in state.endpoints.values()),
                                                     key=lambda n: [i for i, e in state.endpoints.items()
                                                                    if e.name == n][0])
    assert next(e for e in every if e["endpoint"] == "retail/reporting")["entries"] == []


def test_a_difference_is_reported_with_both_sides() -> None:
    engine, kernel = _retail()
    redirect = next(k for k, e in kernel.items() if e.verdict == Verdict.REDIRECT)
    kernel[redirect] = PolicyEntry(Verdict.ALLOW, 0, kernel[redirect].rule_ids)
    stray = PolicyKey(redirect.endpoint_id, IN, 12345, PROTO_TCP, 22, 16)
    kernel[stray] = PolicyEntry(Verdict.ALLOW, 0, (77,))
    (ep,) = [e for e in _dump(engine, kernel).endpoints() if e["endpoint_id"] == redirect.endpoint_id]
    assert ep["differences"] == 2
    rows = {(r["identity"], r["ports"]): r for r in ep["entries"]}
    changed = rows[(redirect.identity, port_text(redirect))]
    assert changed["check"] == DIFFERS and changed["verdict"] == "allow"  # what the kernel holds
    assert changed["kernel"]["verdict"] == "allow" and changed["intended"]["verdict"] == "redirect"
    assert difference_text(changed) == f"differs (verdict: kernel allow, intended redirect; proxy port: kernel 0, " \
                                       f"intended {PROXY_PORT})"
    alien = rows[(12345, "22/TCP")]
    assert alien["check"] == KERNEL_ONLY and alien["intended"] is None
    assert alien["identity_labels"] == ["unknown identity 12345"]
    assert alien["rules"] == [{"rule_id": 77, "rule": "rule 77 (unknown to the resolver)"}]
    assert difference_text(alien) == KERNEL_ONLY


def test_rules_name_their_policy_as_explain_does() -> None:
    ccnp = rule_json(RuleAttribution(4, "CiliumClusterwideNetworkPolicy lockdown", 1, "egressDeny"), 4)
    assert ccnp == {"rule_id": 4, "rule": "CiliumClusterwideNetworkPolicy lockdown egressDeny[1]",
                    "policy": "CiliumClusterwideNetworkPolicy lockdown", "kind": "CiliumClusterwideNetworkPolicy",
                    "namespace": "", "name": "lockdown", "section": "egressDeny", "rule_index": 1}
    builtin = rule_json(RuleAttribution(1, "allow-localhost (Cilium default: the local host reaches local pods)",
                                        0, "ingress"), 1)
    assert "kind" not in builtin and builtin["rule"].startswith("allow-localhost")


def test_identities_carry_their_labels_endpoints_and_prefixes() -> None:
    engine = PolicyEngine(load_scenario(RETAIL))
    state = engine.map_state()
    idents = {i["id"]: i for i in identities_json(engine.identities, state)}
    assert idents[1]["labels"] == ["reserved:host"] and f"{engine.scenario.node_ip}/32" in idents[1]["prefixes"]
    assert idents[2]["prefixes"] == ["0.0.0.0/0"]
    frontend = next(ep for ep in state.endpoints.values() if ep.name == "retail/frontend-app")
    mine = idents[frontend.identity]
    assert mine["endpoints"] == ["retail/frontend-app"] and mine["prefixes"] == [f"{frontend.ip}/32"]
    assert "k8s:app=frontend-app" in mine["labels"] and "k8s:io.kubernetes.pod.namespace=retail" in mine["labels"]


def test_lab_and_pod_from_the_command_line() -> None:
    running = ["retail", "other"]
    assert lab_and_pod("retail", "retail/inventory-api", None, running) == ("retail", "retail/inventory-api")
    assert lab_and_pod("retail", None, None, running) == ("retail", None)
    assert lab_and_pod("inventory-api", None, None, running) == (None, "inventory-api")  # the only lab's pod
    assert lab_and_pod("retail", None, "other", running) == ("other", "retail")  # --lab given: the word is a pod
    assert lab_and_pod(None, None, "other", running) == ("other", None)
    assert lab_and_pod("other", "p", "other", running) == ("other", "p")
    with pytest.raises(UsageError, match="given twice"):
        lab_and_pod("retail", "p", "other", running)
