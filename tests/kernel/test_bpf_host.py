"""The host firewall of both tc programs on test packets (BPF_PROG_TEST_RUN): with the host
endpoint in the endpoints map (a host policy selects the node), from_container judges packets
to the node's addresses by the host's INGRESS policy, and to_container judges what the node's
own stack sends, toward pods and world hosts, by the host's EGRESS policy combined with a pod's
ingress (lib/host.h). Each verdict is compared with the oracle of tests.support.prog_run, which
combines egress and ingress as the datapath does; the proxy's upstream and replies stay exempt,
and without a host endpoint nothing changes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from scapy.all import IP, TCP  # type: ignore[import-untyped]

from dataplane.abi import (IDENTITY_ANY, IDENTITY_HOST, PROTO_ANY, PROTO_TCP, DropReason, FlowVerdict,
                           Verdict, from_proxy_mark)
from dataplane.datapath import Datapath
from dataplane.mapstate import EndpointState, MapState, PolicyEntry, PolicyKey, normalize_entries
from dataplane.policy.host import HOST_ENDPOINT_ID
from tests.support.prog_run import (A, B, C, EG, ING, NODE, TC_ACT_OK, TC_ACT_SHOT, WORLD_HOST, ID_A, ID_B, ID_C, ID_CIDR,
                                    allow, base_state, eth, expect_verdict, oracle, packet, run)

pytestmark = pytest.mark.kernel

GATEWAY = "169.254.1.1"
H = HOST_ENDPOINT_ID


def host_state(ingress: bool = True, egress: bool = True) -> MapState:
    """base_state plus the host endpoint at NODE (and the gateway address): ingress from A on
    port 22 and anything from C's identity but port 23 (denied); egress to B on 80 and to the
    world on 443."""
    state = base_state()
    state.endpoints[H] = EndpointState(H, "host", NODE, IDENTITY_HOST, ingress, egress, aliases=(GATEWAY,))
    state.ipcache[f"{GATEWAY}/32"] = IDENTITY_HOST
    policy = dict(state.policy)
    policy.update({
        PolicyKey(H, ING, ID_A, PROTO_TCP, 22, 16): allow(41),
        PolicyKey(H, ING, ID_C, PROTO_ANY): allow(42),
        PolicyKey(H, ING, ID_C, PROTO_TCP, 23, 16): PolicyEntry(Verdict.DENY, 0, (43,)),
        PolicyKey(H, EG, ID_B, PROTO_TCP, 80, 16): allow(44),
        PolicyKey(H, EG, ID_CIDR, PROTO_TCP, 443, 16): allow(45),     # 203.0.113.0/24 (WORLD_HOST)
        PolicyKey(1, EG, IDENTITY_HOST, PROTO_ANY): allow(16),          # A may send to the node
    })
    state.policy = normalize_entries(policy)
    return state


TO_NODE = [(A, 22), (A, 80), (C, 22), (C, 23), (B, 22)]
FROM_NODE = [(B, 80), (B, 81), (A, 80), (C, 80), (WORLD_HOST, 443), (WORLD_HOST, 80)]


@pytest.mark.parametrize("src,port", TO_NODE)
def test_host_ingress_on_packets_to_the_node(dp: Datapath, src: str, port: int) -> None:
    state = host_state()
    dp.sync(state)
    (verdict, reason, direction, rule), _ = oracle(state, src, NODE, PROTO_TCP, port, other=True)
    retval, _, events = run(dp, packet(src, NODE, PROTO_TCP, port))
    expect_verdict(retval, verdict)
    (ev,) = events
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id) == (verdict, reason, direction, rule)
    assert ev.dst_endpoint == H and ev.dst_identity == IDENTITY_HOST


def test_host_ingress_covers_the_gateway_address(dp: Datapath) -> None:
    dp.sync(host_state())
    retval, _, events = run(dp, packet(A, GATEWAY, PROTO_TCP, 80))
    assert (retval, events[0].reason, events[0].dst_endpoint) == (TC_ACT_SHOT, DropReason.POLICY_DENIED, H)
    assert run(dp, packet(A, GATEWAY, PROTO_TCP, 22))[0] == TC_ACT_OK


@pytest.mark.parametrize("dst,port", FROM_NODE)
def test_host_egress_on_what_the_node_sends(dp: Datapath, dst: str, port: int) -> None:
    state = host_state()
    dp.sync(state)
    (verdict, reason, direction, rule), other_rule = oracle(state, NODE, dst, PROTO_TCP, port, other=True)
    retval, _, events = run(dp, packet(NODE, dst, PROTO_TCP, port), "to_container")
    expect_verdict(retval, verdict)
    (ev,) = events
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id) == (verdict, reason, direction, rule)
    assert ev.other_rule_id == other_rule
    assert ev.src_endpoint == H and ev.src_identity == IDENTITY_HOST


def test_host_egress_outcomes(dp: Datapath) -> None:
    """What the oracle cases above amount to, spelled out."""
    state = host_state()
    dp.sync(state)
    got = {(dst, port): run(dp, packet(NODE, dst, PROTO_TCP, port, 41000 + port), "to_container")[0]
           for dst, port in FROM_NODE}
    assert got == {(B, 80): TC_ACT_OK,             # host egress allows B:80, B allows host
                   (B, 81): TC_ACT_SHOT,           # host egress: no rule (default deny)
                   (A, 80): TC_ACT_SHOT,           # host egress: no rule for A
                   (C, 80): TC_ACT_SHOT,           # C enforces nothing, but the host's egress does
                   (WORLD_HOST, 443): TC_ACT_OK,   # toward a world host: host egress allows 443
                   (WORLD_HOST, 80): TC_ACT_SHOT}


def test_replies_and_the_proxy_upstream_pass_host_egress(dp: Datapath) -> None:
    state = host_state()
    dp.sync(state)
    # A opens a connection to the node (host ingress allows 22): the node's reply passes
    # although host egress has no rule for A.
    assert run(dp, packet(A, NODE, PROTO_TCP, 22, 40500))[0] == TC_ACT_OK
    reply = bytes(eth() / IP(src=NODE, dst=A) / TCP(sport=22, dport=40500, flags="SA"))
    assert run(dp, reply, "to_container")[::2] == (TC_ACT_OK, [])
    # The proxy's upstream (from-proxy mark) is exempt, as Cilium's proxy traffic is.
    retval, _, events = run(dp, packet(NODE, A, PROTO_TCP, 80, 40600), "to_container", mark=from_proxy_mark(ID_B))
    assert retval == TC_ACT_OK and events[0].verdict == FlowVerdict.FORWARD
    # A pod address as source (the proxy answering transparently) is no host endpoint.
    retval, _, _ = run(dp, packet(B, C, PROTO_TCP, 80, 40700), "to_container")
    assert retval == TC_ACT_OK


def test_host_egress_not_enforced_passes_as_before(dp: Datapath) -> None:
    """A host policy with ingress only: the node's own traffic is judged by the pod's ingress
    alone, exactly as without a host endpoint."""
    with_host = host_state(egress=False)
    without = base_state()
    for state in (with_host, without):
        dp.sync(state)
        outcomes = [run(dp, packet(NODE, dst, PROTO_TCP, port, 42000 + port), "to_container")[0]
                    for dst, port in ((B, 9999), (A, 9999), (C, 80))]
        assert outcomes == [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_OK]
    # Without the host endpoint, nothing toward a world host is judged (no event).
    dp.sync(base_state())
    assert run(dp, packet(NODE, WORLD_HOST, PROTO_TCP, 80, 43000), "to_container")[::2] == (TC_ACT_OK, [])


def test_host_egress_deny_and_audit(dp: Datapath) -> None:
    state = host_state()
    state.policy[PolicyKey(H, EG, IDENTITY_ANY, PROTO_TCP, 80, 16)] = PolicyEntry(Verdict.DENY, 0, (46,))
    state.policy = normalize_entries(state.policy)
    dp.sync(state)
    retval, _, events = run(dp, packet(NODE, B, PROTO_TCP, 80, 44000), "to_container")
    assert (retval, events[0].reason, events[0].rule_id, events[0].direction) == \
        (TC_ACT_SHOT, DropReason.POLICY_EXPLICIT_DENY, 46, EG)
    state.endpoints[H] = replace(state.endpoints[H], audit=True)
    dp.sync(state)
    retval, _, events = run(dp, packet(NODE, A, PROTO_TCP, 80, 44001), "to_container")
    # Host egress would drop (audited), A's ingress drops (not in audit): the drop is A's.
    assert (retval, events[0].direction, events[0].endpoint_id) == (TC_ACT_SHOT, ING, 1)
    retval, _, events = run(dp, packet(NODE, C, PROTO_TCP, 81, 44002), "to_container")
    assert (retval, events[0].verdict, events[0].reason) == (TC_ACT_OK, FlowVerdict.AUDIT, DropReason.POLICY_DENIED)
