"""World hosts at any address outside the cluster, and flows that start from them.

A world host may sit at the cloud metadata address, in 10.0.0.0/8 around the pod CIDR, or in any
other unicast range. CIDR rules select it by its address; they never select a pod whose address
lies inside the same prefix (Cilium: CIDR identities are never given to cluster endpoints, the
pod's /32 in the ipcache carries the pod's identity). Ingress from a world host is judged by
`fromCIDR`, `fromCIDRSet`, `fromEntities: world` and Kubernetes `ipBlock`, and `explain` starts
from the world host.
"""

from __future__ import annotations

import pytest

from dataplane.abi import IDENTITY_WORLD
from dataplane.policy import Flow, explain_text
from tests.support.policy import cnp, engine, outcome

TOPO = """\
name: anywhere
namespaces:
  - {name: prod}
  - {name: mon}
pods:
  - {name: app, namespace: prod, labels: {app: app}, ports: [{port: 8080}]}
  - {name: agent, namespace: mon, labels: {app: agent}, ports: [{port: 4317}]}
world:
  - {name: metadata, address: 169.254.169.254, ports: [{port: 80}]}
  - {name: collector, address: 10.12.0.7, ports: [{port: 4317}]}
  - {name: office, address: 10.64.3.20}
  - {name: lan, address: 192.168.1.10, ports: [{port: 443}]}
  - {name: internet, address: 203.0.113.50}
"""


def knp(name: str, namespace: str, spec: str) -> str:
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n{spec}")


EGRESS = cnp("""
endpointSelector: {}
egress:
  - toCIDR: [169.254.169.254/32]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toCIDR: [10.0.0.0/8]
    toPorts: [{ports: [{port: "4317", protocol: TCP}]}]
""", "infra", "prod")


def test_to_cidr_selects_world_hosts_at_any_address_but_never_a_pod_inside_the_prefix() -> None:
    eng = engine(EGRESS, TOPO)
    assert outcome(eng, "prod/app", "metadata", 80) == "allowed"
    assert outcome(eng, "prod/app", "collector", 4317) == "allowed"
    assert outcome(eng, "prod/app", "collector", 80) == "dropped"  # no rule for port 80 there
    assert outcome(eng, "prod/app", "lan", 443) == "dropped"
    # 10.200.0.0/24 (the pods) lies inside 10.0.0.0/8, and the pod is still not selected.
    assert eng.scenario.pods["mon/agent"].ip.startswith("10.200.")
    assert outcome(eng, "prod/app", "mon/agent", 4317) == "dropped"


def test_explain_says_why_a_cidr_rule_did_not_select_a_pod_inside_it() -> None:
    eng = engine(EGRESS, TOPO)
    agent = eng.scenario.pods["mon/agent"]
    text = explain_text(eng.verdict(Flow("prod/app", agent.ip, "TCP", 4317)))
    assert (f"note: {agent.ip} lies inside CIDR 10.0.0.0/8 of CiliumNetworkPolicy prod/infra spec.egress[1], but it is "
            "a cluster endpoint's address") in text
    assert "CIDR rules never select cluster endpoints" in text
    # A world host that simply has no rule for its port gets no such note.
    collector = eng.verdict(Flow("prod/app", "10.12.0.7", "TCP", 80))
    assert collector.outcome == "dropped" and not any("note:" in line for line in collector.trace)


@pytest.mark.parametrize("rule, allowed, dropped", [
    (cnp("endpointSelector: {}\ningress: [{fromCIDR: [10.0.0.0/8]}]\n", "in", "prod"),
     ["office"], ["internet", "mon/agent"]),
    (cnp("endpointSelector: {}\ningress: [{fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.64.0.0/16]}]}]\n", "in", "prod"),
     ["internet", "metadata", "lan"], ["office", "mon/agent"]),
    (cnp("endpointSelector: {}\ningress: [{fromEntities: [world]}]\n", "in", "prod"),
     ["office", "internet", "metadata"], ["mon/agent"]),
    (knp("in", "prod", "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.12.0.0/16]}}]}]\n"),
     ["office"], ["collector", "internet", "mon/agent"]),
])
def test_ingress_from_world_hosts(rule: str, allowed: list[str], dropped: list[str]) -> None:
    eng = engine(rule, TOPO)
    got = {src: outcome(eng, src, "prod/app", 8080) for src in allowed + dropped}
    assert got == {**{s: "allowed" for s in allowed}, **{s: "dropped" for s in dropped}}


def test_a_world_source_starts_the_flow_in_explain() -> None:
    eng = engine(cnp("endpointSelector: {}\ningress: [{fromCIDR: [10.0.0.0/8]}]\n", "in", "prod"), TOPO)
    app = eng.scenario.pods["prod/app"].ip
    decision = eng.verdict(Flow("office", app, "TCP", 8080))
    assert decision.outcome == "allowed" and decision.source_identity != IDENTITY_WORLD
    text = explain_text(decision)
    assert f"flow: world host office (10.64.3.20) -> {app} TCP/8080" in text
    assert "source identity" in text and "cidr:10.0.0.0/8" in text
    assert "egress: source is not a lab endpoint; no egress policy applies" in text
    internet = eng.verdict(Flow("internet", app, "TCP", 8080))
    assert internet.outcome == "dropped" and internet.source_identity == IDENTITY_WORLD
