"""DNS policy on real traffic: queries to kube-dns are redirected in the kernel to the proxy's
DNS side, which answers REFUSED to names no rule allows (the server never sees them) and relays
the server's own answer for the rest; one L7 record per query; a datagram that is not DNS is
dropped; with the proxy gone, queries fail closed.

Scenario: scenarios/dns-policy.yaml (mediabot may ask kube-dns only about *.example.com).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from dataplane import topology
from dataplane.flowrecord import Flow
from dataplane.lab import Lab, lab_dir, lab_prefix
from dataplane.logfiles import read_all, request_log
from dataplane.policy import PolicyEngine
from dataplane.abi import DropReason, FlowVerdict
from dataplane.scenario import load_scenario
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab

pytestmark = pytest.mark.kernel

SCENARIO = REPO / "scenarios" / "dns-policy.yaml"


@pytest.fixture(scope="module")
def lab(datapath) -> Iterator[Lab]:  # noqa: ANN001 - session fixture
    scenario = load_scenario(SCENARIO).with_name(unique_lab("dns"))
    with Lab(scenario, datapath=datapath, policy=PolicyEngine(scenario)) as lab:
        yield lab


def ask(lab: Lab, pod: str, name: str, timeout: float | None = None,
        payload: bytes | None = None) -> dns.message.Message | None:
    """A DNS question from `pod` to kube-dns:53 on a connected UDP socket (so only an answer
    from kube-dns's own address is accepted); None if nothing comes back in time. An answer is
    awaited patiently (5 s, scaled to this machine) unless the caller expects none (`timeout`)."""
    timeout = timeout if timeout is not None else scaled(5.0)
    sock = topology.socket_in(lab.record.endpoints[pod].netns, kind=socket.SOCK_DGRAM)
    sock.setblocking(True)
    sock.settimeout(timeout)
    query = dns.message.make_query(name, "A")
    try:
        sock.connect((lab.record.endpoints["kube-system/kube-dns"].ip, 53))
        sock.send(payload if payload is not None else query.to_wire())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = dns.message.from_wire(sock.recv(65535))
            if reply.id == query.id:
                return reply
        return None
    except (TimeoutError, socket.timeout):
        return None
    finally:
        sock.close()


def server_log(lab: Lab) -> list[dict[str, Any]]:
    ns = lab.record.endpoints["kube-system/kube-dns"].netns.removeprefix(lab_prefix(lab.name))
    return read_all(request_log(lab_dir(lab.name), ns))


def proxy_records(lab: Lab) -> list[Flow]:
    path = lab.proxy_events_file
    return [Flow.from_json(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def test_allowed_names_are_answered_by_the_server_and_others_refused_by_the_proxy(lab: Lab) -> None:
    log_before, records_before = len(server_log(lab)), len(proxy_records(lab))
    www = ask(lab, "shop/mediabot", "www.example.com")
    assert www is not None and www.rcode() == dns.rcode.NOERROR
    assert [rd.to_text() for rrset in www.answer for rd in rrset] == ["203.0.113.20"]
    missing = ask(lab, "shop/mediabot", "nothing-here.example.com")
    assert missing is not None and missing.rcode() == dns.rcode.NXDOMAIN  # the server's own answer
    for name in ("www.example.org", "api.partner.example.com", "example.com"):
        refused = ask(lab, "shop/mediabot", name)
        assert refused is not None and refused.rcode() == dns.rcode.REFUSED and not refused.answer, name
    # The server saw exactly the allowed questions, asked by the proxy from the node's address.
    seen = server_log(lab)[log_before:]
    assert [(r["dns"], r["rcode"]) for r in seen] == [("www.example.com", "NOERROR"), ("nothing-here.example.com", "NXDOMAIN")]
    assert {r["client"].split(":")[0] for r in seen} == {lab.scenario.node_ip}
    # One L7 record per query, in order, attributed to the policy.
    records = proxy_records(lab)[records_before:]
    assert [(r.dns.query, r.l7.protocol, r.dns.rcode, r.verdict) for r in records] == [
        ("www.example.com", "DNS", 0, "forwarded"), ("nothing-here.example.com", "DNS", 3, "forwarded"),
        ("www.example.org", "DNS", 5, "denied"), ("api.partner.example.com", "DNS", 5, "denied"),
        ("example.com", "DNS", 5, "denied")]
    assert all(r.source.name == "shop/mediabot" and r.destination.name == "kube-system/kube-dns"
               and r.destination.port == 53 and r.l4.protocol == "UDP" and r.dns.qtypes == ("A",)
               and r.direction == "egress" for r in records)
    assert records[0].policy.policies == ("CiliumNetworkPolicy shop/mediabot-dns",)
    assert records[2].policy.policies == ("CiliumNetworkPolicy shop/mediabot-dns",)  # the policy whose rules it failed
    # The record keeps the answer it relayed (Hubble's dns.ips / ttl / rrtypes); a refusal has none.
    www_answer = next(rrset for rrset in www.answer)
    assert (records[0].dns.ips, records[0].dns.ttl, records[0].dns.rrtypes) == (("203.0.113.20",), www_answer.ttl, ("A",))
    assert (records[2].dns.ips, records[2].dns.rrtypes) == ((), ())


def test_a_pod_without_dns_rules_asks_the_server_directly(lab: Lab) -> None:
    records_before = len(proxy_records(lab))
    reply = ask(lab, "shop/shell", "www.example.org")
    assert reply is not None and [rd.to_text() for rrset in reply.answer for rd in rrset] == ["198.51.100.30"]
    assert server_log(lab)[-1]["client"].split(":")[0] == lab.scenario.pods["shop/shell"].ip  # not through the proxy
    assert len(proxy_records(lab)) == records_before


def test_what_is_not_dns_is_dropped_and_never_reaches_the_server(lab: Lab) -> None:
    log_before = len(server_log(lab))
    assert ask(lab, "shop/mediabot", "ignored", timeout=1.0, payload=b"GET / HTTP/1.1\r\n\r\n") is None
    assert ask(lab, "shop/mediabot", "ignored", timeout=1.0, payload=b"\x00") is None
    # A response (QR set) is not a question: dropped, whatever name it carries.
    response = dns.message.make_response(dns.message.make_query("www.example.org", "A"))
    assert ask(lab, "shop/mediabot", "ignored", timeout=1.0, payload=response.to_wire()) is None
    assert len(server_log(lab)) == log_before
    assert ask(lab, "shop/mediabot", "www.example.com") is not None  # the proxy still answers


def test_only_the_question_that_was_checked_reaches_the_server(lab: Lab) -> None:
    """An allowed question with a second, denied one smuggled beside it: FORMERR from the proxy,
    nothing forwarded."""
    query = dns.message.make_query("www.example.com", "A")
    query.question.append(dns.rrset.RRset(dns.name.from_text("www.example.org"), dns.rdataclass.IN, dns.rdatatype.A))
    log_before = len(server_log(lab))
    sock = topology.socket_in(lab.record.endpoints["shop/mediabot"].netns, kind=socket.SOCK_DGRAM)
    try:
        sock.setblocking(True)
        sock.settimeout(scaled(5))
        sock.connect((lab.record.endpoints["kube-system/kube-dns"].ip, 53))
        sock.send(query.to_wire())
        reply = dns.message.from_wire(sock.recv(65535), question_only=True)
    finally:
        sock.close()
    assert reply.id == query.id and reply.rcode() == dns.rcode.FORMERR and not reply.answer
    assert len(server_log(lab)) == log_before


def test_without_the_proxy_queries_fail_closed_and_resume_after_restart(lab: Lab) -> None:
    log_before = len(server_log(lab))
    lab.stop_proxy()
    try:
        lab.datapath.poll_events()
        assert ask(lab, "shop/mediabot", "www.example.com", timeout=1.0) is None
        assert ask(lab, "shop/mediabot", "www.example.org", timeout=1.0) is None  # no bypass, no answer
        assert len(server_log(lab)) == log_before
        dns_ip = lab.record.endpoints["kube-system/kube-dns"].ip
        drops = [e for e in lab.datapath.poll_events(timeout_ms=200) if e.dst == dns_ip and e.dport == 53]
        assert len(drops) == 2 and {(e.verdict, e.reason) for e in drops} == \
            {(FlowVerdict.DROP, DropReason.PROXY_SOCKET_MISSING)}
    finally:
        lab.start_proxy()
    refused = ask(lab, "shop/mediabot", "www.example.org")
    assert refused is not None and refused.rcode() == dns.rcode.REFUSED
    allowed = ask(lab, "shop/mediabot", "www.example.com")
    assert allowed is not None and allowed.rcode() == dns.rcode.NOERROR
