"""Running the BPF programs on test packets (BPF_PROG_TEST_RUN), for the tests/kernel/test_bpf_*
files: a MapState of three endpoints (A and B enforce both ways, C nothing), the oracle that
judges a packet from that MapState with `mapstate.lookup_policy` combined per direction as
from_container does, packets built with scapy, the probe set that covers every outcome, and
the malformed packets with the reason each must be dropped for. The datapath fixtures (`dp`,
`dp_audit`, one compile each per session) are in tests/kernel/conftest.py."""

from __future__ import annotations

from typing import Any

from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw  # type: ignore[import-untyped]
from dataplane.abi import PROXY_PORT
from dataplane.datapath import Datapath, FlowEvent
from dataplane.mapstate import (EndpointState, MapState, PolicyEntry, PolicyKey, lookup_policy, normalize_entries,
                                port_range_blocks)
from dataplane.abi import (Direction, IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_HOST, IDENTITY_WORLD, PROTO_ANY,
                           PROTO_ICMP, PROTO_TCP, PROTO_UDP, Verdict)
from dataplane.abi import DropReason, FlowVerdict

TC_ACT_OK, TC_ACT_SHOT = 0, 2
ING, EG = Direction.INGRESS, Direction.EGRESS
A, B, C, NODE, WORLD_HOST = "10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.255.254", "203.0.113.7"
ID_A, ID_B, ID_C, ID_CIDR = 256, 257, 258, IDENTITY_FIRST_CIDR + 1


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
        PolicyKey(1, EG, ID_C, PROTO_TCP, 81, 16): allow(15),          # A -> C:81 (C enforces nothing)
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


# The oracle: mapstate.lookup_policy per direction, combined as from_container does.
RANK = {FlowVerdict.DROP: 3, FlowVerdict.REDIRECT: 2, FlowVerdict.AUDIT: 1, FlowVerdict.FORWARD: 0}


def oracle(state: MapState, src: str, dst: str, proto: int, port: int, *, audit: bool = False,
           other: bool = False) -> Any:
    """(verdict, reason, direction, rule) of the event the datapath emits; with `other`, that
    and the rule that allowed the flow in the direction not reported (0 if none)."""
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
        return eg if not other else (eg, 0)
    ing = decide(d, ING, sid)
    # A tie: a drop at egress, else the direction that enforces policy, else ingress.
    eg_enforced = s is not None and s.egress_enforced
    if RANK[eg[0]] > RANK[ing[0]] or (RANK[eg[0]] == RANK[ing[0]] and (
            eg[0] == FlowVerdict.DROP or (eg_enforced and not d.ingress_enforced))):
        chosen, rest = eg, ing
    else:
        chosen, rest = ing, eg
    if not other:
        return chosen
    # The event also names the rule that allowed the flow in the direction not reported.
    return chosen, rest[3] if rest[0] in (FlowVerdict.FORWARD, FlowVerdict.REDIRECT) else 0


# Packets.
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
    (A, C, PROTO_TCP, 81),        # A's egress allows, C's ingress is not enforced: reported at egress
    (A, WORLD_HOST, PROTO_TCP, 443),   # CIDR identity
    (A, WORLD_HOST, PROTO_TCP, 80),
    (A, "8.8.8.8", PROTO_UDP, 53),     # world identity
    (A, "8.8.8.8", PROTO_UDP, 54),
    (WORLD_HOST, B, PROTO_TCP, 8080),  # world source: only B's ingress counts
    (WORLD_HOST, B, PROTO_TCP, 80),
    (WORLD_HOST, C, PROTO_TCP, 80),    # to a non-enforcing endpoint
    (C, "8.8.8.8", PROTO_TCP, 80),     # neither side enforces
] + [(A, B, PROTO_TCP, p) for p in (7999, 8000, 8063, 8064, 8095, 8096, 8100, 8101)]  # range blocks


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


def redirect_state() -> MapState:
    """base_state with A -> B:80 and A's DNS to the world sent to the proxy."""
    state = base_state()
    state.policy[PolicyKey(2, ING, ID_A, PROTO_TCP, 80, 16)] = PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (41,))
    state.policy[PolicyKey(1, EG, IDENTITY_WORLD, PROTO_UDP, 53, 16)] = PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (42,))
    return state
