"""The policy verdicts of both tc programs on test packets (BPF_PROG_TEST_RUN), each compared
with the oracle of tests.support.prog_run (`mapstate.lookup_policy` over the same MapState, the
Python twin of the kernel's lookup): allow, default deny, explicit deny, port ranges, audit mode
(the whole datapath and one endpoint), traffic from the node, and source anti-spoofing.
The precedence itself is explained once, in docs/datapath.md."""

from __future__ import annotations

from dataclasses import replace

import pytest
from scapy.all import IP, TCP  # type: ignore[import-untyped]
from dataplane.abi import MARK_MAGIC_DECIDED, MARK_MAGIC_MASK
from dataplane.datapath import Datapath
from dataplane.mapstate import MapState, PolicyEntry, PolicyKey
from dataplane.abi import IDENTITY_ANY, IDENTITY_HOST, PROTO_ANY, PROTO_TCP, Verdict
from dataplane.abi import DropReason, FlowVerdict
from tests.support.prog_run import (A, B, C, EG, ING, NODE, PROBES, TC_ACT_OK, TC_ACT_SHOT, WORLD_HOST, allow,
                                    base_state, eth, expect_verdict, oracle, packet, run)

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("src,dst,proto,port", PROBES)
def test_bpf_verdict_matches_oracle(dp: Datapath, src: str, dst: str, proto: int, port: int) -> None:
    state = base_state()
    dp.sync(state)
    (verdict, reason, direction, rule), other_rule = oracle(state, src, dst, proto, port, other=True)
    retval, mark, events = run(dp, packet(src, dst, proto, port))
    expect_verdict(retval, verdict)
    assert len(events) == 1
    ev = events[0]
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id) == (verdict, reason, direction, rule)
    assert ev.other_rule_id == other_rule  # the other direction's allowing rule, named too
    if verdict != FlowVerdict.DROP:
        assert mark & MARK_MAGIC_MASK == MARK_MAGIC_DECIDED


def test_bpf_probe_set_covers_every_outcome(dp: Datapath) -> None:
    state = base_state()
    seen = {oracle(state, *p)[:2] for p in PROBES}
    assert {(FlowVerdict.FORWARD, DropReason.NONE), (FlowVerdict.DROP, DropReason.POLICY_DENIED),
            (FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY)} <= seen


def test_bpf_explicit_deny_beats_allow_of_same_key_class(dp: Datapath) -> None:
    """A DENY on the any-identity any-protocol key beats an exact ALLOW."""
    state = base_state()
    state.policy[PolicyKey(2, ING, IDENTITY_ANY, PROTO_ANY)] = PolicyEntry(Verdict.DENY, 0, (99,))
    dp.sync(state)
    retval, _, events = run(dp, packet(A, B, PROTO_TCP, 80))
    assert retval == TC_ACT_SHOT
    assert (events[0].reason, events[0].rule_id, events[0].direction) == (DropReason.POLICY_EXPLICIT_DENY, 99, ING)
    assert oracle(state, A, B, PROTO_TCP, 80)[:2] == (FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY)


def test_bpf_port_range_boundaries(dp: Datapath) -> None:
    state = base_state()
    dp.sync(state)
    got = {p: run(dp, packet(A, B, PROTO_TCP, p))[0] for p in (7999, 8000, 8050, 8100, 8101)}
    assert got == {7999: TC_ACT_SHOT, 8000: TC_ACT_OK, 8050: TC_ACT_OK, 8100: TC_ACT_OK, 8101: TC_ACT_SHOT}


def test_bpf_audit_mode_passes_would_be_drops(dp_audit: Datapath) -> None:
    state = base_state()
    dp_audit.sync(state)
    for src, dst, proto, port in PROBES:
        verdict, reason, direction, rule = oracle(state, src, dst, proto, port, audit=True)
        retval, _, events = run(dp_audit, packet(src, dst, proto, port))
        assert retval == TC_ACT_OK
        assert (events[0].verdict, events[0].reason, events[0].rule_id) == (verdict, reason, rule)
    retval, _, events = run(dp_audit, packet(A, B, PROTO_TCP, 81, 45000))  # a new flow
    assert (retval, events[0].verdict, events[0].reason) == (TC_ACT_OK, FlowVerdict.AUDIT, DropReason.POLICY_DENIED)


def test_bpf_per_endpoint_audit(dp: Datapath) -> None:
    state = base_state()
    state.endpoints[2] = replace(state.endpoints[2], audit=True)
    dp.sync(state)
    retval, _, events = run(dp, packet(C, B, PROTO_TCP, 22))           # B's explicit deny, audited
    assert (retval, events[0].verdict, events[0].reason) == (TC_ACT_OK, FlowVerdict.AUDIT,
                                                             DropReason.POLICY_EXPLICIT_DENY)
    retval, _, events = run(dp, packet(A, B, PROTO_TCP, 81))           # A's egress is not audited
    assert (retval, events[0].verdict) == (TC_ACT_SHOT, FlowVerdict.DROP)


def test_bpf_to_container_host_traffic(dp: Datapath) -> None:
    state = base_state()
    dp.sync(state)
    # The node reaching B: B allows host. Reaching A: A's ingress is enforced, no host rule.
    retval, _, events = run(dp, packet(NODE, B, PROTO_TCP, 9999), "to_container")
    assert retval == TC_ACT_OK
    assert (events[0].src_identity, events[0].rule_id, events[0].verdict) == (IDENTITY_HOST, 26, FlowVerdict.FORWARD)
    retval, _, events = run(dp, packet(NODE, A, PROTO_TCP, 9999), "to_container")
    assert (retval, events[0].reason, events[0].direction) == (TC_ACT_SHOT, DropReason.POLICY_DENIED, ING)
    # A reply to a connection A opened towards the node passes.
    assert run(dp, packet(A, NODE, PROTO_TCP, 9999, 40030))[0] == TC_ACT_SHOT  # A's egress: no rule
    state.policy[PolicyKey(1, EG, IDENTITY_HOST, PROTO_ANY)] = allow(15)
    dp.sync(state)
    assert run(dp, packet(A, NODE, PROTO_TCP, 9999, 40030))[0] == TC_ACT_OK
    reply = bytes(eth() / IP(src=NODE, dst=A) / TCP(sport=9999, dport=40030, flags="SA"))
    assert run(dp, reply, "to_container")[::2] == (TC_ACT_OK, [])
    # Not towards a pod (a world link): passes.
    assert run(dp, packet(NODE, WORLD_HOST, PROTO_TCP, 80), "to_container")[0] == TC_ACT_OK


def test_bpf_source_spoofing(dp: Datapath) -> None:
    dp.sync(base_state(), interfaces={101: 1, 102: 2, 200: 0})
    try:
        assert dp.test_run_full("from_container", packet(A, B), ingress_ifindex=101).retval == TC_ACT_OK
        dp.flush_conntrack()
        r = dp.test_run_full("from_container", packet(A, B), ingress_ifindex=102)   # B's veth claims A
        assert r.retval == TC_ACT_SHOT
        r = dp.test_run_full("from_container", packet(A, B), ingress_ifindex=200)   # world link claims A
        assert r.retval == TC_ACT_SHOT
        r = dp.test_run_full("from_container", packet("10.9.9.9", B), ingress_ifindex=101)
        assert r.retval == TC_ACT_SHOT
        reasons = [e.reason for e in dp.poll_events()]
        assert reasons[1:] == [DropReason.SOURCE_SPOOFED] * 3
    finally:
        dp.sync(MapState(), interfaces={})


def test_bpf_a_flow_both_sides_allow_names_both_rules(dp: Datapath) -> None:
    """A -> B:80 is allowed by A's egress rule 11 and B's ingress rule 21: the event is B's
    ingress verdict (both enforce; a tie is reported where the packet is delivered) and names
    rule 11 as the egress side's. To C (no ingress policy) it is A's egress with nothing else."""
    dp.sync(base_state())
    _, _, (ev,) = run(dp, packet(A, B, PROTO_TCP, 80))
    assert (ev.direction, ev.rule_id, ev.other_rule_id) == (ING, 21, 11)
    _, _, (ev,) = run(dp, packet(A, C, PROTO_TCP, 81))
    assert (ev.direction, ev.rule_id, ev.other_rule_id) == (EG, 15, 0)
