"""The L7 redirect in the BPF datapath on test packets: a flow marked for the proxy fails closed
when no proxy socket listens (also in audit mode), finds the listener when one does (in a
private network namespace, so the machine's own sockets are neither seen nor disturbed), and
to_container honours the marks of from_container and of the proxy."""

from __future__ import annotations

import ctypes
import os
import pickle
import socket
import subprocess

import pytest
from scapy.all import IP, TCP  # type: ignore[import-untyped]
from dataplane.abi import MARK_MAGIC_DECIDED, PROXY_PORT, from_proxy_mark
from dataplane.datapath import Datapath
from dataplane.mapstate import PolicyEntry, PolicyKey
from dataplane.abi import IDENTITY_HOST, PROTO_TCP, PROTO_UDP, Verdict
from dataplane.abi import DropReason, FlowVerdict
from tests.support.prog_run import (A, B, ID_A, ING, NODE, TC_ACT_OK, TC_ACT_SHOT, base_state, eth, oracle,
                                    packet, redirect_state, run)

pytestmark = pytest.mark.kernel


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


def test_bpf_to_container_marks(dp: Datapath) -> None:
    dp.sync(base_state())
    # Decided by from_container: passes whatever the policy says.
    retval, _, events = run(dp, packet(A, B, PROTO_TCP, 81), "to_container", mark=MARK_MAGIC_DECIDED)
    assert (retval, events) == (TC_ACT_OK, [])
    # From the proxy: passes, and the pod's replies then pass from_container by conntrack.
    retval, _, events = run(dp, packet(A, B, PROTO_TCP, 81, 40020), "to_container", mark=from_proxy_mark(ID_A))
    assert retval == TC_ACT_OK and events[0].src_identity == ID_A
    assert run(dp, bytes(eth() / IP(src=B, dst=A) / TCP(sport=81, dport=40020, flags="SA")))[::2] == (TC_ACT_OK, [])


def test_bpf_to_container_redirect_fails_closed(dp: Datapath) -> None:
    state = base_state()
    state.policy[PolicyKey(2, ING, IDENTITY_HOST, PROTO_TCP, 80, 16)] = PolicyEntry(Verdict.REDIRECT, PROXY_PORT, (43,))
    dp.sync(state)
    retval, _, events = run(dp, packet(NODE, B, PROTO_TCP, 80), "to_container")
    assert (retval, events[0].reason) == (TC_ACT_SHOT, DropReason.PROXY_NOT_AT_EGRESS)
