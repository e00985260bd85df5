"""Kubernetes NetworkPolicy replayed as real TCP and UDP traffic (issue 4).

One lab for the whole module: the x/y/z a/b/c topology of the upstream netpol e2e suite (ports
80/81, TCP and UDP) plus three world hosts. Each case replaces the lab's policy engine and writes
the new map state as a diff (no reattach, conntrack flushed). For every phase of a case, every pod
probes every other pod and every world host, and every world host probes every pod, on all four
ports: the kernel's answer must equal the oracle's for every probe. On top of that, a few
expectations per case are written by hand from the Kubernetes documentation
(https://kubernetes.io/docs/concepts/services-networking/network-policies/), so that a mistake
shared by the resolver and the datapath is caught too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_network

import pytest

from dataplane.policy import PolicyEngine
from tests.support.kernel_lab import (PODS, PORTS_ALL, WORLD, closed_port_probes, KernelLab, all_pod_pairs,
                                      knp, make_scenario, pair_probes)

Expect = tuple[str, str, int, str, str]  # (source, destination, port, protocol, outcome)


@dataclass
class Case:
    name: str
    policies: str = ""
    settings: str = ""
    steps: str = ""  # YAML `steps:` applied one by one; phase i runs after i steps
    expect: list[list[Expect]] = field(default_factory=list)  # hand-written, per phase


DENY_INGRESS_X = knp("deny-all", "x", "podSelector: {}")

# The upstream netpol e2e suite writes ipBlocks of pod addresses; they select pods only with
# settings.ipBlockSelectsPods (Cilium's CIDR rules never select cluster endpoints).
_POD_IP = {key: pod.ip for key, pod in make_scenario().pods.items()}
IP_BLOCK_OF_YB = knp("from-yb", "x", f"""
    podSelector: {{matchLabels: {{pod: a}}}}
    ingress: [{{from: [{{ipBlock: {{cidr: {_POD_IP["y/b"]}/32}}}}]}}]
    """)
IP_BLOCK_EXCEPT = knp("to-pods-but-yb", "x", f"""
    podSelector: {{matchLabels: {{pod: a}}}}
    policyTypes: [Egress]
    egress: [{{to: [{{ipBlock: {{cidr: {ip_network(_POD_IP["y/a"] + "/30", strict=False)}, except: ["{_POD_IP["y/b"]}/32"]}}}}]}}]
    """)

CASES = [
    Case("no-policy", expect=[[
        ("x/a", "y/b", 80, "TCP", "allowed"), ("z/c", "x/a", 81, "UDP", "allowed"),
        ("w1", "x/a", 80, "TCP", "allowed"), ("x/a", "w3", 81, "UDP", "allowed")]]),
    Case("default-deny-ingress", DENY_INGRESS_X, expect=[[
        ("y/a", "x/a", 80, "TCP", "dropped"), ("x/b", "x/a", 81, "UDP", "dropped"),
        ("w1", "x/c", 80, "TCP", "dropped"),
        ("x/a", "y/b", 80, "TCP", "allowed"),  # egress of x is not isolated (policyTypes: [Ingress])
        ("x/a", "w1", 80, "UDP", "allowed"), ("y/a", "z/a", 80, "TCP", "allowed"),
        ("w2", "y/c", 81, "TCP", "allowed")]]),
    Case("default-deny-egress", knp("deny-egress", "x", """
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        """), expect=[[
        ("x/a", "x/b", 80, "TCP", "dropped"), ("x/a", "y/a", 81, "UDP", "dropped"),
        ("x/a", "w1", 80, "TCP", "dropped"),
        ("x/b", "x/a", 80, "TCP", "allowed"),  # ingress of x/a is not isolated
        ("w1", "x/a", 81, "UDP", "allowed"), ("x/b", "y/a", 80, "TCP", "allowed")]]),
    Case("allow-all-ingress-empty-rule", knp("allow-all", "x", """
        podSelector: {}
        ingress: [{}]
        """), expect=[[("y/a", "x/a", 80, "TCP", "allowed"), ("w3", "x/b", 81, "UDP", "allowed")]]),
    Case("pod-selector-peer-is-own-namespace", knp("allow-b", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - from: [{podSelector: {matchLabels: {pod: b}}}]
        """), expect=[[
        ("x/b", "x/a", 80, "TCP", "allowed"), ("x/b", "x/a", 81, "UDP", "allowed"),
        ("y/b", "x/a", 80, "TCP", "dropped"), ("x/c", "x/a", 80, "TCP", "dropped"),
        ("w1", "x/a", 80, "TCP", "dropped"), ("x/c", "x/b", 80, "TCP", "allowed")]]),
    Case("namespace-and-pod-selector-AND", knp("and", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - from:
              - namespaceSelector: {matchLabels: {ns: y}}
                podSelector: {matchLabels: {pod: b}}
        """), expect=[[
        ("y/b", "x/a", 80, "TCP", "allowed"), ("y/b", "x/a", 80, "UDP", "allowed"),
        ("y/c", "x/a", 80, "TCP", "dropped"), ("z/b", "x/a", 80, "TCP", "dropped"),
        ("x/b", "x/a", 80, "TCP", "dropped")]]),
    Case("namespace-or-pod-selector-OR", knp("or", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - from:
              - namespaceSelector: {matchLabels: {ns: y}}
              - podSelector: {matchLabels: {pod: b}}
        """), expect=[[
        ("y/c", "x/a", 80, "TCP", "allowed"), ("x/b", "x/a", 81, "UDP", "allowed"),
        ("z/b", "x/a", 80, "TCP", "dropped"), ("x/c", "x/a", 80, "TCP", "dropped")]]),
    Case("match-expressions", knp("exprs", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - from:
              - namespaceSelector:
                  matchExpressions:
                    - {key: ns, operator: NotIn, values: [y]}
                    - {key: ns, operator: Exists}
                podSelector:
                  matchExpressions:
                    - {key: pod, operator: In, values: [b, c]}
                    - {key: missing, operator: DoesNotExist}
        """), expect=[[
        ("z/b", "x/a", 80, "TCP", "allowed"), ("x/c", "x/a", 81, "UDP", "allowed"),
        ("y/b", "x/a", 80, "TCP", "dropped"), ("z/a", "x/a", 80, "TCP", "dropped")]]),
    Case("namespace-by-metadata-name", knp("by-name", "x", """
        podSelector: {}
        ingress:
          - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]
        """), expect=[[("z/c", "x/a", 80, "TCP", "allowed"), ("y/c", "x/a", 80, "TCP", "dropped"),
                       ("x/b", "x/a", 80, "TCP", "dropped")]]),
    Case("ports-numbered-named-protocol", knp("ports", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - ports:
              - port: 80
              - {port: serve-81-udp, protocol: UDP}
        """), expect=[[
        ("y/b", "x/a", 80, "TCP", "allowed"), ("y/b", "x/a", 81, "TCP", "dropped"),
        ("y/b", "x/a", 80, "UDP", "dropped"),  # protocol defaults to TCP
        ("y/b", "x/a", 81, "UDP", "allowed"),  # named port of the destination
        ("w2", "x/a", 80, "TCP", "allowed"), ("w2", "x/a", 81, "TCP", "dropped")]]),
    Case("named-port-egress-resolves-on-destination", knp("egress-named", "x", """
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
          - to: [{namespaceSelector: {}}]
            ports: [{port: serve-81-tcp}]
        """), expect=[[
        ("x/a", "y/b", 81, "TCP", "allowed"), ("x/a", "y/b", 80, "TCP", "dropped"),
        ("x/a", "y/b", 81, "UDP", "dropped"), ("x/a", "w1", 81, "TCP", "dropped")]]),
    Case("unknown-named-port-allows-nothing", knp("nope", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{ports: [{port: no-such-port}]}]
        """), expect=[[("x/b", "x/a", 80, "TCP", "dropped"), ("x/b", "x/a", 81, "UDP", "dropped")]]),
    Case("end-port", knp("range", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress:
          - ports:
              - {port: 81, endPort: 1000}
              - {port: 79, endPort: 80, protocol: UDP}
        """), expect=[[
        ("y/a", "x/a", 80, "TCP", "dropped"), ("y/a", "x/a", 81, "TCP", "allowed"),
        ("y/a", "x/a", 80, "UDP", "allowed"), ("y/a", "x/a", 81, "UDP", "dropped")]]),
    Case("protocol-only", knp("udp-only", "x", """
        podSelector: {}
        ingress: [{ports: [{protocol: UDP}]}]
        """), expect=[[
        ("y/a", "x/a", 80, "UDP", "allowed"), ("y/a", "x/a", 81, "UDP", "allowed"),
        ("y/a", "x/a", 80, "TCP", "dropped"), ("w1", "x/b", 81, "TCP", "dropped")]]),
    Case("union-of-policies", knp("from-y", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]
        """) + "---\n" + knp("from-z", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}]
        """), expect=[[
        ("y/a", "x/a", 80, "TCP", "allowed"), ("y/a", "x/a", 81, "TCP", "dropped"),
        ("z/a", "x/a", 81, "TCP", "allowed"), ("z/a", "x/a", 80, "TCP", "dropped"),
        ("x/b", "x/a", 80, "TCP", "dropped")]]),
    Case("both-directions-must-allow", knp("egress-a", "x", """
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]
        """) + "---\n" + knp("deny-b", "x", "podSelector: {matchLabels: {pod: b}}"), expect=[[
        ("x/a", "x/b", 80, "TCP", "dropped"),  # egress allows, b's ingress does not
        ("x/a", "x/c", 80, "TCP", "dropped"),  # egress does not allow
        ("x/c", "x/a", 80, "TCP", "allowed"), ("y/a", "x/b", 81, "UDP", "dropped")]]),
    Case("policy-types-defaulting", knp("both", "x", """
        podSelector: {matchLabels: {pod: a}}
        egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]
        """), expect=[[
        ("x/a", "x/b", 80, "TCP", "allowed"), ("x/a", "x/c", 80, "TCP", "dropped"),
        ("x/c", "x/a", 80, "TCP", "dropped"),  # Ingress is always in the defaulted types
        ("x/a", "w1", 80, "TCP", "dropped")]]),
    Case("explicit-policy-types-ignore-other-direction", knp("egress-only", "x", """
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        egress: [{}]
        """), expect=[[("x/c", "x/a", 80, "TCP", "allowed"), ("x/a", "y/c", 81, "UDP", "allowed"),
                       ("x/a", "w3", 80, "TCP", "allowed")]]),
    Case("ip-block-with-except", knp("egress-cidr", "x", """
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
          - to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]
          - to: [{ipBlock: {cidr: 10.0.0.0/8}}]
        """) + "---\n" + knp("ingress-cidr", "x", """
        podSelector: {matchLabels: {pod: b}}
        ingress:
          - from: [{ipBlock: {cidr: 198.51.100.0/24}}, {ipBlock: {cidr: 0.0.0.0/0, except: [203.0.113.0/24]}}]
            ports: [{port: 81, protocol: UDP}]
        """), expect=[[
        ("x/a", "w1", 80, "TCP", "allowed"), ("x/a", "w1", 81, "UDP", "allowed"),
        ("x/a", "w2", 80, "TCP", "dropped"),  # in the except
        ("x/a", "w3", 80, "TCP", "dropped"),  # outside the block
        ("x/a", "x/b", 80, "TCP", "dropped"),  # the pod IP is in 10.0.0.0/8, but ipBlock is for cluster-external IPs
        ("w3", "x/b", 81, "UDP", "allowed"), ("w3", "x/b", 80, "UDP", "dropped"),
        ("w1", "x/b", 81, "UDP", "dropped"),  # excepted from 0.0.0.0/0, not in 198.51.100.0/24
        ("w1", "x/a", 80, "TCP", "allowed")]]),  # ingress of x/a is not isolated
    Case("update-replaces-old-version-then-relabels", knp("allow", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        """), steps="""\
        steps:
          - name: replace
            apply:
              - apiVersion: networking.k8s.io/v1
                kind: NetworkPolicy
                metadata: {name: allow, namespace: x}
                spec:
                  podSelector: {matchLabels: {pod: a}}
                  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]
          - name: relabel pod
            relabel:
              - {pod: x/b, set: {pod: c}}
          - name: relabel namespace
            relabel:
              - {namespace: y, set: {ns: x}}
          - name: widen to namespace x by label
            apply:
              - apiVersion: networking.k8s.io/v1
                kind: NetworkPolicy
                metadata: {name: allow, namespace: x}
                spec:
                  podSelector: {matchLabels: {pod: a}}
                  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: c}}}]}]
          - name: delete
            delete:
              - {kind: NetworkPolicy, name: allow, namespace: x}
        """, expect=[
        [("x/b", "x/a", 80, "TCP", "allowed"), ("x/c", "x/a", 80, "TCP", "dropped")],
        [("x/b", "x/a", 80, "TCP", "dropped"), ("x/c", "x/a", 81, "UDP", "allowed")],  # old version gone
        [("x/b", "x/a", 80, "TCP", "allowed"), ("x/c", "x/a", 80, "TCP", "allowed")],  # b now carries pod=c
        [("y/c", "x/a", 80, "TCP", "dropped")],  # podSelector alone stays in the policy's namespace
        [("y/c", "x/a", 80, "TCP", "allowed"), ("z/c", "x/a", 80, "TCP", "dropped"),  # y now has ns=x
         ("x/b", "x/a", 81, "UDP", "allowed"), ("y/b", "x/a", 80, "TCP", "dropped")],
        [("y/b", "x/a", 80, "TCP", "allowed"), ("w1", "x/a", 80, "UDP", "allowed")],  # no policy left
    ]),
    Case("enforcement-always", settings="policyEnforcement: always", expect=[[
        ("x/a", "y/b", 80, "TCP", "dropped"), ("w1", "x/a", 80, "UDP", "dropped"),
        ("x/a", "w1", 81, "TCP", "dropped")]]),
    Case("enforcement-always-with-allow", knp("allow", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        """), settings="policyEnforcement: always", expect=[[
        ("y/a", "x/a", 80, "TCP", "dropped"),  # x/a's ingress allows, y/a's egress (always enforced) does not
        ("x/b", "x/a", 80, "TCP", "dropped")]]),
    Case("enforcement-never", DENY_INGRESS_X, settings="policyEnforcement: never", expect=[[
        ("y/a", "x/a", 80, "TCP", "allowed"), ("w1", "x/b", 81, "UDP", "allowed")]]),
    Case("ip-block-of-a-pod-cilium-default", IP_BLOCK_OF_YB, expect=[[
        ("y/b", "x/a", 80, "TCP", "dropped"), ("y/c", "x/a", 80, "TCP", "dropped")]]),
    Case("ip-block-of-a-pod-selects-it", IP_BLOCK_OF_YB, settings="ipBlockSelectsPods: true", expect=[[
        ("y/b", "x/a", 80, "TCP", "allowed"), ("y/b", "x/a", 81, "UDP", "allowed"),
        ("y/c", "x/a", 80, "TCP", "dropped"), ("w1", "x/a", 80, "TCP", "dropped")]]),
    Case("ip-block-except-a-pod", IP_BLOCK_EXCEPT, settings="ipBlockSelectsPods: true", expect=[[
        ("x/a", "y/a", 80, "TCP", "allowed"), ("x/a", "y/c", 81, "UDP", "allowed"),
        ("x/a", "y/b", 80, "TCP", "dropped"), ("x/a", "z/a", 80, "TCP", "dropped"),
        ("x/a", "w1", 80, "TCP", "dropped")]]),
    Case("audit", DENY_INGRESS_X, settings="audit: true", expect=[[
        ("y/a", "x/a", 80, "TCP", "allowed"), ("x/b", "x/c", 81, "UDP", "allowed"),
        ("w1", "x/a", 80, "TCP", "allowed")]]),
]


LAB_PREFIX = "dk"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)
pytestmark = pytest.mark.usefixtures("wide_probes")


def matrix_probes(engine: PolicyEngine):  # noqa: ANN201
    pairs = all_pod_pairs() + [(p, p) for p in PODS]  # loopback too: it follows no policy
    pairs += [(p, w) for p in PODS for w in WORLD] + [(w, p) for w in WORLD for p in PODS]
    return pair_probes(engine, pairs, PORTS_ALL) + closed_port_probes(engine)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kubernetes_case_on_real_traffic(klab: KernelLab, case: Case) -> None:
    engine = PolicyEngine(make_scenario(case.policies, case.settings, case.steps))
    klab.switch(engine)
    policy_steps = [s for s in engine.scenario.steps if s.kind != "probes"]
    assert len(case.expect) == len(policy_steps) + 1
    for phase, expected in enumerate(case.expect):
        if phase:
            klab.apply(policy_steps[phase - 1])
        out = klab.run(matrix_probes(engine))
        assert len(out.results) == 540 + 2 * 26
        assert not out.disagreements(), (phase, out.disagreements()[:20])
        got = {e[:4]: out[e[:4]] for e in expected}
        assert got == {e[:4]: e[4] for e in expected}, f"phase {phase}"
        # upstream netpol e2e (Reachability.AllowLoopback): a pod always reaches itself
        assert all(out[(p, p, 80, "TCP")] == "allowed" and out[(p, p, 81, "UDP")] == "allowed" for p in PODS)
        if not case.policies and not case.settings:
            # nothing isolates: a closed port answers "refused", UDP included (the ICMP port
            # unreachable is RELATED to the datagram's flow and passes conntrack)
            closed = [r.observed.outcome for r in out.results if r.probe.destination.port == 82]
            assert len(closed) == 52 and set(closed) == {"refused"}


def test_same_state_twice_writes_nothing_and_a_change_is_a_small_diff(klab: KernelLab) -> None:
    """The loader's sync is a diff: the same state again writes nothing; one more policy writes
    only its entries (no endpoint or ipcache churn)."""
    base = make_scenario(DENY_INGRESS_X)
    klab.switch(PolicyEngine(base))
    assert klab.switch(PolicyEngine(base)).total == 0
    more = make_scenario(DENY_INGRESS_X + "---\n" + knp("from-z", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 80}]}]
        """))
    stats = klab.switch(PolicyEngine(more))
    assert set(stats.added) == {"policy"} and not stats.deleted and not stats.updated
    out = klab.run(pair_probes(klab.engine, [("z/a", "x/a"), ("y/a", "x/a"), ("z/b", "x/b")], PORTS_ALL))
    assert not out.disagreements()
    assert out[("z/a", "x/a", 80, "TCP")] == "allowed" and out[("z/a", "x/a", 81, "TCP")] == "dropped"
    assert out[("y/a", "x/a", 80, "TCP")] == "dropped" and out[("z/b", "x/b", 80, "TCP")] == "dropped"
