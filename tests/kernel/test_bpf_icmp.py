"""ICMP in the BPF datapath on test packets: `icmps` entries (protocol ICMP, the type in the
port) allow or deny by type, the events carry type and code, an echo reply passes as the reply
of its request (same id) and only then: an unsolicited reply, a reply with another id, and an
echo request that mirrors an earlier one (Cilium GHSA-c66w-hq56-4q97) are judged by policy."""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP  # type: ignore[import-untyped]

from dataplane.abi import PROTO_ANY, PROTO_ICMP, DropReason, FlowVerdict, Verdict
from dataplane.datapath import Datapath
from dataplane.mapstate import MapState, PolicyEntry, PolicyKey, normalize_entries
from tests.support.prog_run import (A, B, C, EG, ID_A, ID_B, ID_C, ING, NODE, TC_ACT_OK, TC_ACT_SHOT, allow,
                                    base_state, eth, oracle, run)

pytestmark = pytest.mark.kernel

ECHO_REQUEST, ECHO_REPLY, TIMESTAMP = 8, 0, 13


def icmp(src: str, dst: str, icmp_type: int, echo_id: int = 0, code: int = 0) -> bytes:
    return bytes(eth() / IP(src=src, dst=dst) / ICMP(type=icmp_type, code=code, id=echo_id))


def icmp_state() -> MapState:
    """base_state plus: A may send echo requests to B, and B accepts them from A (rules 51,
    52), as the resolver writes `icmps: [{fields: [{type: EchoRequest}]}]`; C's any-protocol
    allow into B (rule 24) now has an explicit deny of ICMP timestamp requests (rule 53)."""
    state = base_state()
    policy = dict(state.policy)
    policy[PolicyKey(1, EG, ID_B, PROTO_ICMP, ECHO_REQUEST, 16)] = allow(51)
    policy[PolicyKey(2, ING, ID_A, PROTO_ICMP, ECHO_REQUEST, 16)] = allow(52)
    policy[PolicyKey(2, ING, ID_C, PROTO_ICMP, TIMESTAMP, 16)] = PolicyEntry(Verdict.DENY, 0, (53,))
    state.policy = normalize_entries(policy)
    return state


def test_bpf_icmps_allow_by_type(dp: Datapath) -> None:
    """An echo request A -> B matches the ICMP type-8 entries on both sides; the event names
    the rule and carries type 8, code 0. Another type (timestamp) has no entry: dropped."""
    state = icmp_state()
    dp.sync(state)
    retval, _, events = run(dp, icmp(A, B, ECHO_REQUEST, 4001))
    assert retval == TC_ACT_OK
    ev = events[0]
    assert (ev.verdict, ev.rule_id, ev.icmp_type, ev.icmp_code) == (FlowVerdict.FORWARD, 52, ECHO_REQUEST, 0)
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id) == oracle(state, A, B, PROTO_ICMP, ECHO_REQUEST)
    retval, _, events = run(dp, icmp(A, B, TIMESTAMP))
    assert (retval, events[0].reason, events[0].direction) == (TC_ACT_SHOT, DropReason.POLICY_DENIED, EG)
    assert events[0].icmp_type == TIMESTAMP
    # A destination unreachable (type 3, code 3) quoting nothing tracked: judged as type 3.
    retval, _, events = run(dp, icmp(A, B, 3, code=3))
    assert (retval, events[0].icmp_type, events[0].icmp_code) == (TC_ACT_SHOT, 3, 3)


def test_bpf_icmps_deny_by_type(dp: Datapath) -> None:
    """C -> B: the any-protocol allow lets an echo request in; the type-13 deny drops a
    timestamp request, with the deny's rule."""
    state = icmp_state()
    dp.sync(state)
    retval, _, events = run(dp, icmp(C, B, ECHO_REQUEST, 4002))
    assert (retval, events[0].rule_id) == (TC_ACT_OK, 24)
    retval, _, events = run(dp, icmp(C, B, TIMESTAMP))
    assert retval == TC_ACT_SHOT
    assert (events[0].reason, events[0].direction, events[0].rule_id) == (DropReason.POLICY_EXPLICIT_DENY, ING, 53)
    assert (events[0].verdict, events[0].reason, events[0].direction, events[0].rule_id) == \
        oracle(state, C, B, PROTO_ICMP, TIMESTAMP)


def test_bpf_echo_reply_of_tracked_request_passes(dp: Datapath) -> None:
    """B's echo reply to A's request (same id) passes by conntrack: no policy allows type 0
    from B to A, no event. A second reply too (the entry lives on)."""
    dp.sync(icmp_state())
    assert run(dp, icmp(A, B, ECHO_REQUEST, 4003))[0] == TC_ACT_OK
    for _ in range(2):
        assert run(dp, icmp(B, A, ECHO_REPLY, 4003))[::2] == (TC_ACT_OK, [])


def test_bpf_unsolicited_echo_reply_is_judged(dp: Datapath) -> None:
    """An echo reply without a request, or with another id than the request's, is a new flow
    of ICMP type 0: B's egress allows nothing of it."""
    state = icmp_state()
    dp.sync(state)
    retval, _, events = run(dp, icmp(B, A, ECHO_REPLY, 4004))
    assert retval == TC_ACT_SHOT
    assert (events[0].reason, events[0].direction, events[0].icmp_type) == (DropReason.POLICY_DENIED, EG, ECHO_REPLY)
    assert (events[0].verdict, events[0].reason, events[0].direction, events[0].rule_id) == \
        oracle(state, B, A, PROTO_ICMP, ECHO_REPLY)
    assert run(dp, icmp(A, B, ECHO_REQUEST, 4005))[0] == TC_ACT_OK
    assert run(dp, icmp(B, A, ECHO_REPLY, 4006))[0] == TC_ACT_SHOT
    # An echo reply allowed by policy (an L3-only allow) is tracked as a flow of its own.
    state.policy = normalize_entries({**state.policy, PolicyKey(2, EG, ID_A, PROTO_ANY): allow(54),
                                      PolicyKey(1, ING, ID_B, PROTO_ANY): allow(55)})
    dp.sync(state)
    retval, _, events = run(dp, icmp(B, A, ECHO_REPLY, 4007))
    assert (retval, events[0].verdict, events[0].rule_id) == (TC_ACT_OK, FlowVerdict.FORWARD, 55)


def test_bpf_mirrored_echo_request_is_no_reply(dp: Datapath) -> None:
    """A pings B with id X; B then pings A with the same id X. B's request is not a reply of
    A's: it is a new flow, and A's ingress (nothing from B) drops it (Cilium
    GHSA-c66w-hq56-4q97: an echo request mistaken for a reply bypassed policy)."""
    dp.sync(icmp_state())
    assert run(dp, icmp(A, B, ECHO_REQUEST, 4008))[0] == TC_ACT_OK
    retval, _, events = run(dp, icmp(B, A, ECHO_REQUEST, 4008))
    assert retval == TC_ACT_SHOT
    assert (events[0].reason, events[0].icmp_type) == (DropReason.POLICY_DENIED, ECHO_REQUEST)
    # A's own request, sent again, is still its established flow.
    assert run(dp, icmp(A, B, ECHO_REQUEST, 4008))[::2] == (TC_ACT_OK, [])


def test_bpf_echo_request_from_the_node_and_reply(dp: Datapath) -> None:
    """to_container: the node's echo request to B is judged as host identity (rule 26 allows
    any protocol); B's reply passes from_container as the reply of that request."""
    dp.sync(icmp_state())
    retval, _, events = run(dp, icmp(NODE, B, ECHO_REQUEST, 4009), prog="to_container")
    assert (retval, events[0].rule_id, events[0].icmp_type) == (TC_ACT_OK, 26, ECHO_REQUEST)
    assert run(dp, icmp(B, NODE, ECHO_REPLY, 4009))[::2] == (TC_ACT_OK, [])
    assert run(dp, icmp(B, NODE, ECHO_REPLY, 4010))[0] == TC_ACT_SHOT
