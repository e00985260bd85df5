"""Services in the BPF datapath on test packets (lib/lb.h): a packet to a ClusterIP leaves
addressed to a backend with valid checksums, its replies come back from the ClusterIP, every
later packet of a flow meets the backend its first packet was given (even after the service's
backends change), sessionAffinity ClientIP keeps a client on one backend, policy is judged
against the backend, and a service without backends drops with its own reason."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from scapy.all import IP, TCP, UDP, Ether, Raw  # type: ignore[import-untyped]

from dataplane.abi import PROTO_TCP, PROTO_UDP, DropReason, FlowVerdict, Verdict
from dataplane.datapath import Datapath
from dataplane.mapstate import MapState, PolicyEntry, PolicyKey, ServiceBackend, ServiceEntry, normalize_entries
from dataplane.services import pick_backend
from tests.support.prog_run import (A, B, C, EG, ID_A, ID_B, ID_C, ING, TC_ACT_OK, TC_ACT_SHOT, allow, base_state, eth, run)

pytestmark = pytest.mark.kernel

VIP, VPORT = "10.96.0.10", 80


def backend(pod: str, ip: str, endpoint_id: int, port: int = 8080) -> ServiceBackend:
    return ServiceBackend(endpoint_id << 16 | port, pod, ip, port)


BACKEND_B = backend("default/b", B, 2)
BACKEND_C = backend("default/c", C, 3)


def service(backends: Iterable[ServiceBackend], *, protocol: int = PROTO_TCP, affinity: bool = False) -> ServiceEntry:
    return ServiceEntry("default/web", VIP, VPORT, protocol, 7, affinity, tuple(backends))


def state_with(*entries: ServiceEntry) -> MapState:
    """base_state (A may reach B:8000-8100) and A's egress allowing C:8080 too, plus the services."""
    state = base_state()
    policy = dict(state.policy)
    policy[PolicyKey(1, EG, ID_C, PROTO_TCP, 8080, 16)] = allow(16)
    state.policy = normalize_entries(policy)
    state.services = {(e.ip, e.port, e.protocol): e for e in entries}
    return state


def checksums_valid(frame: bytes) -> bool:
    """The IPv4 and L4 checksums of `frame` are what scapy computes afresh."""
    pkt = Ether(frame)
    fresh = pkt.copy()
    del fresh[IP].chksum
    l4 = TCP if TCP in pkt else UDP
    if l4 is UDP and pkt[UDP].chksum == 0:
        return Ether(bytes(fresh))[IP].chksum == pkt[IP].chksum  # UDP without a checksum keeps none
    del fresh[l4].chksum
    again = Ether(bytes(fresh))
    return (again[IP].chksum, again[l4].chksum) == (pkt[IP].chksum, pkt[l4].chksum)


def send(dp: Datapath, frame: bytes, prog: str = "from_container") -> tuple[int, Ether, list]:
    r = dp.test_run_full(prog, frame)
    return r.retval, Ether(r.data), dp.poll_events()


def syn(sport: int, dst: str = VIP, dport: int = VPORT, src: str = A, flags: str = "S") -> bytes:
    return bytes(eth() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / Raw(b"hello"))


def test_bpf_service_translates_destination_to_backend(dp: Datapath) -> None:
    dp.sync(state_with(service([BACKEND_B])))
    retval, out, events = send(dp, syn(41001))
    assert retval == TC_ACT_OK
    assert (out[IP].dst, out[TCP].dport, out[IP].src, out[TCP].sport) == (B, 8080, A, 41001)
    assert checksums_valid(bytes(out))
    # The flow event names the backend: policy judged A -> B:8080.
    assert [(e.dst, e.dport, e.verdict) for e in events] == [(B, 8080, FlowVerdict.FORWARD)]


def test_bpf_service_reply_comes_from_the_cluster_ip(dp: Datapath) -> None:
    dp.sync(state_with(service([BACKEND_B])))
    assert send(dp, syn(41002))[0] == TC_ACT_OK
    reply = bytes(eth() / IP(src=B, dst=A) / TCP(sport=8080, dport=41002, flags="SA") / Raw(b"world"))
    retval, out, events = send(dp, reply)
    assert (retval, events) == (TC_ACT_OK, [])
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (VIP, VPORT, A, 41002)
    assert checksums_valid(bytes(out))
    # Traffic B sends that belongs to no service flow keeps its source.
    direct = bytes(eth() / IP(src=A, dst=B) / TCP(sport=41003, dport=8080, flags="S"))
    assert send(dp, direct)[0] == TC_ACT_OK
    retval, out, _ = send(dp, bytes(eth() / IP(src=B, dst=A) / TCP(sport=8080, dport=41003, flags="SA")))
    assert (retval, out[IP].src, out[TCP].sport) == (TC_ACT_OK, B, 8080)


def test_bpf_service_udp_translation_and_reply(dp: Datapath) -> None:
    state = state_with(service([BACKEND_B], protocol=PROTO_UDP))
    policy = dict(state.policy)
    policy[PolicyKey(1, EG, ID_B, PROTO_UDP, 8080, 16)] = allow(17)
    policy[PolicyKey(2, ING, ID_A, PROTO_UDP, 8080, 16)] = allow(28)
    state.policy = normalize_entries(policy)
    dp.sync(state)
    for checksum in (None, 0):  # computed by scapy, or none at all (0 must stay 0)
        udp = UDP(sport=5353, dport=VPORT) if checksum is None else UDP(sport=5354, dport=VPORT, chksum=0)
        retval, out, _ = send(dp, bytes(eth() / IP(src=A, dst=VIP) / udp / Raw(b"q")))
        assert (retval, out[IP].dst, out[UDP].dport) == (TC_ACT_OK, B, 8080)
        assert checksums_valid(bytes(out))
        assert (out[UDP].chksum == 0) == (checksum == 0)
        back = UDP(sport=8080, dport=udp.sport) if checksum is None else UDP(sport=8080, dport=udp.sport, chksum=0)
        retval, out, _ = send(dp, bytes(eth() / IP(src=B, dst=A) / back / Raw(b"a")))
        assert (retval, out[IP].src, out[UDP].sport) == (TC_ACT_OK, VIP, VPORT)
        assert checksums_valid(bytes(out))


def test_bpf_service_flow_keeps_its_backend(dp: Datapath) -> None:
    """The first packet's backend is the one the Python twin of the hash names; later packets of
    the flow keep it after the service's backends are reordered, a new flow does not."""
    entry = service([BACKEND_B, BACKEND_C])
    dp.sync(state_with(entry))
    sport = 42000
    first = pick_backend(entry, A, sport)
    assert first is not None
    assert send(dp, syn(sport))[1][IP].dst == first.ip
    swapped = service([BACKEND_C, BACKEND_B])
    dp.sync(state_with(swapped))
    retval, out, _ = send(dp, syn(sport, flags="A"))
    assert (retval, out[IP].dst) == (TC_ACT_OK, first.ip)
    # A new flow whose hash picks the slot `first` had: now the other backend.
    other = next(p for p in range(43000, 44000) if pick_backend(entry, A, p) == first)
    assert pick_backend(swapped, A, other) != first
    assert send(dp, syn(other))[1][IP].dst != first.ip


def test_bpf_service_spreads_flows_and_affinity_pins_the_client(dp: Datapath) -> None:
    dp.sync(state_with(service([BACKEND_B, BACKEND_C])))
    spread = {send(dp, syn(p))[1][IP].dst for p in range(44000, 44040)}
    assert spread == {B, C}
    dp.flush_conntrack()
    entry = service([BACKEND_B, BACKEND_C], affinity=True)
    dp.sync(state_with(entry))
    pinned = {send(dp, syn(p))[1][IP].dst for p in range(45000, 45040)}
    chosen = pick_backend(entry, A, 0)
    assert chosen is not None and pinned == {chosen.ip}


def test_bpf_service_policy_is_judged_against_the_backend(dp: Datapath) -> None:
    """A's egress allows B:8000-8100 and C:8080; a deny of C:8080 drops the flows that land on
    C and only those, reported with C's address and target port."""
    state = state_with(service([BACKEND_B, BACKEND_C]))
    policy = dict(state.policy)
    policy[PolicyKey(1, EG, ID_C, PROTO_TCP, 8080, 16)] = PolicyEntry(Verdict.DENY, 0, (18,))
    state.policy = normalize_entries(policy)
    dp.sync(state)
    entry = state.services[(VIP, VPORT, PROTO_TCP)]
    for sport in range(46000, 46020):
        retval, out, events = send(dp, syn(sport))
        chosen = pick_backend(entry, A, sport)
        assert chosen is not None and out[IP].dst == chosen.ip
        if chosen.ip == C:
            assert retval == TC_ACT_SHOT
            assert [(e.dst, e.dport, e.reason) for e in events] == [(C, 8080, DropReason.POLICY_EXPLICIT_DENY)]
        else:
            assert retval == TC_ACT_OK


def test_bpf_service_without_backend_drops(dp: Datapath) -> None:
    dp.sync(state_with(service([])))
    retval, _, events = send(dp, syn(47000))
    assert retval == TC_ACT_SHOT
    assert [(e.dst, e.dport, e.verdict, e.reason) for e in events] == [
        (VIP, VPORT, FlowVerdict.DROP, DropReason.NO_SERVICE_BACKEND)]
    # Other ports of the ClusterIP are no service: left alone (and judged as usual).
    assert send(dp, syn(47001, dport=81))[1][IP].dst == VIP


def test_bpf_service_maps_follow_the_state(dp: Datapath) -> None:
    """A service removed from the map state is gone from the maps: its address is no longer
    translated."""
    dp.sync(state_with(service([BACKEND_B])))
    assert send(dp, syn(48000))[1][IP].dst == B
    dp.sync(state_with())
    assert send(dp, syn(48001))[1][IP].dst == VIP
