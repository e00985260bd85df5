"""Conntrack on real traffic, and policy changes under continuous traffic (issue 4).

Replies of an allowed connection pass by conntrack; a new connection is
always checked. One lab for the module; here conntrack is NOT flushed on policy changes (a policy
change is map updates only, exactly as `l7lab` does it), except between tests.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from dataplane import topology
from dataplane.policy import PolicyEngine
from dataplane.probes import run_probe
from dataplane.timescale import scaled
from tests.support.kernel_lab import KernelLab, knp, make_probe, make_scenario, oracle_outcome, pair_probes

SERVER_EGRESS_DENIED = knp("deny-egress", "x", """
    podSelector: {matchLabels: {pod: a}}
    policyTypes: [Ingress, Egress]
    ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
    """)


LAB_PREFIX = "ct"  # the module's lab (fixture `klab` in tests/kernel/conftest.py)
pytestmark = pytest.mark.usefixtures("wide_probes")


class KeepAlive:
    """A persistent HTTP/1.1 connection opened from inside a pod's namespace."""

    def __init__(self, klab: KernelLab, src: str, dst: str, port: int = 80) -> None:
        self.sock = topology.socket_in(klab.netns(src))
        self.sock.setblocking(True)
        self.sock.settimeout(scaled(3.0))
        self.host = dst.split("/")[-1]
        self.sock.connect((klab.scenario.pods[dst].ip, port))
        self.buf = b""

    def request(self, path: str) -> dict:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: keep-alive\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the peer")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(self.buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            self.buf += chunk
        body, self.buf = self.buf[:length], self.buf[length:]
        import json  # noqa: PLC0415
        return json.loads(body)

    def close(self) -> None:
        self.sock.close()


class UdpFlow:
    """One UDP 5-tuple reused for several datagrams."""

    def __init__(self, klab: KernelLab, src: str, dst: str, port: int = 81) -> None:
        self.sock = topology.socket_in(klab.netns(src), kind=socket.SOCK_DGRAM)
        self.sock.setblocking(True)
        self.sock.settimeout(scaled(5.0))  # patient: a late echo must not pass for a drop
        self.sock.connect((klab.scenario.pods[dst].ip, port))

    def exchange(self, text: str) -> bool:
        """Send `text`; True once its echo arrives (late echoes of earlier datagrams are skipped)."""
        self.sock.send(text.encode())
        deadline = time.monotonic() + scaled(5.0)
        while time.monotonic() < deadline:
            try:
                if text in self.sock.recv(65536).decode():
                    return True
            except (socket.timeout, ConnectionRefusedError):
                return False
        return False

    def close(self) -> None:
        self.sock.close()


def test_replies_pass_under_default_deny_egress_of_the_server(klab: KernelLab) -> None:
    """x/a may not open anything (egress isolated, no egress rule) but answers the connections
    its ingress allows: the replies are part of an allowed connection."""
    klab.switch(PolicyEngine(make_scenario(SERVER_EGRESS_DENIED)))
    pairs = [("y/a", "x/a"), ("y/b", "x/a"), ("z/a", "x/a"), ("x/a", "y/a"), ("x/a", "x/b"), ("x/a", "w1")]
    out = klab.run(pair_probes(klab.engine, pairs, (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81))))
    assert not out.disagreements(), out.disagreements()
    for port, proto in ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")):
        assert out[("y/a", "x/a", port, proto)] == "allowed"  # the reply crossed x/a's denied egress
        assert out[("y/b", "x/a", port, proto)] == "allowed"
        assert out[("z/a", "x/a", port, proto)] == "dropped"
        assert out[("x/a", "y/a", port, proto)] == "dropped"  # a new connection from x/a is checked
        assert out[("x/a", "w1", port, proto)] == "dropped"


def test_established_connection_survives_an_unrelated_policy_change(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(SERVER_EGRESS_DENIED)))
    conn = KeepAlive(klab, "y/a", "x/a")
    udp = UdpFlow(klab, "y/a", "x/a")
    try:
        assert conn.request("/before")["path"] == "/before"
        assert udp.exchange("before-1")
        engine = klab.engine
        unrelated = make_scenario(SERVER_EGRESS_DENIED, steps="""\
            steps:
              - name: unrelated
                apply:
                  - apiVersion: networking.k8s.io/v1
                    kind: NetworkPolicy
                    metadata: {name: iso-z, namespace: z}
                    spec: {podSelector: {}}
              - name: relabel an unrelated pod
                relabel:
                  - {pod: z/b, set: {extra: "1"}}
            """)
        for step in unrelated.steps:
            engine.apply_step(step)
            klab.lab.sync_policy(engine.map_state())  # no conntrack flush
            assert conn.request(f"/after-{step.index}")["path"] == f"/after-{step.index}"
            assert udp.exchange(f"after-{step.index}")
        # The change did take effect for new connections.
        assert klab.observe("y/a", "z/a", 80, "TCP", 0.4).outcome == "dropped"
        assert klab.observe("y/a", "x/a", 80, "TCP", 3.0).outcome == "allowed"
    finally:
        conn.close()
        udp.close()


def test_after_removing_an_allow_the_next_new_connection_is_dropped(klab: KernelLab) -> None:
    klab.switch(PolicyEngine(make_scenario(SERVER_EGRESS_DENIED, steps="""\
        steps:
          - name: narrow the allow to y/b
            apply:
              - apiVersion: networking.k8s.io/v1
                kind: NetworkPolicy
                metadata: {name: deny-egress, namespace: x}
                spec:
                  podSelector: {matchLabels: {pod: a}}
                  policyTypes: [Ingress, Egress]
                  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]
        """)))
    conn = KeepAlive(klab, "y/a", "x/a")
    try:
        assert conn.request("/one")["path"] == "/one"
        for proto, port in (("TCP", 80), ("UDP", 81)):
            assert klab.observe("y/a", "x/a", port, proto, 3.0).outcome == "allowed"
        klab.apply(klab.scenario.steps[0], flush=False)
        for proto, port in (("TCP", 80), ("UDP", 81), ("TCP", 81)):
            assert oracle_outcome(klab.engine, "y/a", "x/a", port, proto) == "dropped"
            assert klab.observe("y/a", "x/a", port, proto, 0.4).outcome == "dropped"
            assert klab.observe("y/b", "x/a", port, proto, 3.0).outcome == "allowed"
        # The connection established before the change is conntrack's (as in Cilium): it stays.
        assert conn.request("/two")["path"] == "/two"
    finally:
        conn.close()


STATE_A = knp("allow", "x", """
    podSelector: {matchLabels: {pod: a}}
    ingress:
      - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]
      - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
    """)
STATE_B_STEP = """\
  - name: to B
    apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
            - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: c}}}]
            - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a]}]}}]
              ports: [{port: 80, protocol: TCP}, {port: 81, protocol: UDP}]
"""
STATE_A_STEP = """\
  - name: to A
    apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
            - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]
            - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
"""


def test_policy_change_under_continuous_traffic(klab: KernelLab) -> None:
    """y/a -> x/a is allowed in both states (by different entries: any protocol in A, TCP/80 and
    UDP/81 in B, so the change adds and deletes its keys); y/b only in A; y/c only in B; z/a
    never. New connections run in a loop while the policy flips A <-> B; each state stays until
    every loop has finished two connections in it (the second one begun after the flip), so a
    slow machine, whose dropped probes wait longer, still sees both states."""
    engine = PolicyEngine(make_scenario(STATE_A, steps="steps:\n" + STATE_B_STEP + STATE_A_STEP))
    klab.switch(engine)
    to_b, to_a = engine.scenario.steps
    for src, allowed in (("y/a", True), ("y/b", True), ("y/c", False), ("z/a", False)):
        assert (oracle_outcome(engine, src, "x/a", 80, "TCP") == "allowed") is allowed
    probe_b = PolicyEngine(make_scenario(STATE_A, steps="steps:\n" + STATE_B_STEP))
    probe_b.apply_step(probe_b.scenario.steps[0])
    for src, allowed in (("y/a", True), ("y/b", False), ("y/c", True), ("z/a", False)):
        assert (oracle_outcome(probe_b, src, "x/a", 80, "TCP") == "allowed") is allowed
        assert (oracle_outcome(probe_b, src, "x/a", 81, "UDP") == "allowed") is allowed

    flips: list[str] = []
    stop = threading.Event()
    flipped = threading.Event()  # the traffic runs until every flip is done, however slow
    errors: list[BaseException] = []
    loops = [(src, proto) for src in ("y/a", "y/b", "y/c", "z/a") for proto in ("TCP", "UDP")]
    finished = dict.fromkeys(loops, 0)  # connections each loop has completed so far
    running = set(loops)  # a loop that reached its bound is not waited for

    def flipper() -> None:
        try:
            for i in range(8):  # bounded: 8 changes
                # Wait for the event (two more connections of every loop in this state), not a time.
                mark, deadline = dict(finished), time.monotonic() + scaled(30.0)
                while any(finished[k] < mark[k] + 2 for k in loops if k in running):
                    if stop.wait(0.01):
                        return
                    assert time.monotonic() < deadline, f"the traffic loops stalled: {finished}"
                step = to_b if i % 2 == 0 else to_a
                engine.apply_step(step)
                klab.lab.sync_policy(engine.map_state())
                flips.append(step.name)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            flipped.set()

    results: dict[tuple[str, str], list[str]] = {}
    sc = engine.scenario

    async def loop(src: str, proto: str, port: int, timeout: float, deadline: float) -> None:
        out = results.setdefault((src, proto), [])
        try:
            for _ in range(1000):  # bounded in count as well as in time
                if flipped.is_set() or time.monotonic() > deadline:
                    return
                probe = make_probe(sc, src, "x/a", port, proto, "allowed", timeout)
                out.append((await run_probe(probe, klab.netns(src))).outcome)
                finished[(src, proto)] += 1
                await asyncio.sleep(0.01)  # spread the connections over the whole window
        finally:
            running.discard((src, proto))

    async def traffic() -> None:
        deadline = time.monotonic() + scaled(120.0)  # a bound only: the loops end with the last flip
        await asyncio.gather(*(loop(src, proto, port, timeout, deadline)
                               for src, timeout in (("y/a", 3.0), ("y/b", 0.3), ("y/c", 0.3), ("z/a", 0.3))
                               for proto, port in (("TCP", 80), ("UDP", 81))))

    thread = threading.Thread(target=flipper, name="policy-flipper")
    thread.start()
    try:
        asyncio.run(traffic())
    finally:
        stop.set()
        thread.join(timeout=scaled(10))
    assert not errors, errors
    assert len(flips) == 8, flips  # the policy changed eight times while the traffic ran
    for proto in ("TCP", "UDP"):
        always = results[("y/a", proto)]
        assert always and set(always) == {"allowed"}, (proto, always)
        assert set(results[("z/a", proto)]) == {"dropped"}, (proto, results[("z/a", proto)])
        # y/b and y/c followed the flips: each was allowed in one state and dropped in the other.
        assert set(results[("y/b", proto)]) == {"allowed", "dropped"}, (proto, results[("y/b", proto)])
        assert set(results[("y/c", proto)]) == {"allowed", "dropped"}, (proto, results[("y/c", proto)])
    # Settled: the final state is whatever the last flip applied; kernel == oracle again. The
    # loops' UDP flows stay in conntrack; a final probe must not reuse one of their tuples.
    klab.datapath.flush_conntrack()
    final = klab.run(pair_probes(engine, [("y/a", "x/a"), ("y/b", "x/a"), ("y/c", "x/a"), ("z/a", "x/a")]))
    assert not final.disagreements(), final.disagreements()


def test_icmp_error_of_an_allowed_flow_is_related_and_passes(klab: KernelLab) -> None:
    """x/a may send nothing new (egress isolated), yet the port unreachable it answers to an
    allowed datagram for a closed port reaches the client: the ICMP error is RELATED to the flow
    (Cilium CT_RELATED). Without a tracked flow the same ICMP would be a new, denied flow."""
    klab.switch(PolicyEngine(make_scenario(SERVER_EGRESS_DENIED)))
    out = klab.run(pair_probes(klab.engine, [("y/a", "x/a"), ("z/a", "x/a")], (("UDP", 82), ("TCP", 82))))
    assert not out.disagreements(), out.disagreements()
    assert out[("y/a", "x/a", 82, "UDP")] == "refused" and out[("y/a", "x/a", 82, "TCP")] == "refused"
    assert out[("z/a", "x/a", 82, "UDP")] == "dropped"
