"""DNS over TCP on real traffic: a DNS rule on port 53 of protocol ANY redirects TCP connections
to kube-dns as it redirects datagrams, and the proxy's TCP side judges every question on them as
its UDP side does: an allowed name is answered by the cluster DNS (asked by the proxy, over TCP,
from the node), another name REFUSED by the proxy (the server never sees it), pipelined
questions on one connection each answered; one L7 record per question with TCP as its
transport; what is not DNS ends the connection unanswered; the oracle judges the same. An
answer's addresses are learned by the lab's FQDN learner before the answer is released, over
TCP as over UDP: the connection that follows is allowed at once.

Scenario: scenarios/dns-policy.yaml (mediabot may ask kube-dns only about *.example.com), its
kube-dns also declaring TCP port 53, where the lab's cluster DNS answers over TCP.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import dns.message
import dns.rcode
import pytest

from dataplane import topology
from dataplane.flowrecord import Flow
from dataplane.lab import Lab, lab_dir, lab_prefix
from dataplane.logfiles import read_all, request_log
from dataplane.policy import Flow as OracleFlow
from dataplane.policy import PolicyEngine
from dataplane.runner import KernelExecutor
from dataplane.scenario import DnsQuery, HttpRequest, Port, load_scenario, make_probe
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.wait import wait_for

pytestmark = pytest.mark.kernel

SCENARIO = REPO / "scenarios" / "dns-policy.yaml"
KUBE_DNS = "kube-system/kube-dns"
TIMEOUT = scaled(10.0)


class DnsTcpLab:
    def __init__(self, lab: Lab, engine: PolicyEngine) -> None:
        self.lab, self.engine = lab, engine
        self.dns_ip = lab.record.endpoints[KUBE_DNS].ip
        self.node_ip = lab.scenario.node_ip
        # Serves the lab's FQDN learner on <lab dir>/fqdn.sock while the module runs.
        self.executor = KernelExecutor(lab, engine)

    def connect(self, pod: str) -> socket.socket:
        sock = topology.socket_in(self.lab.record.endpoints[pod].netns)
        sock.setblocking(True)
        sock.settimeout(TIMEOUT)
        sock.connect((self.dns_ip, 53))
        return sock

    def records(self) -> list[Flow]:
        path = self.lab.proxy_events_file
        return [Flow.from_json(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []

    def server_log(self) -> list[dict[str, Any]]:
        """The questions the cluster DNS answered (its request log)."""
        ns = self.lab.record.endpoints[KUBE_DNS].netns.removeprefix(lab_prefix(self.lab.name))
        return [r for r in read_all(request_log(lab_dir(self.lab.name), ns)) if "dns" in r]

    def oracle(self, pod: str, name: str, protocol: str = "TCP") -> str:
        return self.engine.verdict(OracleFlow(pod, self.dns_ip, protocol, 53, None, name, "kube-dns")).outcome

    def close(self) -> None:
        self.executor.close()


@pytest.fixture(scope="module")
def lab(datapath) -> Iterator[DnsTcpLab]:  # noqa: ANN001 - session fixture
    scenario = load_scenario(SCENARIO).with_name(unique_lab("dtcp"))
    kube_dns = scenario.pods[KUBE_DNS]
    pods = {**scenario.pods, KUBE_DNS: replace(kube_dns, ports=(*kube_dns.ports, Port(53, "TCP", "dns-tcp")))}
    scenario = replace(scenario, pods=pods)
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


def addresses(reply: dns.message.Message) -> list[str]:
    return [rd.to_text() for rs in reply.answer for rd in rs if rs.rdtype == 1]


def test_dns_over_tcp_is_judged_like_dns_over_udp(lab: DnsTcpLab) -> None:
    log_before, records_before = len(lab.server_log()), len(lab.records())
    allowed = ask(lab, "shop/mediabot", "www.example.com")
    assert allowed.rcode() == dns.rcode.NOERROR and addresses(allowed) == ["203.0.113.20"]
    missing = ask(lab, "shop/mediabot", "nothing-here.example.com")
    assert missing.rcode() == dns.rcode.NXDOMAIN  # the server's own answer
    for name in ("www.example.org", "api.partner.example.com"):
        refused = ask(lab, "shop/mediabot", name)
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer, name
    # The server saw the allowed questions only, over TCP from the node (the proxy's upstream).
    seen = lab.server_log()[log_before:]
    assert [(r["dns"], r["rcode"], r["transport"], r["client"].split(":")[0]) for r in seen] == [
        ("www.example.com", "NOERROR", "TCP", lab.node_ip), ("nothing-here.example.com", "NXDOMAIN", "TCP", lab.node_ip)]
    records = wait_for("the four records", lambda: len(lab.records()) - records_before >= 4 and
                       lab.records()[records_before:])
    assert [(r.dns.query, r.dns.rcode, r.verdict, r.l4.protocol) for r in records] == [
        ("www.example.com", 0, "forwarded", "TCP"), ("nothing-here.example.com", 3, "forwarded", "TCP"),
        ("www.example.org", 5, "denied", "TCP"), ("api.partner.example.com", 5, "denied", "TCP")]
    assert all(r.source.name == "shop/mediabot" and r.destination.name == KUBE_DNS
               and r.destination.port == 53 and r.direction == "egress" for r in records)
    assert records[0].policy.policies == ("CiliumNetworkPolicy shop/mediabot-dns",)
    assert records[0].dns.ips == ("203.0.113.20",)
    # The oracle judges each question over TCP as the lab did, and as it judges it over UDP.
    for name, outcome in (("www.example.com", "allowed"), ("nothing-here.example.com", "allowed"),
                          ("www.example.org", "refused"), ("api.partner.example.com", "refused")):
        assert lab.oracle("shop/mediabot", name) == outcome == lab.oracle("shop/mediabot", name, "UDP"), name


def test_scenario_probes_over_tcp_meet_the_oracle(lab: DnsTcpLab) -> None:
    """DNS probes with protocol TCP, sent as `l7lab run` sends them, and the HTTP request a TCP
    probe sends to port 53 (no DNS: closed unanswered)."""
    cases = [(DnsQuery("www.example.com"), "allowed"), (DnsQuery("www.example.org"), "refused"), (None, "dropped")]
    for query, want in cases:
        probe = make_probe(lab.lab.scenario, "shop/mediabot", "kube-dns:53", "TCP", dns=query, expect=want)
        observed = asyncio.run(lab.executor.observe(probe))
        assert observed.outcome == want == lab.executor.oracle(probe), (query, observed.detail)


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


def test_the_answers_addresses_are_learned_before_it_is_released(lab: DnsTcpLab) -> None:
    """Over TCP as over UDP: the lab's learner has allowed www.example.com's address for the
    toFQDNs selector before mediabot reads the answer, so its connection right after passes."""
    records_before = len(lab.records())
    reply = ask(lab, "shop/mediabot", "www.example.com")
    record = wait_for("the record", lambda: lab.records()[records_before:])[0]
    assert record.verdict == "forwarded" and record.l4.protocol == "TCP"
    # The selectors as the learner names them (dataplane/fqdn/learner.py), relayed verbatim.
    assert record.dns.learned == ("FQDN matchPattern *.example.com",), record.summary
    assert "learned before the answer was released, for FQDN matchPattern *.example.com" in record.summary
    assert addresses(reply) == ["203.0.113.20"]
    # To the world host by the lab's own name for it (an address, no lookup of its own).
    probe = make_probe(lab.lab.scenario, "shop/mediabot", "www:80", "TCP",
                       http=HttpRequest("GET", "/", {"Host": "www.example.com"}))
    assert probe.destination.ip == "203.0.113.20" and not probe.destination.dns_name
    assert asyncio.run(lab.executor.observe(probe)).outcome == "allowed"


def test_a_pod_without_dns_rules_reaches_the_server_directly(lab: DnsTcpLab) -> None:
    log_before, records_before = len(lab.server_log()), len(lab.records())
    reply = ask(lab, "shop/shell", "www.example.org")
    assert addresses(reply) == ["198.51.100.30"]
    seen = lab.server_log()[log_before:]
    assert [(r["dns"], r["transport"], r["client"].split(":")[0]) for r in seen] == [
        ("www.example.org", "TCP", lab.lab.scenario.pods["shop/shell"].ip)]  # not through the proxy
    assert len(lab.records()) == records_before


def test_what_is_not_dns_ends_the_connection_unanswered(lab: DnsTcpLab) -> None:
    log_before, records_before = len(lab.server_log()), len(lab.records())
    sock = lab.connect("shop/mediabot")
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: kube-dns\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536) == b""  # an end of stream, nothing answered
    finally:
        sock.close()
    record = wait_for("the record", lambda: lab.records()[records_before:])[0]
    assert record.verdict == "error" and record.l4.protocol == "TCP" and "connection closed" in record.summary
    assert len(lab.server_log()) == log_before
