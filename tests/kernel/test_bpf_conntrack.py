"""Conntrack in the BPF datapath on test packets: replies of an allowed flow pass without a
policy lookup or an event, a reply without a flow is judged as a new flow, ICMP echo replies
pass by their request, and an established flow outlives a policy change."""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP  # type: ignore[import-untyped]
from dataplane.abi import MARK_MAGIC_DECIDED, MARK_MAGIC_MASK
from dataplane.datapath import Datapath
from dataplane.mapstate import PolicyKey
from dataplane.abi import PROTO_ANY, PROTO_TCP
from dataplane.abi import DropReason
from tests.support.prog_run import (A, B, C, EG, ID_A, ING, TC_ACT_OK, TC_ACT_SHOT, allow, base_state, eth,
                                    packet, run)

pytestmark = pytest.mark.kernel


def test_bpf_conntrack_reply_passes_after_allowed_syn(dp: Datapath) -> None:
    dp.sync(base_state())
    assert run(dp, packet(A, B, PROTO_TCP, 80, 40001, "S"))[0] == TC_ACT_OK
    # B's SYN-ACK: B's egress and A's ingress allow nothing of the kind, conntrack does.
    retval, mark, events = run(dp, bytes(eth() / IP(src=B, dst=A) / TCP(sport=80, dport=40001, flags="SA")))
    assert (retval, events) == (TC_ACT_OK, [])
    assert mark & MARK_MAGIC_MASK == MARK_MAGIC_DECIDED
    # Further packets of the flow: no event either.
    assert run(dp, packet(A, B, PROTO_TCP, 80, 40001, "A"))[::2] == (TC_ACT_OK, [])


def test_bpf_reply_without_flow_is_checked(dp: Datapath) -> None:
    dp.sync(base_state())
    retval, _, events = run(dp, bytes(eth() / IP(src=B, dst=A) / TCP(sport=80, dport=40002, flags="SA")))
    assert retval == TC_ACT_SHOT
    assert (events[0].reason, events[0].direction) == (DropReason.POLICY_DENIED, EG)
    # B egress opened up: now A's ingress enforcement is what drops it.
    state = base_state()
    state.policy[PolicyKey(2, EG, ID_A, PROTO_ANY)] = allow(31)
    dp.sync(state)
    retval, _, events = run(dp, bytes(eth() / IP(src=B, dst=A) / TCP(sport=80, dport=40002, flags="SA")))
    assert retval == TC_ACT_SHOT
    assert (events[0].reason, events[0].direction, events[0].endpoint_id) == (DropReason.POLICY_DENIED, ING, 1)


def test_bpf_icmp_echo_reply_by_conntrack(dp: Datapath) -> None:
    dp.sync(base_state())
    assert run(dp, bytes(eth() / IP(src=C, dst=B) / ICMP(type=8, id=77)))[0] == TC_ACT_OK
    retval, _, events = run(dp, bytes(eth() / IP(src=B, dst=C) / ICMP(type=0, id=77)))
    assert (retval, events) == (TC_ACT_OK, [])


def test_bpf_established_flow_survives_policy_removal(dp: Datapath) -> None:
    """Conntrack is checked first: an established flow is not cut by a later policy change."""
    dp.sync(base_state())
    assert run(dp, packet(A, B, PROTO_TCP, 80, 40003))[0] == TC_ACT_OK
    dp.sync(base_state(policy={}))
    assert run(dp, packet(A, B, PROTO_TCP, 80, 40003, "A"))[0] == TC_ACT_OK
    assert run(dp, packet(A, B, PROTO_TCP, 80, 40004))[0] == TC_ACT_SHOT
