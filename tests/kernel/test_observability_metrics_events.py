"""Metrics, flow events and audit mode on real traffic (issue 4).

Counting is exact where the traffic is: single UDP datagrams (one packet per dropped flow, no
retransmissions), and for TCP the drop events of a flow (SYN retransmissions are drops too).
Forwarded packets are only bounded from below: ARP is counted as forwarded and may appear
whenever a neighbour entry expires. Events are checked field by field against the resolver's
identities, endpoint ids and rule attribution (`map_state().rules`), and against the oracle.
"""

from __future__ import annotations

from collections import Counter

import pytest

from dataplane.abi import Direction
from dataplane.policy import Flow, PolicyEngine
from dataplane.abi import DropReason, FlowVerdict, Hook
from tests.support.kernel_lab import KernelLab, cnp, knp, make_probe, make_scenario, pair_probes

POLICIES = (knp("deny-all", "x", "podSelector: {}") + "---\n"
            + knp("allow-y", "x", """
                podSelector: {matchLabels: {pod: c}}
                ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81, protocol: UDP}]}]
                """) + "---\n"
            + cnp("deny-z", "y", """
                endpointSelector: {matchLabels: {pod: a}}
                ingress: [{fromEntities: [all]}]
                ingressDeny: [{fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: z}}]}]
                """) + "---\n"
            + knp("no-egress", "x", """
                podSelector: {matchLabels: {pod: b}}
                policyTypes: [Egress]
                """))

# (source, destination, protocol, port, flows): what each batch sends
DROPS = [("y/a", "x/a", "UDP", 81, 5),     # x/a: isolated ingress, nothing allows: POLICY_DENIED at ingress
         ("z/a", "y/a", "UDP", 81, 3),     # y/a: ingressDeny from z beats fromEntities all: EXPLICIT_DENY
         ("x/b", "w1", "UDP", 80, 2)]      # x/b: isolated egress: POLICY_DENIED at egress
ALLOWS = [("y/b", "z/b", "UDP", 81, 4),    # no policy on either side
          ("y/c", "x/c", "UDP", 81, 3),    # NetworkPolicy x/allow-y ingress[0]
          ("x/a", "y/a", "UDP", 80, 2)]    # CiliumNetworkPolicy y/deny-z ingress[0] (fromEntities all)


LAB_PREFIX = "ob"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)
pytestmark = pytest.mark.usefixtures("wide_probes")


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def send(klab: KernelLab, batch: list, timeout_dropped: float = 0.4) -> list[tuple[str, str, str, int, int, str]]:
    """Each flow once; returns (src, dst, proto, port, sport, observed outcome)."""
    sent = []
    for src, dst, proto, port, flows in batch:
        for _ in range(flows):
            obs = klab.observe(src, dst, port, proto, timeout_dropped)
            sent.append((src, dst, proto, port, obs.extra["sport"], obs.outcome))
            if proto == "UDP":
                # A later datagram may get the same (random) source port: it must be new to
                # conntrack too, and so produce its own event. Flushing changes no counter. (Not
                # after TCP: its teardown packets, still on their way, would become new flows.)
                klab.datapath.flush_conntrack()
    return sent


def flow_key(klab: KernelLab, src: str, dst: str, proto: str, port: int, sport: int) -> tuple:
    return (ip_of(klab, src), sport, ip_of(klab, dst), port, 17 if proto == "UDP" else 6)


def flows_per_key(klab: KernelLab, sent: list) -> Counter:
    """How many of the flows sent share each 5-tuple (source ports are random and may repeat)."""
    return Counter(flow_key(klab, src, dst, proto, port, sport) for src, dst, proto, port, sport, _ in sent)


def ip_of(klab: KernelLab, name: str) -> str:
    return klab.lab.record.endpoints[name].ip


def events_by_flow(klab: KernelLab, events: list) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for ev in events:
        out.setdefault((ev.src, ev.sport, ev.dst, ev.dport, ev.protocol), []).append(ev)
    return out


def check_event_identities(klab: KernelLab, ev, src: str, dst: str, proto: str, port: int) -> None:  # noqa: ANN001
    engine, state = klab.engine, klab.engine.map_state()
    ids = engine.identities
    assert ev.src_identity == ids.pod_identity[src]
    if dst in klab.scenario.pods:
        assert ev.dst_identity == ids.pod_identity[dst]
        assert ev.dst_endpoint == engine.endpoint_id(dst)
    else:
        assert ev.dst_identity == state.identity_of(ip_of(klab, dst))
        assert ev.dst_endpoint == 0
    assert ev.src_endpoint == engine.endpoint_id(src)
    assert ev.hook == Hook.FROM_CONTAINER
    assert ev.ifindex == klab.lab.record.endpoints[src].ifindex
    decision = engine.verdict(Flow.from_probe(make_probe(klab.scenario, src, dst, port, proto, "allowed", 1)))
    assert (decision.source_identity, decision.destination_identity) == (ev.src_identity, ev.dst_identity)
    if ev.rule_id:
        assert ev.rule_id in decision.rule_ids


def test_metrics_and_events_count_and_describe_each_flow(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(POLICIES)))
    dp = klab.datapath
    before = dp.metrics()
    dropped = send(klab, DROPS)
    allowed = send(klab, ALLOWS, timeout_dropped=3.0)
    # one TCP connection that is dropped: its SYN (and any retransmission) are drop events
    tcp = send(klab, [("y/b", "x/a", "TCP", 80, 1)])
    after = dp.metrics()
    events = dp.poll_events(timeout_ms=100)
    assert {o for *_, o in dropped + tcp} == {"dropped"} and {o for *_, o in allowed} == {"allowed"}

    by_flow = events_by_flow(klab, events)
    state = klab.engine.map_state()
    tcp_key = (ip_of(klab, "y/b"), tcp[0][4], ip_of(klab, "x/a"), 80, 6)
    tcp_drops = by_flow[tcp_key]
    assert tcp_drops and all(e.verdict == FlowVerdict.DROP and e.reason == DropReason.POLICY_DENIED
                             and e.tcp_flags & 0x02 for e in tcp_drops)

    # Metrics: exactly one drop per UDP flow, plus the TCP flow's drop events.
    d = delta(before, after)
    drops = {k: v for k, v in d.items() if k[0] == FlowVerdict.DROP}
    assert drops == {
        (FlowVerdict.DROP, DropReason.POLICY_DENIED, Direction.INGRESS): 5 + len(tcp_drops),
        (FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY, Direction.INGRESS): 3,
        (FlowVerdict.DROP, DropReason.POLICY_DENIED, Direction.EGRESS): 2,
    }
    assert not any(k[0] == FlowVerdict.AUDIT for k in d)
    # Each allowed exchange is at least datagram + echo, each seen at both hooks.
    assert d.get((FlowVerdict.FORWARD, DropReason.NONE, Direction.INGRESS), 0) >= 4 * 9

    expected_drop = {"x/a": (DropReason.POLICY_DENIED, Direction.INGRESS, None),
                     "y/a": (DropReason.POLICY_EXPLICIT_DENY, Direction.INGRESS, ("CiliumNetworkPolicy y/deny-z", "ingressDeny", 0)),
                     "w1": (DropReason.POLICY_DENIED, Direction.EGRESS, None)}
    per_key = flows_per_key(klab, dropped + allowed)
    for src, dst, proto, port, sport, _ in dropped:
        key = flow_key(klab, src, dst, proto, port, sport)
        evs = by_flow[key]
        assert len(evs) == per_key[key], evs  # one event per flow
        ev = evs[0]
        reason, direction, rule = expected_drop[dst]
        assert (ev.verdict, ev.reason, ev.direction) == (FlowVerdict.DROP, reason, direction)
        assert ev.endpoint_id == klab.engine.endpoint_id(src if direction == Direction.EGRESS else dst)
        check_event_identities(klab, ev, src, dst, proto, port)
        if rule is None:
            assert ev.rule_id == 0
        else:
            attr = state.rules[ev.rule_id]
            assert (attr.policy, attr.section, attr.rule_index) == rule

    expected_allow = {"z/b": None, "x/c": ("NetworkPolicy x/allow-y", "ingress", 0),
                      "y/a": ("CiliumNetworkPolicy y/deny-z", "ingress", 0)}
    for src, dst, proto, port, sport, _ in allowed:
        key = flow_key(klab, src, dst, proto, port, sport)
        evs = by_flow[key]
        assert len(evs) == per_key[key], evs  # one event per new flow; the echo is a reply: no event
        ev = evs[0]
        assert (ev.verdict, ev.reason, ev.direction) == (FlowVerdict.FORWARD, DropReason.NONE, Direction.INGRESS)
        check_event_identities(klab, ev, src, dst, proto, port)
        rule = expected_allow[dst]
        if rule is None:
            assert ev.rule_id == 0
        else:
            attr = state.rules[ev.rule_id]
            assert (attr.policy, attr.section, attr.rule_index) == rule
    # No event for anything but these flows' first packets (echo replies pass by conntrack).
    assert len(events) == len(dropped) + len(allowed) + len(tcp_drops)


def test_runner_attaches_the_kernel_event_to_each_probe(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(POLICIES)))
    out = klab.run(pair_probes(klab.engine, [("y/a", "x/a"), ("z/a", "y/a"), ("y/c", "x/c")], (("UDP", 81),)))
    assert not out.disagreements()
    kernel = {(r.probe.source, r.probe.destination.name): r.kernel for r in out.results}
    assert kernel[("y/a", "x/a")] == "DROP POLICY_DENIED at ingress of x/a"
    assert kernel[("z/a", "y/a")] == "DROP POLICY_EXPLICIT_DENY at ingress of y/a by CiliumNetworkPolicy y/deny-z ingressDeny[0]"
    assert kernel[("y/c", "x/c")] == "FORWARD at ingress of x/c by NetworkPolicy x/allow-y ingress[0]"


def test_audit_mode_passes_would_be_drops_and_reports_audit(klab: KernelLab) -> None:
    """settings.audit: the resolver sets EndpointState.audit on every endpoint (the per-endpoint
    flag the datapath reads); would-be drops pass, once per flow as AUDIT with the reason that
    would have applied."""
    engine = PolicyEngine(make_scenario(POLICIES, settings="audit: true"))
    assert all(ep.audit for ep in engine.map_state().endpoints.values())
    klab.switch(engine)
    dp = klab.datapath
    before = dp.metrics()
    sent = send(klab, DROPS, timeout_dropped=3.0)
    tcp = send(klab, [("y/b", "x/a", "TCP", 80, 2)], timeout_dropped=3.0)
    after = dp.metrics()
    events = dp.poll_events(timeout_ms=100)
    assert {o for *_, o in sent + tcp} == {"allowed"}
    d = delta(before, after)
    assert not any(k[0] == FlowVerdict.DROP for k in d), d
    assert {k: v for k, v in d.items() if k[0] == FlowVerdict.AUDIT} == {
        (FlowVerdict.AUDIT, DropReason.POLICY_DENIED, Direction.INGRESS): 5 + 2,
        (FlowVerdict.AUDIT, DropReason.POLICY_EXPLICIT_DENY, Direction.INGRESS): 3,
        (FlowVerdict.AUDIT, DropReason.POLICY_DENIED, Direction.EGRESS): 2,
    }
    by_flow = events_by_flow(klab, events)
    per_key = flows_per_key(klab, sent + tcp)
    for src, dst, proto, port, sport, _ in sent + tcp:
        key = flow_key(klab, src, dst, proto, port, sport)
        evs = by_flow[key]
        assert [e.verdict for e in evs] == [FlowVerdict.AUDIT] * per_key[key], evs
        check_event_identities(klab, evs[0], src, dst, proto, port)
        decision = engine.verdict(Flow.from_probe(make_probe(klab.scenario, src, dst, port, proto, "allowed", 1)))
        assert decision.outcome == "allowed" and decision.audited
    assert Counter(e.verdict for e in events) == Counter({FlowVerdict.AUDIT: len(sent) + len(tcp)})
    # Flows that policy allows are not audited: an ordinary FORWARD, no AUDIT count.
    before = dp.metrics()
    ok = send(klab, [("y/c", "x/c", "UDP", 81, 2)], timeout_dropped=3.0)
    evs = dp.poll_events(timeout_ms=100)
    assert {o for *_, o in ok} == {"allowed"}
    assert [e.verdict for e in evs] == [FlowVerdict.FORWARD] * 2
    assert not any(k[0] == FlowVerdict.AUDIT for k in delta(before, dp.metrics()))
