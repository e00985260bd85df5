"""The L7 redirect on real traffic: a pod's connection is assigned by from_container (tc ingress)
to a transparent listener in the node namespace, which sees the original destination; with no
listener the SYN is dropped (fail closed). Two throwaway namespaces, built with the topology
primitives; no proxy code involved (a bare IP_TRANSPARENT socket stands in for it)."""

from __future__ import annotations

import select
import socket
import uuid
from collections.abc import Iterator

import pytest

from dataplane import topology
from dataplane.datapath import Datapath
from dataplane.mapstate import EndpointState, MapState, PolicyEntry, PolicyKey
from dataplane.abi import Direction, IDENTITY_WORLD, PROTO_TCP, PROXY_PORT, Verdict
from dataplane.abi import DropReason, FlowVerdict
from dataplane.scenario import GATEWAY_IP
from dataplane.timescale import scaled
from tests.conftest import require_kernel

pytestmark = pytest.mark.kernel

POD_IP, NODE_IP, ORIG_DST = "10.77.0.1", "10.77.255.254", "198.51.100.9"
IP_TRANSPARENT = 19


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    require_kernel()
    with Datapath() as d:
        yield d


@pytest.fixture
def wired(dp: Datapath) -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    node, pod, ifname = f"l7dp-{tag}-node", f"l7dp-{tag}-pod", f"l7dp{tag}"
    try:
        topology.create_netns(node)
        topology.create_netns(pod)
        topology.setup_node(node, [GATEWAY_IP, NODE_IP])
        topology.add_endpoint(node, pod, ifname, POD_IP, GATEWAY_IP, NODE_IP)
        dp.sync(MapState(
            ipcache={f"{POD_IP}/32": 256, "0.0.0.0/0": IDENTITY_WORLD},
            endpoints={1: EndpointState(1, "default/client", POD_IP, 256, False, True)},
            policy={PolicyKey(1, Direction.EGRESS, IDENTITY_WORLD, PROTO_TCP, 80, 16):
                    PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (7,))}))
        topology.attach_tc(node, ifname, ingress_fd=dp.program_fd("from_container"),
                           egress_fd=dp.program_fd("to_container"), name="l7dp-test")
        dp.flush_conntrack()
        dp.poll_events()
        yield node, pod
    finally:
        topology.remove_netns(pod)
        topology.remove_netns(node)
        dp.sync(MapState())


def connect(pod: str) -> socket.socket:
    client = topology.socket_in(pod)
    client.connect_ex((ORIG_DST, 80))
    return client


def wait(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def test_bpf_redirect_real_traffic_reaches_transparent_listener(dp: Datapath, wired: tuple[str, str]) -> None:
    node, pod = wired
    listener = topology.socket_in(node)
    listener.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    listener.bind(("127.0.0.1", PROXY_PORT))
    listener.listen()
    client = connect(pod)
    try:
        assert wait(listener, scaled(5)), "the redirected SYN never reached the listener"
        conn, peer = listener.accept()
        conn.setblocking(True)
        conn.settimeout(scaled(5))
        assert peer[0] == POD_IP
        assert conn.getsockname() == (ORIG_DST, 80)          # the original destination
        client.setblocking(True)
        client.settimeout(scaled(5))
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")             # established packets: back to the proxy
        assert conn.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")       # replies pass to_container by conntrack
        assert client.recv(100).startswith(b"HTTP/1.1 403")
        conn.close()
    finally:
        client.close()
        listener.close()
    events = [e for e in dp.poll_events() if e.dport == 80]
    assert [(e.verdict, e.proxy_port, e.rule_id) for e in events] == [(FlowVerdict.REDIRECT, PROXY_PORT, 7)]


def test_bpf_redirect_real_traffic_fails_closed(dp: Datapath, wired: tuple[str, str]) -> None:
    _, pod = wired
    client = connect(pod)
    try:
        assert not select.select([], [client], [], 1.5)[1], "connected without a proxy"
    finally:
        client.close()
    drops = [e for e in dp.poll_events() if e.dport == 80]
    assert drops and {(e.verdict, e.reason) for e in drops} == {(FlowVerdict.DROP, DropReason.PROXY_SOCKET_MISSING)}
