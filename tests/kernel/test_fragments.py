"""IPv4 fragments on real traffic: an allowed UDP datagram bigger than the MTU arrives whole.

Two pods on 1500-MTU veths; x/b serves a UDP echo on port 81 and isolates its ingress, so
the policy really is checked. A 4000-byte datagram from x/a leaves x/a's stack as three
fragments: from_container decides the first one by policy (and records its datagram in the
`fragments` map), the later two pass as packets of the flow, x/b's stack reassembles it and the
echo reports how many bytes it got. Under a policy that does not allow UDP 81 the first
fragment drops by policy and the later ones as unknown fragments. Traffic stays inside the
lab's namespaces; every wait is bounded.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
from collections import Counter

import pytest

from dataplane import topology
from dataplane.datapath import FlowEvent
from dataplane.policy import PolicyEngine
from dataplane.abi import DropReason, FlowVerdict
from dataplane.scenario import Scenario
from dataplane.timescale import scaled
from tests.support import kernel_lab as helpers
from tests.support.kernel_lab import KernelLab, knp

LAB_PREFIX = "frag"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)
PORT = 81
SIZE = 4000  # > 1500 MTU: three fragments
SIOCGIFMTU = 0x8921

TOPOLOGY = (
    "name: frag\n"
    "namespaces:\n"
    "  - {name: x, labels: {ns: x}}\n"
    "pods:\n"
    + "".join(f"  - {{name: {p}, namespace: x, labels: {{pod: {p}}}, "
              f"ports: [{{port: {PORT}, protocol: UDP, name: serve-udp}}, {{port: 80, name: serve-tcp}}]}}\n"
              for p in "ab"))

ALLOW_UDP = knp("allow-udp", "x", f"""
    podSelector: {{matchLabels: {{pod: b}}}}
    policyTypes: [Ingress]
    ingress: [{{from: [{{podSelector: {{matchLabels: {{pod: a}}}}}}], ports: [{{protocol: UDP, port: {PORT}}}]}}]
    """)

ALLOW_TCP_ONLY = knp("allow-tcp-only", "x", f"""
    podSelector: {{matchLabels: {{pod: b}}}}
    policyTypes: [Ingress]
    ingress: [{{from: [{{podSelector: {{matchLabels: {{pod: a}}}}}}], ports: [{{protocol: TCP, port: {PORT}}}]}}]
    """)


def make_scenario(policies: str = ALLOW_UDP) -> Scenario:
    return helpers.make_scenario(policies, topology_text=TOPOLOGY)


def exchange(klab: KernelLab, payload: bytes, attempts: int = 3, timeout: float | None = None) -> dict | None:
    """Send `payload` as one datagram from x/a to x/b:81 (retried a few times: the first may
    wait for ARP); the echo's JSON reply, or None if nothing came back. A reply is awaited
    patiently (2 s, scaled to this machine) unless the caller expects none (`timeout`)."""
    timeout = timeout if timeout is not None else scaled(2.0)
    sock = topology.socket_in(klab.netns("x/a"), kind=socket.SOCK_DGRAM)
    try:
        sock.setblocking(True)
        sock.settimeout(timeout)
        sock.connect((klab.scenario.pods["x/b"].ip, PORT))
        for _ in range(attempts):
            sock.send(payload)
            try:
                return json.loads(sock.recv(65536))
            except (TimeoutError, ConnectionRefusedError):
                continue
        return None
    finally:
        sock.close()


def flow_events(klab: KernelLab) -> list[FlowEvent]:
    a, b = klab.scenario.pods["x/a"].ip, klab.scenario.pods["x/b"].ip
    out = []
    for _ in range(5):  # bounded: drain what the ring buffer holds
        got = klab.datapath.poll_events(timeout_ms=100)
        if not got:
            break
        out += [e for e in got if {e.src, e.dst} == {a, b}]
    return out


def test_fragmented_datagram_of_an_allowed_flow_arrives_whole(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(ALLOW_UDP)))
    assert exchange(klab, b"small")["bytes"] == 5  # the policy really allows the flow
    before = Counter(klab.datapath.metrics())
    reply = exchange(klab, b"z" * SIZE)
    assert reply is not None, "the fragmented datagram never reached the echo"
    assert reply["bytes"] == SIZE and reply["endpoint"] == "x/b"
    delta = Counter(klab.datapath.metrics()) - before
    assert not [k for k in delta if k[0] == FlowVerdict.DROP], delta
    assert klab.datapath.fragments_size() >= 1  # the first fragment recorded its datagram
    events = flow_events(klab)
    assert not [e for e in events if e.verdict == FlowVerdict.DROP], events


def test_fragmented_datagram_as_a_new_flow(klab: KernelLab) -> None:
    """No small datagram first: the first fragment itself opens the flow (one FORWARD event)."""
    klab.switch(PolicyEngine(make_scenario(ALLOW_UDP)))
    reply = exchange(klab, b"n" * SIZE)
    assert reply is not None and reply["bytes"] == SIZE
    events = flow_events(klab)
    new = [e for e in events if e.dport == PORT]
    assert new and new[0].verdict == FlowVerdict.FORWARD, events
    assert not [e for e in events if e.verdict == FlowVerdict.DROP], events


def test_fragmented_datagram_of_a_denied_flow_drops(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(ALLOW_TCP_ONLY)))
    assert exchange(klab, b"d" * SIZE, attempts=1, timeout=1.0) is None
    events = flow_events(klab)
    reasons = Counter(e.reason for e in events if e.verdict == FlowVerdict.DROP)
    assert reasons[DropReason.POLICY_DENIED] >= 1, events
    assert reasons[DropReason.FRAGMENT_UNKNOWN] >= 2, events  # SIZE over a 1500 MTU: 2 later fragments
    assert klab.datapath.fragments_size() == 0
    assert exchange(klab, b"small", attempts=1, timeout=1.0) is None  # the flow itself is denied


@pytest.mark.parametrize("endpoint", ["x/a", "x/b"])
def test_pod_links_have_a_1500_mtu(klab: KernelLab, endpoint: str) -> None:
    """What makes the 4000-byte datagram a fragmented one."""
    with topology.in_netns(klab.netns(endpoint)):
        names = [n for _, n in socket.if_nameindex() if n != "lo"]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert names
        for name in names:
            req = struct.pack("16si12x", name.encode(), 0)
            (value,) = struct.unpack_from("i", fcntl.ioctl(sock.fileno(), SIOCGIFMTU, req), 16)
            assert value <= 1500, (name, value)
    finally:
        sock.close()
