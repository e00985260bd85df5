"""IPv4 fragments in the BPF datapath on test packets: the first fragment is judged as its flow
and remembered (the fragments map), later fragments follow that verdict, an unknown or expired
datagram is dropped, TCP header overlap is refused, and redirected flows never pass as
fragments."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Raw, fragment  # type: ignore[import-untyped]
from dataplane import abi
from dataplane.abi import MARK_MAGIC_DECIDED, MARK_MAGIC_MASK, PROXY_PORT
from dataplane.datapath import Datapath
from dataplane.abi import PROTO_TCP, PROTO_UDP
from dataplane.abi import DropReason, FlowVerdict
from tests.support.prog_run import (A, B, C, EG, ID_A, ING, NODE, TC_ACT_OK, TC_ACT_SHOT, base_state, eth,
                                    packet, redirect_state, run)

pytestmark = pytest.mark.kernel


def fragments(src: str, dst: str, l4_layer: object, size: int = 4000, ip_id: int = 0x4242,
              fragsize: int = 1480) -> list[bytes]:
    """One datagram of `size` payload bytes cut as a 1500-MTU link would (first fragment first)."""
    frags = fragment(IP(src=src, dst=dst, id=ip_id) / l4_layer / Raw(b"f" * size), fragsize=fragsize)
    return [bytes(eth() / f) for f in frags]


def put(d: Datapath, name: str, key: bytes, value: bytes) -> None:
    """Write a raw entry into one of the datapath's maps (what only the kernel writes otherwise)."""
    table = d._tables[name]  # a test reaching into the loader
    table[table.Key.from_buffer_copy(key)] = table.Leaf.from_buffer_copy(value)


def frag_entry(src: str, dst: str, ip_id: int, proto: int, sport: int, dport: int,
               lifetime_s: float = 30.0) -> tuple[bytes, bytes]:
    key = abi.CFragKey(saddr=abi.ipv4_be32(src), daddr=abi.ipv4_be32(dst), id=ip_id, proto=proto)
    expires = max(0, time.monotonic_ns() + int(lifetime_s * 1e9))  # bpf_ktime_get_ns is CLOCK_MONOTONIC
    value = abi.CFragEntry(expires_ns=expires, sport=sport, dport=dport, policy_port=dport)
    return bytes(key), bytes(value)


def test_bpf_fragments_of_an_allowed_flow_pass(dp: Datapath) -> None:
    """C -> B UDP is allowed (B's any-protocol entry for C): the first fragment is decided by
    policy (one FORWARD event) and records the datagram; the later ones pass as established
    packets of the flow: FORWARD, marked DECIDED, no event."""
    dp.sync(base_state())
    frags = fragments(C, B, UDP(sport=40100, dport=5000))
    assert len(frags) == 3
    before = Counter(dp.metrics())
    retval, mark, events = run(dp, frags[0])
    assert retval == TC_ACT_OK and mark & MARK_MAGIC_MASK == MARK_MAGIC_DECIDED
    assert [(e.verdict, e.reason, e.sport, e.dport, e.rule_id) for e in events] == [
        (FlowVerdict.FORWARD, DropReason.NONE, 40100, 5000, 24)]
    assert dp.fragments_size() == 1
    for f in frags[1:]:
        retval, mark, events = run(dp, f)
        assert (retval, events) == (TC_ACT_OK, [])
        assert mark & MARK_MAGIC_MASK == MARK_MAGIC_DECIDED
    delta = Counter(dp.metrics()) - before
    assert delta == Counter({(FlowVerdict.FORWARD, DropReason.NONE, ING): 3})
    # to_container passes what from_container decided, fragments included.
    for f in frags:
        assert run(dp, f, "to_container", mark=MARK_MAGIC_DECIDED)[::2] == (TC_ACT_OK, [])


def test_bpf_fragments_of_established_and_reply_datagrams(dp: Datapath) -> None:
    """A later datagram of the flow, and a big reply, are fragmented too: their first fragments
    pass by conntrack (no policy, no event) and still vouch for their later fragments."""
    dp.sync(base_state())
    assert run(dp, packet(C, B, PROTO_UDP, 5000, 40101))[0] == TC_ACT_OK
    for ip_id, frags in ((1, fragments(C, B, UDP(sport=40101, dport=5000), ip_id=1)),
                         (2, fragments(B, C, UDP(sport=5000, dport=40101), ip_id=2))):   # the reply
        for f in frags:
            assert run(dp, f)[::2] == (TC_ACT_OK, []), ip_id
    assert dp.fragments_size() == 2


def test_bpf_fragments_of_a_denied_flow_all_drop(dp: Datapath) -> None:
    """A -> B UDP: nothing allows it. The first fragment drops by policy and records nothing, so
    every later fragment drops as unknown."""
    dp.sync(base_state())
    frags = fragments(A, B, UDP(sport=40102, dport=5000))
    retval, _, events = run(dp, frags[0])
    assert (retval, [(e.reason, e.direction) for e in events]) == (TC_ACT_SHOT, [(DropReason.POLICY_DENIED, EG)])
    for f in frags[1:]:
        retval, _, events = run(dp, f)
        assert retval == TC_ACT_SHOT
        assert [(e.verdict, e.reason, e.sport, e.dport, e.protocol) for e in events] == [
            (FlowVerdict.DROP, DropReason.FRAGMENT_UNKNOWN, 0, 0, PROTO_UDP)]
    assert dp.fragments_size() == 0 and dp.conntrack_size() == 0


def test_bpf_later_fragment_needs_its_own_datagram(dp: Datapath) -> None:
    """The record is per {saddr, daddr, IP id, proto}: a later fragment that differs in any of
    them, or that arrives before its first fragment, is unknown; a denied flow cannot borrow an
    allowed datagram's record."""
    dp.sync(base_state())
    allowed = fragments(C, B, UDP(sport=40103, dport=5000), ip_id=0x1111)
    early = run(dp, allowed[1])                       # before its first fragment
    assert early[0] == TC_ACT_SHOT and early[2][0].reason == DropReason.FRAGMENT_UNKNOWN
    assert run(dp, allowed[0])[0] == TC_ACT_OK
    assert run(dp, allowed[1])[0] == TC_ACT_OK        # a retransmitted later fragment: known now
    for other in (fragments(C, B, UDP(sport=40103, dport=5000), ip_id=0x1112)[1],   # another id
                  fragments(A, B, UDP(sport=40103, dport=5000), ip_id=0x1111)[1],   # another source
                  fragments(C, A, UDP(sport=40103, dport=5000), ip_id=0x1111)[1],   # another destination
                  fragments(C, B, TCP(sport=40103, dport=5000), ip_id=0x1111)[1]):  # another protocol
        retval, _, events = run(dp, other)
        assert (retval, events[0].reason) == (TC_ACT_SHOT, DropReason.FRAGMENT_UNKNOWN)


def test_bpf_expired_fragment_record_is_unknown(dp: Datapath) -> None:
    dp.sync(base_state())
    put(dp, "fragments", *frag_entry(C, B, 0x2222, PROTO_UDP, 40104, 5000, lifetime_s=-1.0))
    later = fragments(C, B, UDP(sport=40104, dport=5000), ip_id=0x2222)[1]
    retval, _, events = run(dp, later)
    assert (retval, events[0].reason) == (TC_ACT_SHOT, DropReason.FRAGMENT_UNKNOWN)


def test_bpf_later_fragment_without_conntrack_is_judged_as_its_flow(dp: Datapath) -> None:
    """A recorded datagram whose flow conntrack lost (flushed, evicted) is checked by policy
    with the recorded ports, exactly as a new packet of the flow would be."""
    dp.sync(base_state())
    put(dp, "fragments", *frag_entry(C, B, 0x3333, PROTO_UDP, 40105, 5000))
    put(dp, "fragments", *frag_entry(A, B, 0x3333, PROTO_UDP, 40105, 5000))
    retval, _, events = run(dp, fragments(C, B, UDP(sport=40105, dport=5000), ip_id=0x3333)[1])
    assert (retval, events[0].verdict, events[0].dport, events[0].rule_id) == (TC_ACT_OK, FlowVerdict.FORWARD, 5000, 24)
    retval, _, events = run(dp, fragments(A, B, UDP(sport=40105, dport=5000), ip_id=0x3333)[1])
    assert (retval, events[0].reason, events[0].dport) == (TC_ACT_SHOT, DropReason.POLICY_DENIED, 5000)


def test_bpf_tcp_fragments_and_header_overlap(dp: Datapath) -> None:
    """A -> B:80 TCP: the first fragment is checked with its flags; later fragments pass, but
    one that starts inside the 20-byte TCP header (could rewrite the flags) is MALFORMED_L4."""
    dp.sync(base_state())
    frags = fragments(A, B, TCP(sport=40106, dport=80, flags="S"), size=3000, ip_id=0x4444)
    assert run(dp, frags[0])[0] == TC_ACT_OK
    overlap = bytes(eth() / IP(src=A, dst=B, id=0x4444, frag=2, proto=6) / Raw(b"x" * 16))
    retval, _, events = run(dp, overlap)
    assert (retval, events[0].reason) == (TC_ACT_SHOT, DropReason.MALFORMED_L4)
    assert run(dp, frags[1])[::2] == (TC_ACT_OK, [])


def test_bpf_icmp_echo_fragments(dp: Datapath) -> None:
    """ping -s 4000 from C to B (allowed) and its fragmented reply."""
    dp.sync(base_state())
    for frags in (fragments(C, B, ICMP(type=8, id=91), ip_id=0x5555), fragments(B, C, ICMP(type=0, id=91), ip_id=0x5556)):
        assert [run(dp, f)[0] for f in frags] == [TC_ACT_OK] * len(frags)


def test_bpf_later_fragment_of_redirected_flow_drops(dp: Datapath) -> None:
    """The L7 proxy path takes no fragments: a later fragment of a redirected flow drops with
    REASON_FRAGMENT, whether conntrack knows the flow (established) or not (policy REDIRECT).
    BPF_PROG_TEST_RUN refuses bpf_sk_assign, so the records are written by hand here."""
    dp.sync(redirect_state())
    put(dp, "fragments", *frag_entry(A, B, 0x6666, PROTO_TCP, 40107, 80))
    later = fragments(A, B, TCP(sport=40107, dport=80, flags="PA"), ip_id=0x6666)[1]
    retval, _, events = run(dp, later)
    assert (retval, events[0].reason, events[0].proxy_port, events[0].rule_id) == (
        TC_ACT_SHOT, DropReason.FRAGMENT, PROXY_PORT, 41)
    ct_key = abi.CCtKey(saddr=abi.ipv4_be32(A), daddr=abi.ipv4_be32(B), sport=40107, dport=80, proto=PROTO_TCP)
    ct_val = abi.CCtEntry(expires_ns=time.monotonic_ns() + 60 * 10**9, packets=1, src_identity=ID_A, rule_id=41,
                          proxy_port=PROXY_PORT)
    put(dp, "conntrack", bytes(ct_key), bytes(ct_val))
    retval, _, events = run(dp, later)
    assert (retval, events[0].reason, events[0].proxy_port) == (TC_ACT_SHOT, DropReason.FRAGMENT, PROXY_PORT)


def test_bpf_node_fragments_to_a_pod(dp: Datapath) -> None:
    """to_container, traffic the node sends: B allows host, so the first fragment is checked,
    forwarded and recorded, and the later ones pass; A does not, so all of them drop."""
    dp.sync(base_state())
    frags = fragments(NODE, B, UDP(sport=40108, dport=7000))
    assert [run(dp, f, "to_container")[0] for f in frags] == [TC_ACT_OK] * len(frags)
    frags = fragments(NODE, A, UDP(sport=40108, dport=7000))
    reasons = [e.reason for f in frags for e in run(dp, f, "to_container")[2]]
    assert reasons == [DropReason.POLICY_DENIED] + [DropReason.FRAGMENT_UNKNOWN] * (len(frags) - 1)


def test_bpf_audit_mode_fragments(dp_audit: Datapath) -> None:
    """Audit: the denied first fragment passes as AUDIT, is tracked and recorded; the later
    fragments follow it without events."""
    dp_audit.sync(base_state())
    frags = fragments(A, B, UDP(sport=40109, dport=5000))
    retval, _, events = run(dp_audit, frags[0])
    assert (retval, events[0].verdict) == (TC_ACT_OK, FlowVerdict.AUDIT)
    assert [run(dp_audit, f)[::2] for f in frags[1:]] == [(TC_ACT_OK, [])] * (len(frags) - 1)
