"""Ping (ICMP echo) under a policy matrix, on real traffic: the kernel must agree with the oracle
on every ping between every pair of pods, from every pod to every world host and back, and
Cilium's semantics must hold (docs.cilium.io security/policy language "ICMP/ICMPv6";
pkg/policy/rule.go): an `icmps` rule allows the types it names, in ingress, egress and the deny
sections; a rule without ports (L3-only) allows ICMP; `toPorts` never does (protocol ANY is
TCP, UDP and SCTP, port 0 included); a Kubernetes peer without ports allows ICMP; an IPv6
`icmps` field never matches. Echo replies pass as replies of their request, and only then.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from dataplane.lab import node_netns
from dataplane.policy import Flow, PolicyEngine
from dataplane.probes import ping_socket_allowed, run_probe
from dataplane.scenario import Destination, IcmpMessage, Probe
from dataplane import topology
from tests.support.kernel_lab import (DROP_TIMEOUT, HERE, PASS_TIMEOUT, PODS, WORLD, KernelLab, all_pod_pairs, cnp,
                                      knp, make_scenario, oracle_probe, target)

LAB_PREFIX = "di"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)
pytestmark = pytest.mark.usefixtures("wide_probes")

Expect = tuple[str, str, str, str]  # (source, destination, "ICMP" or "TCP/80", outcome)


def ping_probe(engine: PolicyEngine, src: str, dst: str, expect: str | None = None,
               echo_id: int | None = None) -> Probe:
    """A ping whose expectation is the oracle's answer unless given."""
    dest: Destination = target(engine.scenario, dst, 0)
    probe = Probe(src, dest, "ICMP", "allowed", None, 1.0, HERE, icmp=IcmpMessage())
    outcome = expect or engine.verdict(Flow.from_probe(probe)).outcome
    return Probe(src, dest, "ICMP", outcome, None, DROP_TIMEOUT if outcome == "dropped" else PASS_TIMEOUT, HERE,
                 icmp=IcmpMessage())


def ping_pairs() -> list[tuple[str, str]]:
    return all_pod_pairs() + [(p, w) for p in PODS for w in WORLD] + [(w, p) for w in WORLD for p in PODS]


@dataclass
class Case:
    name: str
    policies: str
    expect: list[Expect] = field(default_factory=list)


CASES = [
    Case("icmps-echo-request-ingress", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: b}}]
            icmps: [{fields: [{type: 8, family: IPv4}]}]
        """), [("x/b", "x/a", "ICMP", "allowed"), ("y/b", "x/a", "ICMP", "dropped"),
               ("x/c", "x/a", "ICMP", "dropped"), ("w1", "x/a", "ICMP", "dropped"),
               ("x/b", "x/a", "TCP/80", "dropped"),
               ("x/a", "x/b", "ICMP", "allowed")]),  # x/b's echo reply enters x/a as a reply
    Case("icmps-by-name-egress", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress:
          - toEndpoints: [{}]
            icmps: [{fields: [{type: EchoRequest}]}]
        """), [("x/a", "x/b", "ICMP", "allowed"), ("x/a", "y/b", "ICMP", "dropped"),
               ("x/a", "w1", "ICMP", "dropped"), ("x/a", "x/b", "TCP/80", "dropped"),
               ("y/b", "x/a", "ICMP", "allowed")]),  # x/a's echo reply leaves as a reply
    Case("icmps-echo-reply-type-only", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{icmps: [{fields: [{type: EchoReply}]}]}]
        """), [("x/b", "x/a", "ICMP", "dropped"), ("w2", "x/a", "ICMP", "dropped"),
               ("x/a", "x/b", "ICMP", "allowed"), ("x/a", "w2", "ICMP", "allowed")]),
    Case("to-ports-tcp-only", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: b}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        """), [("x/b", "x/a", "TCP/80", "allowed"), ("x/b", "x/a", "ICMP", "dropped")]),
    Case("to-ports-any-protocol-port-zero", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: b}}]
            toPorts: [{ports: [{port: "0"}]}]
        """), [("x/b", "x/a", "TCP/80", "allowed"), ("x/b", "x/a", "ICMP", "dropped")]),
    Case("l3-only", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
        egress: [{toEntities: [world]}]
        """), [("x/b", "x/a", "ICMP", "allowed"), ("x/c", "x/a", "ICMP", "dropped"),
               ("x/a", "w3", "ICMP", "allowed"), ("x/a", "x/b", "ICMP", "dropped")]),
    Case("k8s-peer-without-ports", knp("k", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        """), [("x/b", "x/a", "ICMP", "allowed"), ("x/c", "x/a", "ICMP", "dropped")]),
    Case("k8s-peer-with-ports", knp("k", "x", """
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}, {protocol: UDP}]}]
        """), [("x/b", "x/a", "TCP/80", "allowed"), ("x/b", "x/a", "ICMP", "dropped")]),
    Case("ingress-deny-icmps-over-l3-allow", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEntities: [all]}]
        ingressDeny: [{icmps: [{fields: [{type: 8}]}]}]
        """), [("x/b", "x/a", "ICMP", "dropped"), ("w1", "x/a", "ICMP", "dropped"),
               ("x/b", "x/a", "TCP/80", "allowed")]),
    Case("egress-deny-icmps-to-world", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        egress: [{toEntities: [all]}]
        egressDeny: [{toEntities: [world], icmps: [{fields: [{type: EchoRequest}]}]}]
        """), [("x/a", "w1", "ICMP", "dropped"), ("x/a", "w1", "TCP/80", "allowed"),
               ("x/a", "y/c", "ICMP", "allowed")]),
    Case("icmps-ipv6-never-matches", cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: b}}]
            icmps: [{fields: [{type: EchoRequest, family: IPv6}]}]
        """), [("x/b", "x/a", "ICMP", "dropped"), ("x/b", "x/a", "TCP/80", "dropped")]),
    Case("from-cidr-icmps", cnp("p", "y", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromCIDR: [203.0.113.0/24]
            icmps: [{fields: [{type: "8"}]}]
        """), [("w1", "y/a", "ICMP", "allowed"), ("w2", "y/a", "ICMP", "allowed"),
               ("w3", "y/a", "ICMP", "dropped"), ("x/a", "y/a", "ICMP", "dropped")]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ping_case_on_real_traffic(klab: KernelLab, case: Case) -> None:
    engine = PolicyEngine(make_scenario(case.policies))
    klab.switch(engine)
    tcp = [(s, d) for s, d, what, _ in case.expect if what == "TCP/80"]
    out = klab.run([ping_probe(engine, s, d) for s, d in ping_pairs()]
                   + [oracle_probe(engine, s, d, 80, "TCP") for s, d in tcp])
    assert not out.disagreements(), out.disagreements()[:20]
    got = {(s, d, what): out[(s, d, 0, "ICMP") if what == "ICMP" else (s, d, 80, "TCP")]
           for s, d, what, _ in case.expect}
    assert got == {e[:3]: e[3] for e in case.expect}


def test_mirrored_echo_request_is_judged(klab: KernelLab) -> None:
    """x/a pings x/b with echo id 4242 (allowed); x/b then pings x/a with the same id. Its
    request is not the reply of x/a's: x/a's ingress (nothing from x/b) drops it, while x/a's
    own pings keep passing."""
    engine = PolicyEngine(make_scenario(cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress: [{fromEndpoints: [{matchLabels: {pod: c}}]}]
        """)))
    klab.switch(engine)

    def ping(src: str, dst: str) -> str:
        probe = ping_probe(engine, src, dst)
        return asyncio.run(run_probe(probe, klab.netns(src), 4242)).outcome

    assert ping("x/a", "x/b") == "allowed"
    assert ping("x/b", "x/a") == "dropped"
    assert ping("x/a", "x/b") == "allowed"


def test_ping_from_a_raw_socket(klab: KernelLab) -> None:
    """Pods may open ICMP datagram sockets (the lab sets their net.ipv4.ping_group_range, as a
    pod's safe sysctls allow); where the range admits no group of the prober, it pings through
    a raw socket instead: the same verdicts, the kernel's event found by the echo id. The node's
    own namespace keeps the kernel's default ("1 0"): its pings (identity host, allowed by
    allow-localhost under default deny) go through a raw socket too."""
    engine = PolicyEngine(make_scenario(cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: b}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: a}}]
            icmps: [{fields: [{type: EchoRequest}]}]
        """)))
    klab.switch(engine)
    netns = klab.netns("x/a")
    assert ping_socket_allowed(netns)
    before = topology.sysctl_read(netns, "net.ipv4.ping_group_range")
    topology.sysctl(netns, "net.ipv4.ping_group_range", "1 0")
    try:
        assert not ping_socket_allowed(netns)
        out = klab.run([ping_probe(engine, "x/a", "x/b"), ping_probe(engine, "x/a", "x/c", "allowed"),
                        ping_probe(engine, "y/c", "x/b", "dropped")])
        assert not out.disagreements(), out.disagreements()
        assert [r.observed.outcome for r in out.results] == ["allowed", "allowed", "dropped"]
        assert out.results[0].kernel is not None and out.results[0].observed.extra["echo_id"] > 0
    finally:
        topology.sysctl(netns, "net.ipv4.ping_group_range", " ".join(before.split()))
    node = node_netns(klab.lab.name)
    assert not ping_socket_allowed(node)
    from_node = ping_probe(engine, "x/a", "x/b", "allowed")
    assert asyncio.run(run_probe(from_node, node)).outcome == "allowed"


def test_a_ping_is_traced_request_and_reply(klab: KernelLab) -> None:
    """`trace_in_lab` follows a ping by its echo id: the request judged by the `icmps` entry
    (protocol ICMP, port 8), its echo reply found by conntrack as the request's REPLY."""
    from dataplane.tracing import trace_in_lab  # noqa: PLC0415

    engine = PolicyEngine(make_scenario(cnp("p", "x", """
        endpointSelector: {matchLabels: {pod: a}}
        ingress:
          - fromEndpoints: [{matchLabels: {pod: b}}]
            icmps: [{fields: [{type: EchoRequest}]}]
        """)))
    klab.switch(engine)
    trace = asyncio.run(trace_in_lab(klab.lab, engine, ping_probe(engine, "x/b", "x/a"))).to_json()
    assert trace["outcome"] == "allowed" and trace["disagreements"] == []
    texts = [(s["phase"], s["title"]) for s in trace["steps"]]
    assert any(phase == "request" and text.startswith("ingress policy of x/a, lookup 1 (identity, protocol, port)")
               and text.endswith("proto=ICMP port=8 -> hit: ALLOW CiliumNetworkPolicy x/p ingress[0]")
               for phase, text in texts), texts
    assert any(phase == "reply" and text.startswith("conntrack: REPLY") for phase, text in texts), texts
