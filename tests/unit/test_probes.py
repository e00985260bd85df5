"""The probe engine's judgement of what came back, without a kernel."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import dns.message
import dns.rcode
import dns.rrset

from dataplane.errors import SourceLocation
from dataplane.probes import Observation, _tcp_exchange, build_request, classify_http
from dataplane.scenario import Destination, DnsQuery, HttpRequest, Probe


def probe(http: HttpRequest | None = None) -> Probe:
    return Probe("shop/web", Destination("pod", "shop/api", "10.200.0.3", 8080), "TCP", "allowed", http, 1.0,
                 SourceLocation("s.yaml", 3))


def test_request_carries_method_path_headers_and_body() -> None:
    raw = build_request(probe(HttpRequest("POST", "/pay?x=1", {"X-Secret": "s3"}, '{"a": 1}')))
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /pay?x=1 HTTP/1.1"
    assert "Host: api:8080" in lines and "X-Secret: s3" in lines and "Content-Length: 8" in lines
    assert body == b'{"a": 1}'


def test_default_request_is_get_root() -> None:
    assert build_request(probe()).startswith(b"GET / HTTP/1.1\r\n")


def test_backend_answer_is_allowed_only_from_the_destination() -> None:
    body = json.dumps({"endpoint": "shop/api", "path": "/"}).encode()
    seen = classify_http(probe(), 200, {"x-l7lab-backend": "shop/api"}, body, 0.01)
    assert seen.outcome == "allowed" and seen.body["path"] == "/"
    other = classify_http(probe(), 200, {"x-l7lab-backend": "shop/web"}, body, 0.01)
    assert other.outcome == "error" and "shop/web" in other.detail


def test_proxy_403_is_denied_but_a_backend_403_is_not() -> None:
    assert classify_http(probe(), 403, {}, b"Access denied\r\n", 0.0).outcome == "denied"
    assert classify_http(probe(), 403, {"x-l7lab-backend": "shop/api"}, b"{}", 0.0).outcome == "allowed"
    assert classify_http(probe(), 403, {}, b"Forbidden", 0.0).outcome == "error"


# --------------------------------------------------------------------------- DNS over TCP


def _dns_tcp_probe(port: int, name: str) -> Probe:
    return Probe("shop/web", Destination("pod", "kube-system/kube-dns", "127.0.0.1", port), "TCP", "allowed", None,
                 5.0, SourceLocation("s.yaml", 3), dns=DnsQuery(name))


def _ask_over_tcp(name: str, answer: Callable[[dns.message.Message], bytes | None]) -> Observation:
    """A DNS probe over TCP to a loopback server that reads one framed query and writes back
    what `answer` makes of it (None: closes the connection without a word)."""
    async def run() -> Observation:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = answer(dns.message.from_wire(await reader.readexactly(length)))
            if reply is not None:
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            return await _tcp_exchange(_dns_tcp_probe(port, name), sock, asyncio.get_running_loop(), time.monotonic())
        finally:
            sock.close()
            server.close()

    return asyncio.run(run())


def _reply(query: dns.message.Message, rcode: int, *records: str) -> bytes:
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    for text in records:
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 30, "IN", "A", text))
    return reply.to_wire()


def test_a_dns_probe_over_tcp_frames_its_question_and_judges_the_answer() -> None:
    asked: list[str] = []

    def answer(query: dns.message.Message) -> bytes:
        asked.append(query.question[0].name.to_text())
        return _reply(query, dns.rcode.NOERROR, "203.0.113.20")

    seen = _ask_over_tcp("www.example.com", answer)
    assert asked == ["www.example.com."]
    assert (seen.outcome, seen.body) == ("allowed", {"rcode": "NOERROR", "answers": ["203.0.113.20"]})
    assert _ask_over_tcp("nothing.example.com", lambda q: _reply(q, dns.rcode.NXDOMAIN)).outcome == "allowed"
    refused = _ask_over_tcp("www.example.org", lambda q: _reply(q, dns.rcode.REFUSED))
    assert refused.outcome == "refused" and refused.detail == "DNS REFUSED for www.example.org"


def test_a_dns_probe_over_tcp_closed_without_an_answer_is_an_error() -> None:
    """A DNS server (or the DNS proxy) answers every query; a close before the answer is no
    outcome a policy gives."""
    closed = _ask_over_tcp("www.example.com", lambda q: None)
    assert closed.outcome == "error" and "before a DNS answer" in closed.detail
    # An answer to another question (another id) is not the answer.
    other = _ask_over_tcp("www.example.com", lambda q: _reply(dns.message.make_query("x.example", "A"), 0))
    assert other.outcome == "error"


def test_an_http_request_closed_without_a_byte_of_answer_is_dropped() -> None:
    """The DNS proxy closes a TCP connection that does not speak DNS (an HTTP request to port 53
    under a DNS rule) unanswered: `dropped`, as the datagram it drops over UDP."""
    async def run() -> Observation:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(2)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        probe = Probe("shop/web", Destination("pod", "kube-system/kube-dns", "127.0.0.1",
                                              server.sockets[0].getsockname()[1]), "TCP", "dropped", None, 5.0,
                      SourceLocation("s.yaml", 3))
        try:
            return await _tcp_exchange(probe, sock, asyncio.get_running_loop(), time.monotonic())
        finally:
            sock.close()
            server.close()

    seen = asyncio.run(run())
    assert (seen.outcome, seen.detail) == ("dropped", "connected, but closed without a response")
