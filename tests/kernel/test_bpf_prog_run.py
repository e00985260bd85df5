"""The BPF datapath on test packets (BPF_PROG_TEST_RUN): real programs, real maps, no traffic.

Every policy verdict is compared with an oracle built on `mapstate.lookup_policy` over the same
MapState (the Python twin of the kernel's lookup), so the C and the contract cannot drift apart.
BCC compiles once per session (two compiles: normal and audit mode).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
from scapy.all import ARP, ICMP, IP, TCP, UDP, Ether, IPv6, Raw, fragment  # type: ignore[import-untyped]

from dataplane import abi
from dataplane.abi import MARK_MAGIC_DECIDED, MARK_MAGIC_MASK, PROXY_PORT, from_proxy_mark
from dataplane.datapath import Datapath, FlowEvent
from dataplane.mapstate import (IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_HOST, IDENTITY_WORLD,
                                PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP, Direction,
                                EndpointState, MapState, PolicyEntry, PolicyKey, Verdict,
                                lookup_policy, normalize_entries, port_range_blocks)
from dataplane.reasons import DropReason, FlowVerdict
from tests.conftest import require_kernel

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT = 0, 2
ING, EG = Direction.INGRESS, Direction.EGRESS
A, B, C, NODE, WORLD_HOST = "10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.255.254", "203.0.113.7"
ID_A, ID_B, ID_C, ID_CIDR = 256, 257, 258, IDENTITY_FIRST_CIDR + 1


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dp(datapath: Datapath) -> Datapath:
    """The session's shared datapath (tests/conftest.py): one compile serves every test."""
    return datapath


@pytest.fixture(scope="session")
def dp_audit() -> Iterator[Datapath]:
    require_kernel()
    with Datapath(audit=True) as d:
        yield d


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with no tracked flows and no pending events."""
    for name in ("dp", "dp_audit"):
        if name in request.fixturenames:
            d = request.getfixturevalue(name)
            d.flush_conntrack()
            d.poll_events()
    yield


# -- states -----------------------------------------------------------------------------------------
def allow(rule: int) -> PolicyEntry:
    return PolicyEntry(Verdict.ALLOW, 0, (rule,))


def base_state(**overrides: object) -> MapState:
    """A (ep 1) and B (ep 2) enforce both ways; C (ep 3) enforces nothing."""
    eps = {
        1: EndpointState(1, "default/a", A, ID_A, True, True),
        2: EndpointState(2, "default/b", B, ID_B, True, True),
        3: EndpointState(3, "default/c", C, ID_C, False, False),
    }
    policy = {
        PolicyKey(1, EG, ID_B, PROTO_TCP, 80, 16): allow(11),          # A -> B:80
        PolicyKey(2, ING, ID_A, PROTO_TCP, 80, 16): allow(21),         # B <- A:80
        PolicyKey(2, ING, ID_A, PROTO_TCP, 443, 16): allow(22),        # B <- A:443 (A's egress lacks it)
        PolicyKey(2, ING, IDENTITY_ANY, PROTO_TCP, 8080, 16): allow(23),   # B <- anyone:8080
        PolicyKey(2, ING, ID_C, PROTO_ANY): allow(24),                 # B <- C: anything
        PolicyKey(2, ING, ID_C, PROTO_TCP, 22, 16): PolicyEntry(Verdict.DENY, 0, (25,)),  # ... but ssh
        PolicyKey(1, EG, ID_CIDR, PROTO_TCP, 443, 16): allow(12),      # A -> 203.0.113.0/24:443
        PolicyKey(1, EG, IDENTITY_WORLD, PROTO_UDP, 53, 16): allow(13),
        PolicyKey(2, ING, IDENTITY_HOST, PROTO_ANY): allow(26),        # node may reach B
    }
    for lo, plen in port_range_blocks(8000, 8100):                      # A -> B:8000-8100
        policy[PolicyKey(1, EG, ID_B, PROTO_TCP, lo, plen)] = allow(14)
        policy[PolicyKey(2, ING, ID_A, PROTO_TCP, lo, plen)] = allow(27)
    state = MapState(
        ipcache={f"{A}/32": ID_A, f"{B}/32": ID_B, f"{C}/32": ID_C, f"{NODE}/32": IDENTITY_HOST,
                 "203.0.113.0/24": ID_CIDR, "0.0.0.0/0": IDENTITY_WORLD},
        endpoints=eps, policy=normalize_entries(policy))
    for k, v in overrides.items():
        setattr(state, k, v)
    return state


# -- the oracle: mapstate.lookup_policy per direction, combined as from_container does ------------
RANK = {FlowVerdict.DROP: 3, FlowVerdict.REDIRECT: 2, FlowVerdict.AUDIT: 1, FlowVerdict.FORWARD: 0}


def oracle(state: MapState, src: str, dst: str, proto: int, port: int, *, audit: bool = False
           ) -> tuple[FlowVerdict, DropReason, Direction, int]:
    eps = {e.ip: e for e in state.endpoints.values()}
    s, d = eps.get(src), eps.get(dst)
    sid = s.identity if s else state.identity_of(src)
    did = d.identity if d else state.identity_of(dst)

    def decide(ep: EndpointState, direction: Direction, remote: int) -> tuple[FlowVerdict, DropReason, Direction, int]:
        v, found = lookup_policy(state, ep.endpoint_id, direction, remote, proto, port)
        rule = next((e.rule_ids[0] if e.rule_ids else 0 for _, e in found if e.verdict == v), 0)
        enforced = ep.ingress_enforced if direction == ING else ep.egress_enforced
        if v == Verdict.DENY:
            out, why = FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY
        elif v == Verdict.REDIRECT:
            out, why = FlowVerdict.REDIRECT, DropReason.NONE
        elif v == Verdict.ALLOW or not enforced:
            out, why = FlowVerdict.FORWARD, DropReason.NONE
        else:
            out, why = FlowVerdict.DROP, DropReason.POLICY_DENIED
        if out == FlowVerdict.DROP and (audit or ep.audit):
            out = FlowVerdict.AUDIT
        return out, why, direction, rule

    eg = decide(s, EG, did) if s else (FlowVerdict.FORWARD, DropReason.NONE, EG, 0)
    if d is None:
        return eg
    ing = decide(d, ING, sid)
    if RANK[eg[0]] > RANK[ing[0]] or (RANK[eg[0]] == RANK[ing[0]] and eg[0] == FlowVerdict.DROP):
        return eg
    return ing


# -- packets ----------------------------------------------------------------------------------------
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def eth() -> Ether:
    return Ether(**MACS)


def l4(proto: int, sport: int, port: int, flags: str = "S") -> object:
    if proto == PROTO_TCP:
        return TCP(sport=sport, dport=port, flags=flags)
    if proto == PROTO_UDP:
        return UDP(sport=sport, dport=port)
    return ICMP(type=port, id=sport)


def packet(src: str, dst: str, proto: int = PROTO_TCP, port: int = 80, sport: int = 40000,
           flags: str = "S") -> bytes:
    return bytes(eth() / IP(src=src, dst=dst) / l4(proto, sport, port, flags))


def run(d: Datapath, pkt: bytes, prog: str = "from_container", **ctx: int) -> tuple[int, int, list[FlowEvent]]:
    r = d.test_run_full(prog, pkt, **ctx)
    return r.retval, r.mark, d.poll_events()


def expect_verdict(retval: int, verdict: FlowVerdict) -> None:
    assert retval == (TC_ACT_SHOT if verdict == FlowVerdict.DROP else TC_ACT_OK)


# -- policy verdicts against the oracle -----------------------------------------------------------
PROBES = [  # (src, dst, proto, port)
    (A, B, PROTO_TCP, 80),        # allowed both ways
    (A, B, PROTO_TCP, 81),        # default deny (egress of A)
    (A, B, PROTO_TCP, 443),       # B would accept, A's egress does not: egress drop
    (A, B, PROTO_TCP, 8080),      # wildcard identity on B's ingress, but A's egress denies
    (C, B, PROTO_TCP, 8080),      # wildcard identity (C does not enforce egress)
    (C, B, PROTO_UDP, 5000),      # any-protocol entry for C
    (C, B, PROTO_TCP, 22),        # explicit deny beats the any-protocol allow
    (C, B, PROTO_ICMP, 8),        # ICMP echo through the any-protocol entry
    (C, A, PROTO_TCP, 80),        # A's ingress enforced, nothing from C
    (A, C, PROTO_TCP, 80),        # A's egress enforced, nothing to C
    (A, WORLD_HOST, PROTO_TCP, 443),   # CIDR identity
    (A, WORLD_HOST, PROTO_TCP, 80),
    (A, "8.8.8.8", PROTO_UDP, 53),     # world identity
    (A, "8.8.8.8", PROTO_UDP, 54),
    (WORLD_HOST, B, PROTO_TCP, 8080),  # world source: only B's ingress counts
    (WORLD_HOST, B, PROTO_TCP, 80),
    (WORLD_HOST, C, PROTO_TCP, 80),    # to a non-enforcing endpoint
    (C, "8.8.8.8", PROTO_TCP, 80),     # neither side enforces
] + [(A, B, PROTO_TCP, p) for p in (7999, 8000, 8063, 8064, 8095, 8096, 8100, 8101)]  # range blocks


@pytest.mark.parametrize("src,dst,proto,port", PROBES)
def test_bpf_verdict_matches_oracle(dp: Datapath, src: str, dst: str, proto: int, port: int) -> None:
    state = base_state()
    dp.sync(state)
    verdict, reason, direction, rule = oracle(state, src, dst, proto, port)
    retval, mark, events = run(dp, packet(src, dst, proto, port))
    expect_verdict(retval, verdict)
    assert len(events) == 1
    ev = events[0]
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id) == (verdict, reason, direction, rule)
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


# -- conntrack --------------------------------------------------------------------------------------
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


# -- audit ------------------------------------------------------------------------------------------
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


# -- redirect: fail closed --------------------------------------------------------------------------
def redirect_state() -> MapState:
    state = base_state()
    state.policy[PolicyKey(2, ING, ID_A, PROTO_TCP, 80, 16)] = PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (41,))
    state.policy[PolicyKey(1, EG, IDENTITY_WORLD, PROTO_UDP, 53, 16)] = PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (42,))
    return state


def in_private_netns(d: Datapath, pkts: list[bytes], listen: bool) -> list[tuple[int, int]]:
    """Run packets in a forked child inside a fresh network namespace (socket lookups happen in
    the caller's namespace: the test must neither see nor disturb the machine's sockets)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "unshare")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            socks = []
            if listen:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT, as the proxy will
                    s.bind(("127.0.0.1", PROXY_PORT))
                    if kind == socket.SOCK_STREAM:
                        s.listen()
                    socks.append(s)
            out = [(res.retval, res.mark) for res in (d.test_run_full("from_container", p) for p in pkts)]
            os.write(w, pickle.dumps(out))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "child failed"
    return pickle.loads(data)


def test_bpf_redirect_without_proxy_socket_fails_closed(dp: Datapath) -> None:
    state = redirect_state()
    dp.sync(state)
    assert oracle(state, A, B, PROTO_TCP, 80)[0] == FlowVerdict.REDIRECT
    pkts = [packet(A, B, PROTO_TCP, 80), packet(A, "8.8.8.8", PROTO_UDP, 53)]
    assert in_private_netns(dp, pkts, listen=False) == [(TC_ACT_SHOT, 0), (TC_ACT_SHOT, 0)]
    events = dp.poll_events()
    assert [(e.verdict, e.reason, e.proxy_port, e.rule_id) for e in events] == [
        (FlowVerdict.DROP, DropReason.PROXY_SOCKET_MISSING, PROXY_PORT, 41),
        (FlowVerdict.DROP, DropReason.PROXY_SOCKET_MISSING, PROXY_PORT, 42)]
    assert dp.conntrack_size() == 0  # nothing tracked: the next packet is redirected again


def test_bpf_redirect_is_never_bypassed_in_audit_mode(dp_audit: Datapath) -> None:
    dp_audit.sync(redirect_state())
    assert in_private_netns(dp_audit, [packet(A, B, PROTO_TCP, 80)], listen=False) == [(TC_ACT_SHOT, 0)]
    assert dp_audit.poll_events()[0].reason == DropReason.PROXY_SOCKET_MISSING


def test_bpf_redirect_finds_the_listener(dp: Datapath) -> None:
    """With a listener the lookup succeeds; BPF_PROG_TEST_RUN does not run at tc ingress, so the
    kernel refuses bpf_sk_assign and the packet still fails closed (assignment on real traffic
    is a topology-level test)."""
    dp.sync(redirect_state())
    pkts = [packet(A, B, PROTO_TCP, 80), packet(A, "8.8.8.8", PROTO_UDP, 53)]
    assert in_private_netns(dp, pkts, listen=True) == [(TC_ACT_SHOT, 0), (TC_ACT_SHOT, 0)]
    assert {e.reason for e in dp.poll_events()} == {DropReason.PROXY_ASSIGN_FAILED}


# -- malformed packets ------------------------------------------------------------------------------
def _tcp_bytes() -> bytes:
    return bytes(TCP(sport=40000, dport=80, flags="S"))


MALFORMED = {
    "ihl below 5": (bytes(eth() / IP(src=A, dst=B, ihl=4) / TCP(dport=80)), DropReason.MALFORMED_L3),
    "ihl past data": (bytes(eth() / IP(src=A, dst=B, ihl=15, proto=6)), DropReason.MALFORMED_L3),
    "tot_len past frame": (bytes(eth() / IP(src=A, dst=B, len=1000) / TCP(dport=80)), DropReason.MALFORMED_L3),
    "tot_len below ihl": (bytes(eth() / IP(src=A, dst=B, len=16) / TCP(dport=80)), DropReason.MALFORMED_L3),
    "version 6 in ipv4": (bytes(eth() / IP(src=A, dst=B, version=6) / TCP(dport=80)), DropReason.MALFORMED_L3),
    "tcp cut": (bytes(eth() / IP(src=A, dst=B, proto=6) / Raw(_tcp_bytes()[:10])), DropReason.MALFORMED_L4),
    "tcp cut by tot_len": (bytes(eth() / IP(src=A, dst=B, len=30) / TCP(dport=80)), DropReason.MALFORMED_L4),
    "tcp doff below 5": (bytes(eth() / IP(src=A, dst=B) / TCP(dport=80, dataofs=4)), DropReason.MALFORMED_L4),
    "tcp options past data": (bytes(eth() / IP(src=A, dst=B) / TCP(dport=80, dataofs=10)), DropReason.MALFORMED_L4),
    "udp cut": (bytes(eth() / IP(src=A, dst=B, proto=17) / Raw(b"\x9c\x40\x00")), DropReason.MALFORMED_L4),
    "icmp cut": (bytes(eth() / IP(src=A, dst=B, proto=1) / Raw(b"\x08\x00\x00")), DropReason.MALFORMED_L4),
    # Fragments: a first fragment must hold its whole L4 header; a later one needs a known datagram.
    "first fragment, tcp cut": (bytes(eth() / IP(src=A, dst=B, flags="MF", proto=6) / Raw(_tcp_bytes()[:16])),
                                DropReason.MALFORMED_L4),
    "first fragment, tcp options cut": (bytes(eth() / IP(src=A, dst=B, flags="MF") / TCP(dport=80, dataofs=8)),
                                        DropReason.MALFORMED_L4),
    "first fragment, udp cut": (bytes(eth() / IP(src=A, dst=B, flags="MF", proto=17) / Raw(b"\x9c\x40\x13")),
                                DropReason.MALFORMED_L4),
    "later fragment, unknown": (bytes(eth() / IP(src=A, dst=B, frag=100, proto=6) / Raw(b"x" * 20)),
                                DropReason.FRAGMENT_UNKNOWN),
    "later fragment, unknown udp": (bytes(eth() / IP(src=A, dst=B, id=7, frag=1, proto=17) / Raw(b"x" * 20)),
                                    DropReason.FRAGMENT_UNKNOWN),
    "later fragment inside the tcp header": (bytes(eth() / IP(src=A, dst=B, frag=1, proto=6) / Raw(b"x" * 20)),
                                             DropReason.MALFORMED_L4),
    "ipv6": (bytes(eth() / IPv6(src="fd00::1", dst="fd00::2") / TCP(dport=80)), DropReason.UNSUPPORTED_L3),
    "other ethertype": (bytes(Ether(type=0x88CC, **MACS) / Raw(b"\x00" * 46)), DropReason.UNSUPPORTED_L3),
}


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("prog", ["from_container", "to_container"])
def test_bpf_malformed_dropped_with_reason(dp: Datapath, name: str, prog: str) -> None:
    state = base_state()
    # Open everything so that only the parser can be what drops.
    state.policy[PolicyKey(1, EG, IDENTITY_ANY, PROTO_ANY)] = allow(1)
    state.policy[PolicyKey(2, ING, IDENTITY_ANY, PROTO_ANY)] = allow(2)
    dp.sync(state)
    pkt, reason = MALFORMED[name]
    before = dp.metrics()
    retval, _, events = run(dp, pkt, prog)
    assert retval == TC_ACT_SHOT
    assert [(e.verdict, e.reason) for e in events] == [(FlowVerdict.DROP, reason)]
    delta = Counter(dp.metrics()) - Counter(before)
    assert sum(delta.values()) == 1 and next(iter(delta))[:2] == (FlowVerdict.DROP, reason)


@pytest.mark.parametrize("pkt", [b"\x00" * 13,                                   # Ethernet cut
                                 bytes(eth() / Raw())[:12] + b"\x08\x00",          # IPv4, no header
                                 bytes(eth() / IP(src=A, dst=B) / TCP())[:14 + 12]])  # IPv4 header cut
def test_bpf_truncated_headers_cannot_be_injected(dp: Datapath, pkt: bytes) -> None:
    """BPF_PROG_TEST_RUN refuses a frame shorter than Ethernet, or an IPv4 frame shorter than an
    IPv4 header (EINVAL), so these parser checks are unreachable here; the stack delivers no
    such frame to tc either. The checks stay (the verifier demands them)."""
    with pytest.raises(OSError):
        dp.test_run("from_container", pkt)


def test_bpf_ip_options_are_skipped_not_trusted(dp: Datapath) -> None:
    dp.sync(base_state())
    opts = b"\x01" * 4 + b"\x94\x04\x00\x00"  # NOPs + router alert: ihl 7
    ok = bytes(eth() / IP(src=A, dst=B, options=opts) / TCP(sport=40010, dport=80))
    bad = bytes(eth() / IP(src=A, dst=B, options=opts) / TCP(sport=40011, dport=81))
    assert ok[14] & 0x0F == 7
    assert run(dp, ok)[0] == TC_ACT_OK
    retval, _, events = run(dp, bad)
    assert (retval, events[0].reason, events[0].dport) == (TC_ACT_SHOT, DropReason.POLICY_DENIED, 81)


def test_bpf_arp_passes(dp: Datapath) -> None:
    dp.sync(base_state())
    retval, _, events = run(dp, bytes(eth() / ARP(psrc=A, pdst=B)))
    assert (retval, events) == (TC_ACT_OK, [])


# -- fragments --------------------------------------------------------------------------------------
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


# -- to_container -----------------------------------------------------------------------------------
def test_bpf_to_container_marks(dp: Datapath) -> None:
    dp.sync(base_state())
    # Decided by from_container: passes whatever the policy says.
    retval, _, events = run(dp, packet(A, B, PROTO_TCP, 81), "to_container", mark=MARK_MAGIC_DECIDED)
    assert (retval, events) == (TC_ACT_OK, [])
    # From the proxy: passes, and the pod's replies then pass from_container by conntrack.
    retval, _, events = run(dp, packet(A, B, PROTO_TCP, 81, 40020), "to_container", mark=from_proxy_mark(ID_A))
    assert retval == TC_ACT_OK and events[0].src_identity == ID_A
    assert run(dp, bytes(eth() / IP(src=B, dst=A) / TCP(sport=81, dport=40020, flags="SA")))[::2] == (TC_ACT_OK, [])


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


def test_bpf_to_container_redirect_fails_closed(dp: Datapath) -> None:
    state = base_state()
    state.policy[PolicyKey(2, ING, IDENTITY_HOST, PROTO_TCP, 80, 16)] = PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (43,))
    dp.sync(state)
    retval, _, events = run(dp, packet(NODE, B, PROTO_TCP, 80), "to_container")
    assert (retval, events[0].reason) == (TC_ACT_SHOT, DropReason.PROXY_NOT_AT_EGRESS)


# -- anti-spoofing ----------------------------------------------------------------------------------
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


# -- metrics and events -----------------------------------------------------------------------------
def test_bpf_metrics_count_every_packet(dp: Datapath) -> None:
    dp.sync(base_state())
    before = Counter(dp.metrics())
    sent: Counter[tuple[FlowVerdict, DropReason, Direction]] = Counter()
    for i, (src, dst, proto, port) in enumerate(PROBES):
        verdict, reason, direction, _ = oracle(base_state(), src, dst, proto, port)
        run(dp, packet(src, dst, proto, port, sport=41000 + i))
        sent[(verdict, reason, direction)] += 1
    for name, (pkt, reason) in MALFORMED.items():
        run(dp, pkt)
        sent[(FlowVerdict.DROP, reason, EG)] += 1
    r = dp.test_run_full("from_container", packet(A, B, PROTO_TCP, 81, 42000), repeat=50)
    assert r.retval == TC_ACT_SHOT
    sent[(FlowVerdict.DROP, DropReason.POLICY_DENIED, EG)] += 50
    delta = Counter(dp.metrics()) - before
    assert delta == sent
    assert sum(delta.values()) == len(PROBES) + len(MALFORMED) + 50


def test_bpf_events_carry_flow_details(dp: Datapath) -> None:
    dp.sync(base_state())
    run(dp, packet(A, WORLD_HOST, PROTO_TCP, 443, 40040))
    retval, _, events = run(dp, packet(C, B, PROTO_TCP, 22, 40041))
    (ev,) = events
    assert retval == TC_ACT_SHOT
    assert (ev.src, ev.dst, ev.sport, ev.dport, ev.protocol) == (C, B, 40041, 22, PROTO_TCP)
    assert (ev.src_identity, ev.dst_identity, ev.src_endpoint, ev.dst_endpoint) == (ID_C, ID_B, 3, 2)
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id, ev.endpoint_id) == (
        FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY, ING, 25, 2)
    assert ev.tcp_flags == 0x02 and ev.length == len(packet(C, B, PROTO_TCP, 22, 40041))


# -- sync -------------------------------------------------------------------------------------------
def test_bpf_sync_writes_only_the_diff(dp: Datapath) -> None:
    dp.sync(MapState())
    state = base_state()
    first = dp.sync(state)
    assert first.added == {"policy": len(state.policy), "ipcache": len(state.ipcache), "endpoints": 3}
    assert dp.sync(state).writes == []                                   # nothing changed
    changed = base_state()
    key80 = PolicyKey(2, ING, ID_A, PROTO_TCP, 80, 16)
    changed.policy[key80] = PolicyEntry(Verdict.DENY, 0, (50,))           # one update
    new_key = PolicyKey(2, ING, ID_A, PROTO_TCP, 9000, 16)
    changed.policy[new_key] = allow(51)                                  # one add
    gone = PolicyKey(2, ING, ID_A, PROTO_TCP, 443, 16)
    del changed.policy[gone]                                             # one delete
    stats = dp.sync(changed)
    assert sorted(stats.writes, key=str) == sorted([("policy", "update", key80), ("policy", "update", new_key),
                                                    ("policy", "delete", gone)], key=str)
    assert stats.writes[-1] == ("policy", "delete", gone)                # deletions last
    assert (stats.added, stats.updated, stats.deleted) == ({"policy": 1}, {"policy": 1}, {"policy": 1})
    assert run(dp, packet(A, B, PROTO_TCP, 80))[0] == TC_ACT_SHOT        # takes effect, no reload
    for src, dst, proto, port in PROBES:                                 # and agrees with the oracle
        dp.flush_conntrack()
        verdict = oracle(changed, src, dst, proto, port)[0]
        expect_verdict(run(dp, packet(src, dst, proto, port))[0], verdict)


def test_bpf_sync_order_adds_before_deletes(dp: Datapath) -> None:
    """Moving B to a new identity: the new keys and the new identity are written before the old
    keys go, so a flow allowed before and after never meets a missing entry."""
    dp.sync(MapState())
    old = base_state()
    dp.sync(old)
    new = base_state()
    new.endpoints[2] = replace(new.endpoints[2], identity=300)
    new.ipcache[f"{B}/32"] = 300
    new.policy = {replace(k, identity=300) if k.identity == ID_B else k: v for k, v in old.policy.items()}
    stats = dp.sync(new)
    ops = [op for _, op, _ in stats.writes]
    assert ops == sorted(ops, key=lambda o: o == "delete")
    assert [m for m, op, _ in stats.writes if op == "update"][0] == "policy"
    assert run(dp, packet(A, B, PROTO_TCP, 80))[0] == TC_ACT_OK


def test_bpf_program_fds(dp: Datapath) -> None:
    assert dp.program_fd("from_container") > 0 and dp.program_fd("to_container") > 0
    with pytest.raises(KeyError):
        dp.program_fd("nope")


def test_bpf_debug_build_loads() -> None:
    """-DDEBUG=1 adds bpf_trace_printk on drops; it must still pass the verifier."""
    require_kernel()
    with Datapath(debug=True) as d:
        assert d.program_fd("from_container") > 0
