"""The probe engine: send real traffic from a pod and say what happened, in the words of a
scenario's expectations.

A probe's socket is opened inside the source pod's namespace, so the packets leave through the
pod's eth0 and cross the node exactly as the pod's own traffic does. A ping (ICMP echo) uses
an ICMP datagram socket (a "ping socket") where the namespace's net.ipv4.ping_group_range lets
the prober's group open one, else a raw ICMP socket; the echo request is built here (an 8-byte
header and a checksum, `dataplane.icmp`). An SCTP probe sends an INIT from a raw IP socket of
protocol 132 (no kernel SCTP stack needed, `dataplane.sctp`) and waits for the answer to it.
What was observed:

    allowed   the destination's own server answered (checked by the X-L7lab-Backend header /
              the endpoint field of its JSON), for HTTP with its response; for UDP its echo;
              for a DNS question (over UDP or TCP) any answer but REFUSED (NOERROR, NXDOMAIN)
              for ICMP (a ping) the echo reply from the destination's address
              for SCTP an INIT-ACK carrying the INIT's tag from the destination's port
    dropped   no connection (connect timed out), an HTTP request's connection closed without a byte
              of answer (the DNS proxy's answer to what is not DNS over TCP), or, for UDP, SCTP
              and ICMP, no answer before the timeout
    denied    HTTP 403 with body "Access denied" from the L7 proxy (or its 400/431 for a request
              it refuses to forward as written)
    refused   the destination said no: a DNS answer with rcode REFUSED, a TCP reset or an ICMP
              port unreachable (the policy let the flow through, but nothing listens there);
              for SCTP an ABORT (or an ICMP protocol unreachable, from a kernel without SCTP
              where no server listens)
    error     anything else: a connection cut mid-response, an unexpected answer, a TLS
              handshake that fails (the reason: a certificate that does not verify, ...)

A TCP probe to a world host's TLS port speaks HTTPS: the same request, after a TLS handshake
that sends the name the probe used (or the host's first DNS name) as SNI and verifies the
server's certificate against the lab's CA alone (dataplane/labca.py), as a pod's client that
trusts the lab's CA would.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import sctp, timescale, topology
from .icmp import echo_request, parse_echo_reply
from .scenario import Probe

ACCESS_DENIED_BODY = b"Access denied\r\n"
MAX_RESPONSE = 1 << 20


@dataclass
class Observation:
    outcome: str
    detail: str = ""
    status: int | None = None
    body: Any = None
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def build_request(probe: Probe) -> bytes:
    http = probe.http
    method, path = (http.method, http.path) if http else ("GET", "/")
    body = (http.body if http else "").encode()
    headers = {"Host": probe.host_header, "User-Agent": "l7lab-probe", "Connection": "close"}
    if http:
        headers.update(http.headers)
    if body or method in ("POST", "PUT", "PATCH"):
        headers.setdefault("Content-Length", str(len(body)))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ClosedUnanswered(Exception):
    """The connection was closed before any byte of a response came back."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ClosedUnanswered() from None
        raise
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(min(int(headers["content-length"]), MAX_RESPONSE))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        body = await reader.read(MAX_RESPONSE)
    return int(parts[1]), headers, body


def _bind(sock: socket.socket, source_port: int | None) -> None:
    """Bind the client to `source_port` (None or 0: any free port), so that a trace can name
    the flow before its first packet."""
    if source_port is not None and not 0 <= source_port <= 0xFFFF:
        raise ValueError(f"source port {source_port} is outside 0..65535")
    if source_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", source_port or 0))


async def probe_tcp(probe: Probe, src_netns: str, source_port: int | None = None) -> Observation:
    loop = asyncio.get_running_loop()
    sock = topology.socket_in(src_netns)
    try:
        _bind(sock, source_port)
    except BaseException:
        sock.close()
        raise
    sport = sock.getsockname()[1]  # lets the runner find this flow's kernel events
    started = time.monotonic()
    tls: ssl.SSLContext | None = None
    try:
        if probe.destination.tls_name:
            try:
                tls = lab_ca_context(src_netns)
            except (OSError, ValueError) as exc:
                return Observation("error", f"cannot verify {probe.destination} over TLS: {exc}", extra={"sport": sport})
        observed = await _tcp_exchange(probe, sock, loop, started, tls)
        observed.extra["sport"] = sport
        return observed
    finally:
        sock.close()


def lab_ca_context(netns: str) -> ssl.SSLContext:
    """A TLS client context that trusts only the CA of the lab `netns` belongs to: TLS 1.2 or
    later, ALPN http/1.1, the server's name checked. OSError when the lab has no CA."""
    from . import labca, safety  # noqa: PLC0415 - only TLS probes need them
    from .lab import lab_dir  # noqa: PLC0415

    lab = safety.lab_of_netns(netns)
    if lab is None:
        raise ValueError(f"{netns!r} is not a lab's namespace")
    context = ssl.create_default_context(cafile=str(labca.ca_cert_file(lab_dir(lab))))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def _tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in the words of OpenSSL (a certificate's verify message)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _tcp_exchange(probe: Probe, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                        started: float, tls: ssl.SSLContext | None = None) -> Observation:
    """Connect, send the probe's request (over TLS with `tls`) and judge the response."""
    dest = probe.destination
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (dest.ip, dest.port)), probe.timeout)
    except asyncio.TimeoutError:
        return Observation("dropped", f"no connection within {probe.timeout:g}s", elapsed=time.monotonic() - started)
    except ConnectionRefusedError:
        return Observation("refused", "connection refused: nothing listens on that port", elapsed=time.monotonic() - started)
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return Observation("dropped", f"unreachable: {exc.strerror}", elapsed=time.monotonic() - started)
        return Observation("error", f"connect failed: {exc.strerror}", elapsed=time.monotonic() - started)
    tls_info: dict[str, Any] = {}
    if tls is None:
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=tls, server_hostname=dest.tls_name), probe.timeout)
        except asyncio.TimeoutError:
            return Observation("dropped", "connected, but no TLS handshake before the timeout",
                               elapsed=time.monotonic() - started)
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError; a reset or a close mid-handshake too
            return Observation("error", f"TLS handshake with {dest.tls_name} failed: {_tls_failure(exc)}",
                               elapsed=time.monotonic() - started)
        session = writer.get_extra_info("ssl_object")
        tls_info = {"server_name": dest.tls_name, "version": session.version() if session else "",
                    "alpn": (session.selected_alpn_protocol() or "") if session else ""}
    if probe.dns is not None:
        return await _dns_tcp_exchange(probe, reader, writer, started)
    try:
        writer.write(build_request(probe))
        await writer.drain()
        try:
            status, headers, body = await asyncio.wait_for(_read_response(reader), probe.timeout * 2)
        except asyncio.TimeoutError:
            return Observation("dropped", "connected, but no response before the timeout", elapsed=time.monotonic() - started)
        except ClosedUnanswered:
            # Nothing came back: the L7 proxy's DNS side closes a connection that does not speak
            # DNS (fail closed), as it drops such a datagram.
            return Observation("dropped", "connected, but closed without a response", elapsed=time.monotonic() - started)
        except (asyncio.IncompleteReadError, ConnectionResetError, ssl.SSLError) as exc:
            return Observation("error", f"connection closed before a full response ({type(exc).__name__})",
                               elapsed=time.monotonic() - started)
        except ValueError as exc:
            return Observation("error", str(exc), elapsed=time.monotonic() - started)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    observed = classify_http(probe, status, headers, body, time.monotonic() - started)
    if tls_info:
        observed.extra["tls"] = tls_info
    return observed


def classify_http(probe: Probe, status: int, headers: dict[str, str], body: bytes, elapsed: float) -> Observation:
    if status == 403 and body == ACCESS_DENIED_BODY:
        return Observation("denied", "403 Access denied (L7 proxy)", status, body.decode(), elapsed)
    backend = headers.get("x-l7lab-backend")
    if status in (400, 431) and backend is None:
        # The proxy refuses a request it will not forward as written (ambiguous framing, a path
        # it will not normalize, an oversized head): an L7 denial too.
        return Observation("denied", f"{status} from the L7 proxy", status, body.decode("utf-8", "replace"), elapsed)
    try:
        payload: Any = json.loads(body) if body else None
    except ValueError:
        payload = body[:200].decode("utf-8", "replace")
    if backend is not None and _answered_by(probe, backend):
        return Observation("allowed", f"{status} from {backend}", status, payload, elapsed)
    return Observation("error", f"unexpected response {status} (backend {backend or 'unknown'})", status, payload, elapsed)


def _answered_by(probe: Probe, endpoint: str) -> bool:
    """Whether the server that answered (its pod key or world host name) is the one the probe
    was to reach: the destination, or for a service the backend the probe was pinned to (any
    backend of it when none was)."""
    dest = probe.destination
    if dest.kind == "service":
        return endpoint == dest.backend if dest.backend else endpoint.startswith(dest.name.split("/")[0] + "/")
    return endpoint == dest.name


async def probe_udp(probe: Probe, src_netns: str, source_port: int | None = None) -> Observation:
    loop = asyncio.get_running_loop()
    sock = topology.socket_in(src_netns, kind=socket.SOCK_DGRAM)
    dest = probe.destination
    nonce = os.urandom(6).hex()
    started = time.monotonic()
    try:
        _bind(sock, source_port)
        sock.connect((dest.ip, dest.port))
        sport = sock.getsockname()[1]
        observed = await _udp_exchange(probe, sock, loop, nonce, started)
        observed.extra["sport"] = sport
        return observed
    finally:
        sock.close()


async def _await_reply(sock: socket.socket, loop: asyncio.AbstractEventLoop, started: float, timeout: float,
                       judge: Callable[[bytes], Observation | None], silence: str) -> Observation:
    """Read datagrams until `judge` makes an Observation of one (None: not the answer, keep
    waiting); `dropped` after `timeout`, `refused` on an ICMP port unreachable."""
    deadline = started + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
        except asyncio.TimeoutError:
            break
        except ConnectionRefusedError:
            return Observation("refused", "ICMP port unreachable: nothing listens on that port",
                               elapsed=time.monotonic() - started)
        except OSError as exc:  # another ICMP error (host / network unreachable): no answer
            return Observation("dropped", f"no answer: {exc.strerror or exc}", elapsed=time.monotonic() - started)
        observed = judge(data)
        if observed is not None:
            observed.elapsed = time.monotonic() - started
            return observed
    return Observation("dropped", f"{silence} within {timeout:g}s", elapsed=time.monotonic() - started)


async def _dns_exchange(probe: Probe, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                        started: float) -> Observation:
    """One DNS question: REFUSED is `refused` (the DNS proxy's answer to a query no rule
    allows), any other answer of the server `allowed`, silence `dropped`."""
    import dns.exception  # noqa: PLC0415 - only DNS probes need it
    import dns.message  # noqa: PLC0415
    import dns.rcode  # noqa: PLC0415

    assert probe.dns is not None
    name = probe.dns.name
    query = dns.message.make_query(name, probe.dns.type)

    def judge(data: bytes) -> Observation | None:
        try:
            reply = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if reply.id != query.id:
            return None
        rcode = dns.rcode.to_text(reply.rcode())
        answers = [rd.to_text() for rrset in reply.answer for rd in rrset]
        body = {"rcode": rcode, "answers": answers}
        if reply.rcode() == dns.rcode.REFUSED:
            return Observation("refused", f"DNS {rcode} for {name}", body=body)
        return Observation("allowed", f"DNS {rcode} {' '.join(answers)}".strip(), body=body)

    await loop.sock_sendall(sock, query.to_wire())
    return await _await_reply(sock, loop, started, probe.timeout, judge, "no DNS answer")


async def _dns_tcp_exchange(probe: Probe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            started: float) -> Observation:
    """One DNS question over an open TCP connection (RFC 7766: a 2-byte length before each
    message), judged as over UDP; silence until the timeout is `dropped`, a connection closed
    before an answer `error` (a DNS proxy that refuses a query answers REFUSED, it does not close)."""
    import dns.exception  # noqa: PLC0415 - only DNS probes need it
    import dns.message  # noqa: PLC0415
    import dns.rcode  # noqa: PLC0415

    assert probe.dns is not None
    name = probe.dns.name
    query = dns.message.make_query(name, probe.dns.type)
    wire = query.to_wire()
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        deadline = started + probe.timeout * 2
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), left), "big")
            data = await asyncio.wait_for(reader.readexactly(length), max(deadline - time.monotonic(), 0.001))
            try:
                reply = dns.message.from_wire(data)
            except dns.exception.DNSException:
                return Observation("error", "not a DNS answer over TCP", elapsed=time.monotonic() - started)
            if reply.id == query.id:
                break
    except asyncio.TimeoutError:
        return Observation("dropped", "connected, but no DNS answer before the timeout", elapsed=time.monotonic() - started)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        return Observation("error", f"connection closed before a DNS answer ({type(exc).__name__})",
                           elapsed=time.monotonic() - started)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    rcode = dns.rcode.to_text(reply.rcode())
    answers = [rd.to_text() for rrset in reply.answer for rd in rrset]
    body = {"rcode": rcode, "answers": answers}
    elapsed = time.monotonic() - started
    if reply.rcode() == dns.rcode.REFUSED:
        return Observation("refused", f"DNS {rcode} for {name}", body=body, elapsed=elapsed)
    return Observation("allowed", f"DNS {rcode} {' '.join(answers)}".strip(), body=body, elapsed=elapsed)


async def _udp_exchange(probe: Probe, sock: socket.socket, loop: asyncio.AbstractEventLoop, nonce: str,
                        started: float) -> Observation:
    if probe.dns is not None:
        return await _dns_exchange(probe, sock, loop, started)

    def judge(data: bytes) -> Observation | None:
        try:
            reply = json.loads(data)
        except ValueError:
            return None
        if nonce not in reply.get("data", ""):
            return None
        if _answered_by(probe, str(reply.get("endpoint"))):
            return Observation("allowed", f"echo from {reply.get('endpoint')}", body=reply)
        return Observation("error", f"echo from unexpected endpoint {reply.get('endpoint')}", body=reply)

    await loop.sock_sendall(sock, f"l7lab-probe {nonce}".encode())
    return await _await_reply(sock, loop, started, probe.timeout, judge, "no answer")


def ping_socket_allowed(netns: str) -> bool:
    """Whether this process may open an ICMP datagram socket in `netns`: one of its groups is
    inside the namespace's net.ipv4.ping_group_range (the kernel's default, "1 0", allows none)."""
    try:
        low, high = (int(v) for v in topology.sysctl_read(netns, "net.ipv4.ping_group_range").split())
    except (OSError, ValueError):
        return False
    return any(low <= gid <= high for gid in {os.getegid(), *os.getgroups()})


def _icmp_socket(netns: str, echo_id: int | None) -> tuple[socket.socket, int, bool]:
    """(socket, echo id, is a ping socket): a ping socket bound to `echo_id` (0 or None: the
    kernel picks it, as it picks a port), else a raw socket with `echo_id` or a random id."""
    if echo_id is not None and not 0 <= echo_id <= 0xFFFF:
        raise ValueError(f"echo id {echo_id} is outside 0..65535")
    if ping_socket_allowed(netns):
        sock = topology.socket_in(netns, kind=socket.SOCK_DGRAM, proto=socket.IPPROTO_ICMP)
        try:
            sock.bind(("0.0.0.0", echo_id or 0))  # a ping socket's "port" is its echo id
            return sock, sock.getsockname()[1], True
        except BaseException:
            sock.close()
            raise
    sock = topology.socket_in(netns, kind=socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)
    return sock, echo_id or int.from_bytes(os.urandom(2), "big") or 1, False


async def probe_icmp(probe: Probe, src_netns: str, echo_id: int | None = None) -> Observation:
    """One ping: an echo request to the destination's address; `allowed` when its echo reply
    (same id, same payload) comes back from that address, `dropped` when none comes in time.
    The echo id used is in the observation's extra["echo_id"]."""
    loop = asyncio.get_running_loop()
    dest = probe.destination
    sock, ident, ping_socket = _icmp_socket(src_netns, echo_id)
    payload = f"l7lab-probe {os.urandom(6).hex()}".encode()
    sequence = int.from_bytes(os.urandom(2), "big")
    started = time.monotonic()

    def judge(data: bytes) -> Observation | None:
        if not ping_socket:
            # A raw socket sees every ICMP message to the namespace, with its IPv4 header.
            if len(data) < 20 or socket.inet_ntoa(data[12:16]) != dest.ip:
                return None
            data = data[(data[0] & 0x0F) * 4:]
        reply = parse_echo_reply(data)
        if reply is None or reply[0] != ident or reply[1] != sequence or reply[2] != payload:
            return None
        return Observation("allowed", f"echo reply from {dest.name}")

    try:
        await loop.sock_sendto(sock, echo_request(ident, sequence, payload), (dest.ip, 0))
        observed = await _await_reply(sock, loop, started, probe.timeout, judge, "no echo reply")
        observed.extra["echo_id"] = ident
        return observed
    finally:
        sock.close()


ICMP_DEST_UNREACH = 3
ICMP_REFUSALS = {2: "protocol unreachable", 3: "port unreachable"}  # codes that mean "nobody here"
SCTP_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range


def _icmp_error_for(datagram: bytes, dest_ip: str, sport: int, dport: int) -> int | None:
    """The code of an ICMP destination unreachable in `datagram` (as a raw ICMP socket reads it)
    that quotes our SCTP packet to dest_ip:dport from sport; None for anything else."""
    outer = sctp.strip_ipv4(datagram)
    if outer is None or len(outer[2]) < 8 or outer[2][0] != ICMP_DEST_UNREACH:
        return None
    icmp = outer[2]
    quoted = sctp.strip_ipv4(icmp[8:])
    if quoted is None or icmp[8 + 9] != socket.IPPROTO_SCTP or quoted[1] != dest_ip or len(quoted[2]) < 4:
        return None
    if (int.from_bytes(quoted[2][0:2], "big"), int.from_bytes(quoted[2][2:4], "big")) != (sport, dport):
        return None
    return icmp[1]


async def probe_sctp(probe: Probe, src_netns: str, source_port: int | None = None) -> Observation:
    """One SCTP association attempt: an INIT to the destination's port. `allowed` when the
    INIT-ACK carrying our initiate tag comes back from that port, `refused` on an ABORT for our
    INIT (or an ICMP protocol/port unreachable quoting it), `dropped` when nothing comes in time.
    The source port used is in the observation's extra["sport"]; the first answer decides (a
    kernel with SCTP and a lab server never both answer one INIT: see podserver)."""
    if source_port is not None and not 0 <= source_port <= 0xFFFF:
        raise ValueError(f"source port {source_port} is outside 0..65535")
    loop = asyncio.get_running_loop()
    dest = probe.destination
    sport = source_port or SCTP_EPHEMERAL[0] + int.from_bytes(os.urandom(2), "big") % (
        SCTP_EPHEMERAL[1] - SCTP_EPHEMERAL[0] + 1)
    tag = int.from_bytes(os.urandom(4), "big") or 1
    raw = topology.socket_in(src_netns, kind=socket.SOCK_RAW, proto=socket.IPPROTO_SCTP)
    try:
        errors = topology.socket_in(src_netns, kind=socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)
    except BaseException:
        raw.close()
        raise
    started = time.monotonic()
    answer: asyncio.Future[Observation] = loop.create_future()

    def on_sctp() -> None:
        while not answer.done():
            try:
                datagram = raw.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            stripped = sctp.strip_ipv4(datagram)
            packet = sctp.parse(stripped[2]) if stripped is not None and stripped[0] == dest.ip else None
            if packet is None or (packet.sport, packet.dport, packet.tag) != (dest.port, sport, tag):
                continue  # another flow's packet (a raw socket sees all SCTP to the namespace)
            if packet.chunk == sctp.INIT_ACK:
                answer.set_result(Observation("allowed", f"INIT-ACK from {dest.name}:{dest.port}"))
            elif packet.chunk == sctp.ABORT:
                answer.set_result(Observation("refused", "ABORT: nothing listens on that SCTP port"))

    def on_icmp() -> None:
        while not answer.done():
            try:
                datagram = errors.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            code = _icmp_error_for(datagram, dest.ip, sport, dest.port)
            if code in ICMP_REFUSALS:
                answer.set_result(Observation("refused", f"ICMP {ICMP_REFUSALS[code]}: nothing speaks SCTP there"))
            elif code is not None:
                answer.set_result(Observation("dropped", f"ICMP destination unreachable (code {code})"))

    loop.add_reader(raw.fileno(), on_sctp)
    loop.add_reader(errors.fileno(), on_icmp)
    try:
        await loop.sock_sendto(raw, sctp.init(sport, dest.port, tag, int.from_bytes(os.urandom(4), "big")),
                               (dest.ip, 0))
        try:
            observed = await asyncio.wait_for(answer, probe.timeout)
        except asyncio.TimeoutError:
            observed = Observation("dropped", f"no answer to the SCTP INIT within {probe.timeout:g}s")
        observed.elapsed = time.monotonic() - started
        observed.extra["sport"] = sport
        return observed
    finally:
        loop.remove_reader(raw.fileno())
        loop.remove_reader(errors.fileno())
        raw.close()
        errors.close()


async def run_probe(probe: Probe, src_netns: str, source_port: int | None = None) -> Observation:
    """Send `probe` from namespace `src_netns`, from `source_port` if given (else any free
    port); the port used is in the observation's extra["sport"]. A ping's `source_port` is
    its echo id (extra["echo_id"]). The probe's timeout is an ordinary machine's seconds, scaled
    to this one (dataplane/timescale.py): on a slow machine an answer that comes late must not
    pass for a drop."""
    probe = replace(probe, timeout=timescale.scaled(probe.timeout))
    if probe.icmp is not None:
        return await probe_icmp(probe, src_netns, source_port)
    if probe.protocol == "UDP":
        return await probe_udp(probe, src_netns, source_port)
    if probe.protocol == "SCTP":
        return await probe_sctp(probe, src_netns, source_port)
    return await probe_tcp(probe, src_netns, source_port)
