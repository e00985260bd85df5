"""Cilium L3/L4 rules replayed as real TCP and UDP traffic (issue 4).

One lab for the module (x/y/z a/b/c with ports 80/81 TCP+UDP, world hosts 203.0.113.10,
203.0.113.130, 198.51.100.7). Each case swaps the policy engine by map updates and sends every
pod -> pod, pod -> world and world -> pod probe on all four ports; the kernel must agree with
the oracle on every one, and hand-written expectations from Cilium's documentation
(docs.cilium.io security/policy: language (entities, CIDR), deny, intro (enforcement),
the CiliumNetworkPolicy API reference for enableDefaultDeny) must hold as well.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import pytest

from dataplane.lab import node_netns
from dataplane.policy import Flow, PolicyEngine
from dataplane.probes import run_probe
from tests.support.kernel_lab import (PODS, PORTS_ALL, WORLD, closed_port_probes, KernelLab, all_pod_pairs,
                                      ccnp, cnp, knp, make_probe, make_scenario, pair_probes)

Expect = tuple[str, str, int, str, str]


@dataclass
class Case:
    name: str
    policies: str
    expect: list[Expect] = field(default_factory=list)


CASES = [
    Case("from-entities-world", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [world]}]
        """), [("w1", "x/a", 80, "TCP", "allowed"), ("w3", "x/a", 81, "UDP", "allowed"),
               ("y/a", "x/a", 80, "TCP", "dropped"), ("x/b", "x/a", 80, "UDP", "dropped"),
               ("w1", "x/b", 80, "TCP", "allowed")]),
    Case("from-entities-cluster", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [cluster]}]
        """), [("y/a", "x/a", 80, "TCP", "allowed"), ("x/b", "x/a", 81, "UDP", "allowed"),
               ("w1", "x/a", 80, "TCP", "dropped"), ("w3", "x/a", 81, "UDP", "dropped")]),
    Case("from-entities-all", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [all]}]
        """), [("y/a", "x/a", 80, "TCP", "allowed"), ("w2", "x/a", 81, "UDP", "allowed")]),
    Case("to-entities-world", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress: [{toEntities: [world]}]
        """), [("x/a", "w1", 80, "TCP", "allowed"), ("x/a", "w3", 81, "UDP", "allowed"),
               ("x/a", "x/b", 80, "TCP", "dropped"), ("x/a", "y/c", 81, "UDP", "dropped"),
               ("x/b", "x/a", 80, "TCP", "allowed")]),
    Case("to-entities-cluster", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress: [{toEntities: [cluster]}]
        """), [("x/a", "z/c", 80, "TCP", "allowed"), ("x/a", "w1", 80, "TCP", "dropped"),
               ("x/a", "w3", 81, "UDP", "dropped")]),
    Case("to-entities-all", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress: [{toEntities: [all]}]
        """), [("x/a", "z/c", 80, "TCP", "allowed"), ("x/a", "w2", 81, "UDP", "allowed")]),
    Case("to-cidr-and-cidr-set-except", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress:
          - toCIDR: [198.51.100.0/24]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
          - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]
        """), [("x/a", "w1", 80, "TCP", "allowed"), ("x/a", "w1", 81, "UDP", "allowed"),
               ("x/a", "w2", 80, "TCP", "dropped"),  # in the except
               ("x/a", "w3", 80, "TCP", "allowed"), ("x/a", "w3", 81, "TCP", "dropped"),
               ("x/a", "w3", 80, "UDP", "dropped"),
               ("x/a", "x/b", 80, "TCP", "dropped")]),  # CIDR rules never select pods
    # Cilium's connectivity suite allows all egress with both families; the lab is IPv4 only,
    # so the IPv4 half allows the world and the IPv6 half adds nothing.
    Case("to-cidr-ipv4-and-ipv6-all", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress: [{toCIDR: ["0.0.0.0/0", "::/0"]}]
        """), [("x/a", "w1", 80, "TCP", "allowed"), ("x/a", "w2", 81, "UDP", "allowed"),
               ("x/a", "w3", 80, "TCP", "allowed"),
               ("x/a", "x/b", 80, "TCP", "dropped")]),  # CIDR rules never select pods
    # Peers that are all IPv6: nothing is allowed, and the section still enforces default deny.
    Case("to-cidr-ipv6-only", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress:
          - toCIDRSet: [{cidr: "::/0", except: ["fd00::/8"]}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        """), [("x/a", "w1", 80, "TCP", "dropped"), ("x/a", "x/b", 80, "TCP", "dropped"),
               ("x/b", "w1", 80, "TCP", "allowed")]),
    # Cilium's "additional label requirements": the requirement (pod=b) of the second policy
    # narrows the first policy's fromEndpoints (every pod of y) and grants nothing alone; the
    # entity rule is left as it is.
    Case("from-requires", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]
          - fromEntities: [world]
        """) + "\n---\n" + cnp("requires", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromRequires: [{matchLabels: {pod: b}}]}]
        """), [("y/b", "x/a", 80, "TCP", "allowed"), ("y/b", "x/a", 81, "UDP", "allowed"),
               ("y/a", "x/a", 80, "TCP", "dropped"), ("y/c", "x/a", 81, "UDP", "dropped"),
               ("x/b", "x/a", 80, "TCP", "dropped"),  # meets the requirement, allowed by no rule
               ("w1", "x/a", 80, "TCP", "allowed")]),
    Case("from-cidr-set-except", cnp("p", "y", """
        endpointSelector: {}
        ingress:
          - fromCIDRSet: [{cidr: 0.0.0.0/0, except: [198.51.100.0/24, 203.0.113.128/25]}]
        """), [("w1", "y/a", 80, "TCP", "allowed"), ("w2", "y/b", 80, "TCP", "dropped"),
               ("w3", "y/c", 81, "UDP", "dropped"), ("x/a", "y/a", 80, "TCP", "dropped"),
               ("w3", "x/a", 80, "TCP", "allowed")]),
    Case("ingress-deny-wins-over-allow", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [all]}]
        ingressDeny:
          - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
          - fromCIDR: [198.51.100.0/24]
        """), [("y/a", "x/a", 80, "TCP", "dropped"), ("y/b", "x/a", 81, "TCP", "allowed"),
               ("y/c", "x/a", 80, "UDP", "allowed"), ("z/a", "x/a", 80, "TCP", "allowed"),
               ("w3", "x/a", 81, "UDP", "dropped"), ("w1", "x/a", 80, "TCP", "allowed")]),
    Case("deny-in-one-policy-beats-allow-in-others", ccnp("deny-z", """
        endpointSelector: {matchLabels: {pod: b}}
        ingressDeny: [{fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: z}}]}]
        enableDefaultDeny: {ingress: false}
        """) + "---\n" + knp("allow-all", "x", """
        podSelector: {}
        ingress: [{}]
        """), [("z/a", "x/b", 80, "TCP", "dropped"), ("z/a", "y/b", 81, "UDP", "dropped"),
               ("z/a", "x/a", 80, "TCP", "allowed"), ("y/a", "x/b", 80, "TCP", "allowed"),
               ("w1", "y/b", 80, "TCP", "allowed")]),  # enableDefaultDeny false: y/b not isolated
    Case("egress-deny-cidr-set-except", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress: [{toEntities: [all]}]
        egressDeny: [{toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.10/32]}]}]
        """), [("x/a", "w1", 80, "TCP", "allowed"), ("x/a", "w2", 80, "TCP", "dropped"),
               ("x/a", "w2", 81, "UDP", "dropped"), ("x/a", "w3", 80, "TCP", "allowed"),
               ("x/a", "y/a", 80, "TCP", "allowed")]),
    Case("deny-only-policy-turns-default-deny-on", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egressDeny: [{toEndpoints: [{matchLabels: {pod: b}}]}]
        """), [("x/a", "x/b", 80, "TCP", "dropped"), ("x/a", "x/c", 80, "TCP", "dropped"),
               ("x/a", "w1", 80, "TCP", "dropped"), ("x/b", "x/a", 80, "TCP", "allowed")]),
    Case("cnp-selectors-are-namespace-scoped", cnp("p", "x", """
        endpointSelector: {}
        ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
        """), [("x/b", "x/a", 80, "TCP", "allowed"), ("y/b", "x/a", 80, "TCP", "dropped"),
               ("x/c", "x/a", 81, "UDP", "dropped"), ("x/b", "y/a", 80, "TCP", "allowed"),
               ("y/c", "y/a", 80, "TCP", "allowed")]),
    Case("cnp-peer-naming-a-namespace-crosses", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEndpoints: [{matchLabels: {pod: b, k8s:io.kubernetes.pod.namespace: z}}]}]
        """), [("z/b", "x/a", 80, "TCP", "allowed"), ("x/b", "x/a", 80, "TCP", "dropped"),
               ("y/b", "x/a", 80, "TCP", "dropped")]),
    Case("ccnp-is-not-scoped", ccnp("c", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
        """), [("x/b", "x/a", 80, "TCP", "allowed"), ("y/b", "x/a", 80, "TCP", "allowed"),
               ("z/b", "y/a", 81, "UDP", "allowed"), ("x/c", "z/a", 80, "TCP", "dropped"),
               ("w1", "y/a", 80, "TCP", "dropped"), ("x/c", "x/b", 80, "TCP", "allowed")]),
    Case("enable-default-deny-false", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        enableDefaultDeny: {ingress: false, egress: false}
        ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
        egressDeny: [{toEntities: [world]}]
        """), [("x/b", "x/a", 80, "TCP", "allowed"), ("y/c", "x/a", 80, "TCP", "allowed"),
               ("w1", "x/a", 80, "UDP", "allowed"),  # ingress not isolated
               ("x/a", "w1", 80, "TCP", "dropped"),  # the deny still applies
               ("x/a", "y/c", 81, "UDP", "allowed")]),
    Case("k8s-and-cilium-union", cnp("c", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: b}}]
            toPorts: [{ports: [{port: "81", protocol: UDP}]}]
        """) + "---\n" + knp("k", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]
        """), [("x/b", "x/a", 81, "UDP", "allowed"), ("x/b", "x/a", 80, "TCP", "dropped"),
               ("z/c", "x/a", 80, "TCP", "allowed"), ("y/c", "x/a", 81, "UDP", "dropped")]),
]


LAB_PREFIX = "dc"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)
pytestmark = pytest.mark.usefixtures("wide_probes")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cilium_case_on_real_traffic(klab: KernelLab, case: Case) -> None:
    engine = PolicyEngine(make_scenario(case.policies))
    klab.switch(engine)
    pairs = all_pod_pairs() + [(p, p) for p in PODS] + [(p, w) for p in PODS for w in WORLD] + [(w, p) for w in WORLD for p in PODS]
    out = klab.run(pair_probes(engine, pairs, PORTS_ALL) + closed_port_probes(engine))
    assert not out.disagreements(), out.disagreements()[:20]
    got = {e[:4]: out[e[:4]] for e in case.expect}
    assert got == {e[:4]: e[4] for e in case.expect}


def _from_node(klab: KernelLab, dst: str, port: int, protocol: str) -> tuple[str, str]:
    """(kernel, oracle) for a connection the lab node itself opens (identity host)."""
    oracle = klab.engine.verdict(replace(Flow.from_probe(make_probe(klab.scenario, "x/a", dst, port, protocol,
                                                                       "allowed", 1.0)), source="host")).outcome
    probe = make_probe(klab.scenario, "x/a", dst, port, protocol, oracle, 0.4 if oracle == "dropped" else 3.0)
    observed = asyncio.run(run_probe(probe, node_netns(klab.lab.name)))
    return observed.outcome, oracle


def test_host_entity_from_the_node(klab: KernelLab) -> None:
    """allow-localhost: the node reaches pods under default deny; `fromEntities: [host]` in an
    ingressDeny overrides it; `fromEntities: [host]` alone admits the node and nothing else."""
    klab.switch(PolicyEngine(make_scenario(knp("deny-all", "x", "podSelector: {}"))))
    assert _from_node(klab, "x/a", 80, "TCP") == ("allowed", "allowed")
    assert _from_node(klab, "x/b", 81, "UDP") == ("allowed", "allowed")
    assert klab.run(pair_probes(klab.engine, [("y/a", "x/a")])).results[0].observed.outcome == "dropped"

    klab.switch(PolicyEngine(make_scenario(cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [all]}]
        ingressDeny: [{fromEntities: [host]}]
        """))))
    assert _from_node(klab, "x/a", 80, "TCP") == ("dropped", "dropped")
    assert _from_node(klab, "x/a", 81, "UDP") == ("dropped", "dropped")
    assert _from_node(klab, "x/b", 80, "TCP") == ("allowed", "allowed")
    out = klab.run(pair_probes(klab.engine, [("y/a", "x/a"), ("w1", "x/a")], PORTS_ALL))
    assert not out.disagreements() and out[("y/a", "x/a", 80, "TCP")] == "allowed"

    klab.switch(PolicyEngine(make_scenario(cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [host]}]
        """))))
    assert _from_node(klab, "x/a", 80, "TCP") == ("allowed", "allowed")
    out = klab.run(pair_probes(klab.engine, [("x/b", "x/a"), ("w1", "x/a")], PORTS_ALL))
    assert not out.disagreements() and set(r.observed.outcome for r in out.results) == {"dropped"}
