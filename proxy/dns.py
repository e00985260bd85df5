"""The DNS side of the proxy: every redirected DNS query is checked against the DNS rules of the
policies that apply (`toPorts.rules.dns`: matchName / matchPattern), as Cilium's DNS proxy does.

The datapath assigns redirected UDP datagrams to this socket (UDP on the same port number as the
HTTP listener); IP_RECVORIGDSTADDR gives each datagram's original destination. Then:

  * not a DNS query (or a response): dropped (nothing to answer), recorded as an error;
  * not one standard question (several questions, another opcode): FORMERR, never forwarded;
  * no rule allows the name: answered REFUSED, as if by the server the client asked;
  * allowed: forwarded to the original destination from an upstream socket that carries the
    from-proxy mark, and the server's answer relayed back unchanged (silence if the server
    says nothing within UPSTREAM_TIMEOUT_S: the client's own timeout applies).

Answers leave from a transparent socket bound to the original destination, so the client sees
them come from the server it asked, and conntrack sees the reply of the client's own flow.
One L7 flow record per query (`proxy/events.py`), its DNS part the name, the question type and
the rcode sent (0 NOERROR, 3 NXDOMAIN, 5 REFUSED; -1 when nothing was sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

from dataplane.abi import PROTO_UDP, from_proxy_mark
from dataplane.flowrecord import Verdict
from l7.dns import DnsFlow

from .events import l7_flow, redirect_direction
from .marks import IP_TRANSPARENT, SO_MARK

if TYPE_CHECKING:
    from .context import ProxyContext
    from .state import ConnectionPolicy, RequestVerdict, Snapshot

IP_RECVORIGDSTADDR = 20  # socket.IP_RECVORIGDSTADDR (Linux); the cmsg type is IP_ORIGDSTADDR (same value)
UPSTREAM_TIMEOUT_S = 2.0
MAX_DATAGRAM = 65535
MAX_IN_FLIGHT = 256
# One source identity may hold a quarter of them: a pod flooding a server that never answers
# (each query then waits UPSTREAM_TIMEOUT_S) leaves room for every other pod's queries.
MAX_IN_FLIGHT_PER_IDENTITY = 64


class DnsProxy:
    """UDP listener of one proxy process; shares its snapshot, marks and event log (the
    `ProxyContext` it is given: the proxy server, or a stand-in in tests)."""

    def __init__(self, server: "ProxyContext") -> None:
        self.server = server
        self.sock: socket.socket | None = None
        self.port = 0
        self._tasks: set[asyncio.Task] = set()
        # Each query in flight may hold an upstream socket for UPSTREAM_TIMEOUT_S: a bound keeps a
        # flood from exhausting the descriptors the HTTP side needs too.
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._by_identity: Counter[int] = Counter()  # queries in flight per source identity

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.server.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            sock.bind((self.server.host, self.server.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock, self.port = sock, sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(sock, self._readable)

    async def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # a burst at a time; the loop calls back while more is queued
            try:
                data, ancdata, _flags, client = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket: not a query
                print(f"l7proxy: dns receive: {exc!r}", file=sys.stderr, flush=True)
                continue
            dst = self.server.original_dst or _original_dst(ancdata)
            if dst is None:
                continue  # cannot know where it was going: fail closed, drop
            task = asyncio.get_running_loop().create_task(self.handle(data, client[:2], dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def handle(self, data: bytes, client: tuple[str, int], dst: tuple[str, int]) -> None:
        t0 = time.monotonic()
        snap = self.server.snapshot
        cp = snap.connection(client[0], dst[0], dst[1], PROTO_UDP)
        if self._slots.locked():
            self.record(cp, client, dst, "", "", -1, "error", "too many queries in flight: dropped", t0)
            return
        identity = cp.src_identity
        if self._by_identity[identity] >= MAX_IN_FLIGHT_PER_IDENTITY:
            self.record(cp, client, dst, "", "", -1, "error",
                        f"too many queries in flight from identity {identity} "
                        f"(at most {MAX_IN_FLIGHT_PER_IDENTITY}): dropped", t0)
            return
        self._by_identity[identity] += 1
        try:
            async with self._slots:
                try:
                    await self._handle(snap, cp, data, client, dst, t0)
                except Exception as exc:  # noqa: BLE001 - fail closed: nothing forwarded, nothing answered
                    self.record(cp, client, dst, "", "", -1, "error", f"internal error: {exc!r}", t0)
        finally:
            self._by_identity[identity] -= 1
            if not self._by_identity[identity]:
                del self._by_identity[identity]

    async def _handle(self, snap: "Snapshot", cp: "ConnectionPolicy", data: bytes, client: tuple[str, int],
                      dst: tuple[str, int], t0: float) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            self.record(cp, client, dst, "", "", -1, "error", "not a DNS query: dropped", t0)
            return
        if query.flags & dns.flags.QR:
            self.record(cp, client, dst, "", "", -1, "error", "a DNS response, not a query: dropped", t0)
            return
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            # Only the one question that was checked may reach the server: anything else (more
            # questions, other opcodes) is answered FORMERR and never forwarded.
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.FORMERR)
            self.record(cp, client, dst, "", "", dns.rcode.FORMERR, "error",
                        "only standard queries with one question are forwarded", t0)
            self.answer(dst, client, reply.to_wire())
            return
        question = query.question[0]
        name = asked_name(question)
        qtype = dns.rdatatype.to_text(question.rdtype)
        verdict = snap.judge_dns(cp, name)
        if not verdict.allowed:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.REFUSED)
            self.record(cp, client, dst, qtype, name, dns.rcode.REFUSED, "denied", verdict.why, t0, verdict)
            self.answer(dst, client, reply.to_wire())
            return
        answer = await self.ask_upstream(cp, dst, data, query.id)
        if answer is None:
            self.record(cp, client, dst, qtype, name, -1, "error", "no answer from the server", t0, verdict)
            return
        try:
            parsed = dns.message.from_wire(answer)
        except dns.exception.DNSException:
            self.record(cp, client, dst, qtype, name, -1, "error", "the server's answer is not DNS: dropped", t0, verdict)
            return
        self.record(cp, client, dst, qtype, name, parsed.rcode(), "forwarded", verdict.why, t0, verdict,
                    upstream=parsed)
        self.answer(dst, client, answer)

    async def ask_upstream(self, cp: "ConnectionPolicy", dst: tuple[str, int], data: bytes,
                           query_id: int) -> bytes | None:
        """Send the query to the server it was meant for; its answer (same id), or None."""
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            if self.server.mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, from_proxy_mark(cp.src_identity))
            sock.connect(dst)
            await loop.sock_sendall(sock, data)
            deadline = time.monotonic() + UPSTREAM_TIMEOUT_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(sock, MAX_DATAGRAM), left)
                except (asyncio.TimeoutError, ConnectionRefusedError):
                    return None
                if len(reply) >= 2 and struct.unpack("!H", reply[:2])[0] == query_id:
                    return reply
            return None
        except OSError:
            return None
        finally:
            sock.close()

    def answer(self, src: tuple[str, int], client: tuple[str, int], data: bytes) -> None:
        """Send `data` to the client as if from `src`, the server it asked."""
        if not self.server.transparent:
            assert self.sock is not None
            with contextlib.suppress(OSError):
                self.sock.sendto(data, client)
            return
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            print(f"l7proxy: dns answer: {exc!r}", file=sys.stderr, flush=True)
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind(src)
            sock.sendto(data, client)
        except OSError as exc:
            print(f"l7proxy: dns answer to {client[0]}:{client[1]} as {src[0]}:{src[1]}: {exc!r}",
                  file=sys.stderr, flush=True)
        finally:
            sock.close()

    def record(self, cp: "ConnectionPolicy", client: tuple[str, int], dst: tuple[str, int], qtype: str, name: str,
               rcode: int, verdict: str, reason: str, t0: float, rv: "RequestVerdict | None" = None,
               upstream: dns.message.Message | None = None) -> None:
        answer = answer_record(upstream) if upstream is not None else {}
        elapsed_ns = round((time.monotonic() - t0) * 1e9)
        self.server.events.emit(l7_flow(
            self.server.snapshot, Verdict(verdict), client, dst, src_identity=cp.src_identity,
            dst_identity=cp.dst_identity, direction=redirect_direction(cp), summary=reason,
            latency_ms=round(elapsed_ns / 1e6, 3), latency_ns=elapsed_ns, rule_ids=rv.rule_ids if rv else (),
            policies=rv.policies if rv else (), dns=DnsFlow(name, (qtype,) if qtype else (), rcode, **answer)))


# A record keeps at most this many addresses, names and types of an answer (an answer may carry
# hundreds of records; the record of one question stays one small line).
RECORDED_ANSWERS = 32


def answer_record(message: dns.message.Message) -> dict:
    """The DnsFlow fields of an upstream answer relayed to the client: the addresses of its A and
    AAAA records, the smallest TTL of its answer records, the CNAME targets (lower case, no final
    dot) and the type of each answer record (bounded to RECORDED_ANSWERS each)."""
    ips: list[str] = []
    cnames: list[str] = []
    rrtypes: list[str] = []
    ttls: list[int] = []
    for rrset in message.answer:
        ttls.append(rrset.ttl)
        kind = dns.rdatatype.to_text(rrset.rdtype)
        for rdata in rrset:
            rrtypes.append(kind)
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                ips.append(rdata.address)
            elif rrset.rdtype == dns.rdatatype.CNAME:
                cnames.append(rdata.target.to_text(omit_final_dot=True).lower())
    return {"ips": tuple(ips[:RECORDED_ANSWERS]), "ttl": min(ttls, default=0),
            "cnames": tuple(cnames[:RECORDED_ANSWERS]), "rrtypes": tuple(rrtypes[:RECORDED_ANSWERS])}


def asked_name(question: dns.rrset.RRset) -> str:
    """The name a question asks, as it is judged and recorded: lower case, no final dot."""
    return question.name.to_text(omit_final_dot=True).lower()


def _original_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The sockaddr_in of IP_ORIGDSTADDR: family (2 bytes), port (network order), address."""
    for level, kind, value in ancdata:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(value) >= 8:
            port = struct.unpack("!H", value[2:4])[0]
            return socket.inet_ntoa(value[4:8]), port
    return None
