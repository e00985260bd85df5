"""DNS over TCP on real traffic: a DNS rule on port 53 of protocol ANY redirects TCP connections
to kube-dns as it redirects datagrams, and the proxy's TCP side judges every question on them as
its UDP side does: an allowed name is answered by the server (asked by the proxy, over TCP, from
the node), another name REFUSED by the proxy (the server never sees it), pipelined questions on
one connection each answered; one L7 record per question with TCP as its transport; what is not
DNS ends the connection unanswered; the oracle judges the same.

Scenario: scenarios/dns-policy.yaml (mediabot may ask kube-dns only about *.example.com). The
server of kube-dns's TCP port 53 is run here, in kube-dns's namespace (dnspython), so the test
does not depend on which DNS server the lab gives the pod.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest

from dataplane import topology
from dataplane.flowrecord import Flow
from dataplane.lab import Lab, lab_dir
from dataplane.policy import Flow as OracleFlow
from dataplane.policy import PolicyEngine
from dataplane.scenario import load_scenario
from tests.conftest import REPO, unique_lab
from tests.support.loopback import LoopThread
from tests.support.wait import wait_for

pytestmark = pytest.mark.kernel

SCENARIO = REPO / "scenarios" / "dns-policy.yaml"
ANSWERS = {"www.example.com": "203.0.113.20", "api.partner.example.com": "203.0.113.22",
           "www.example.org": "198.51.100.30"}
TIMEOUT = 10.0


class TcpDnsServer:
    """DNS over TCP on kube-dns's address, port 53, inside its namespace: answers ANSWERS
    (NXDOMAIN otherwise) and keeps (client address, name) of every question."""

    def __init__(self, netns: str, ip: str) -> None:
        self.netns, self.ip = netns, ip
        self.seen: list[tuple[str, str]] = []
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        sock = topology.socket_in(self.netns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, 53))
        sock.listen(64)
        self._server = await asyncio.start_server(self._serve, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[0]
        try:
            while True:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                query = dns.message.from_wire(await reader.readexactly(length))
                name = query.question[0].name.to_text(omit_final_dot=True).lower()
                self.seen.append((client, name))
                reply = dns.message.make_response(query)
                if name in ANSWERS:
                    reply.answer.append(dns.rrset.from_text(name + ".", 30, "IN", "A", ANSWERS[name]))
                else:
                    reply.set_rcode(dns.rcode.NXDOMAIN)
                wire = reply.to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class DnsTcpLab:
    def __init__(self, lab: Lab, engine: PolicyEngine) -> None:
        self.lab, self.engine = lab, engine
        self.loop = LoopThread()
        kube_dns = lab.record.endpoints["kube-system/kube-dns"]
        self.dns_ip = kube_dns.ip
        self.server = TcpDnsServer(kube_dns.netns, kube_dns.ip)
        self.loop.run(self.server.start())

    def connect(self, pod: str) -> socket.socket:
        sock = topology.socket_in(self.lab.record.endpoints[pod].netns)
        sock.setblocking(True)
        sock.settimeout(TIMEOUT)
        sock.connect((self.dns_ip, 53))
        return sock

    def records(self) -> list[Flow]:
        path = self.lab.proxy_events_file
        return [Flow.from_json(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []

    def oracle(self, pod: str, name: str, protocol: str = "TCP") -> bool | None:
        """Whether the oracle's L7 decision allows the question (None: it made none)."""
        decision = self.engine.verdict(OracleFlow(pod, self.dns_ip, protocol, 53, None, name, "kube-dns"))
        return None if decision.l7 is None else decision.l7.allowed

    def close(self) -> None:
        self.loop.run(self.server.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def lab(datapath) -> Iterator[DnsTcpLab]:  # noqa: ANN001 - session fixture
    scenario = load_scenario(SCENARIO).with_name(unique_lab("dtcp"))
    engine = PolicyEngine(scenario)
    with Lab(scenario, datapath=datapath, policy=engine) as lab:
        t = DnsTcpLab(lab, engine)
        try:
            yield t
        finally:
            t.close()


def send(sock: socket.socket, *queries: dns.message.Message) -> None:
    sock.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))


def receive(sock: socket.socket) -> dns.message.Message:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = sock.recv(n - len(data))
            assert piece, "the connection was closed before the answer"
            data += piece
        return data
    return dns.message.from_wire(exact(struct.unpack("!H", exact(2))[0]))


def ask(lab: DnsTcpLab, pod: str, name: str) -> dns.message.Message:
    sock = lab.connect(pod)
    try:
        query = dns.message.make_query(name, "A")
        send(sock, query)
        reply = receive(sock)
        assert reply.id == query.id
        return reply
    finally:
        sock.close()


def test_dns_over_tcp_is_judged_like_dns_over_udp(lab: DnsTcpLab) -> None:
    seen_before, records_before = len(lab.server.seen), len(lab.records())
    allowed = ask(lab, "shop/mediabot", "www.example.com")
    assert allowed.rcode() == dns.rcode.NOERROR and [rd.to_text() for rs in allowed.answer for rd in rs] == \
        ["203.0.113.20"]
    missing = ask(lab, "shop/mediabot", "nothing-here.example.com")
    assert missing.rcode() == dns.rcode.NXDOMAIN  # the server's own answer
    for name in ("www.example.org", "api.partner.example.com"):
        refused = ask(lab, "shop/mediabot", name)
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer, name
    # The server saw the allowed questions only, over TCP from the node (the proxy's upstream).
    assert lab.server.seen[seen_before:] == [(lab.lab.scenario.node_ip, "www.example.com"),
                                             (lab.lab.scenario.node_ip, "nothing-here.example.com")]
    records = wait_for("the four records", lambda: len(lab.records()) - records_before >= 4 and
                       lab.records()[records_before:])
    assert [(r.dns.query, r.dns.rcode, r.verdict, r.l4.protocol) for r in records] == [
        ("www.example.com", 0, "forwarded", "TCP"), ("nothing-here.example.com", 3, "forwarded", "TCP"),
        ("www.example.org", 5, "denied", "TCP"), ("api.partner.example.com", 5, "denied", "TCP")]
    assert all(r.source.name == "shop/mediabot" and r.destination.name == "kube-system/kube-dns"
               and r.destination.port == 53 and r.direction == "egress" for r in records)
    assert records[0].policy.policies == ("CiliumNetworkPolicy shop/mediabot-dns",)
    assert records[0].dns.ips == ("203.0.113.20",)
    # The oracle's L7 decision on each question over TCP is the lab's, and its decision over UDP.
    # (Its final outcome also asks whether kube-dns declares 53/TCP; this scenario's does not.)
    for name, allowed in (("www.example.com", True), ("www.example.org", False), ("api.partner.example.com", False)):
        assert lab.oracle("shop/mediabot", name) is allowed is lab.oracle("shop/mediabot", name, "UDP"), name


def test_pipelined_questions_on_one_connection_are_each_answered(lab: DnsTcpLab) -> None:
    sock = lab.connect("shop/mediabot")
    try:
        allowed, refused = dns.message.make_query("www.example.com", "A"), dns.message.make_query("www.example.org", "A")
        send(sock, allowed, refused)
        replies = {r.id: r for r in (receive(sock), receive(sock))}
        assert replies[allowed.id].rcode() == dns.rcode.NOERROR and replies[refused.id].rcode() == dns.rcode.REFUSED
        send(sock, dns.message.make_query("nothing-here.example.com", "A"))  # the connection goes on
        assert receive(sock).rcode() == dns.rcode.NXDOMAIN
    finally:
        sock.close()


def test_an_answer_with_addresses_is_offered_to_the_lab_learner_first(lab: DnsTcpLab) -> None:
    """The lab starts the proxy with --fqdn-socket <lab dir>/fqdn.sock; this lab (no agent, no
    runner) serves no learner there, so the answer is released and its record says why."""
    records_before = len(lab.records())
    ask(lab, "shop/mediabot", "www.example.com")
    record = wait_for("the record", lambda: lab.records()[records_before:])[0]
    assert record.verdict == "forwarded" and record.dns.learned == ()
    assert f"policy not updated: FQDN learner at {lab_dir(lab.lab.name) / 'fqdn.sock'} unavailable" in record.summary


def test_a_pod_without_dns_rules_reaches_the_server_directly(lab: DnsTcpLab) -> None:
    records_before = len(lab.records())
    reply = ask(lab, "shop/shell", "www.example.org")
    assert [rd.to_text() for rs in reply.answer for rd in rs] == ["198.51.100.30"]
    assert lab.server.seen[-1] == (lab.lab.scenario.pods["shop/shell"].ip, "www.example.org")  # not via the proxy
    assert len(lab.records()) == records_before


def test_what_is_not_dns_ends_the_connection_unanswered(lab: DnsTcpLab) -> None:
    seen_before, records_before = len(lab.server.seen), len(lab.records())
    sock = lab.connect("shop/mediabot")
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: kube-dns\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536) == b""  # an end of stream, nothing answered
    finally:
        sock.close()
    record = wait_for("the record", lambda: lab.records()[records_before:])[0]
    assert record.verdict == "error" and record.l4.protocol == "TCP" and "connection closed" in record.summary
    assert len(lab.server.seen) == seen_before
    assert lab.engine.verdict(OracleFlow("shop/mediabot", lab.dns_ip, "TCP", 53, None, "", "kube-dns")).outcome \
        == "dropped"
