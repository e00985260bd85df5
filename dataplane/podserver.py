"""The servers every pod and world host runs: HTTP on its TCP ports, a UDP echo on its UDP ports,
an SCTP responder on its SCTP ports, the cluster DNS on port 53 (UDP and TCP).

Started by the lab inside the endpoint's namespace (`ip netns exec`, so the endpoint's own
/etc/netns files apply). HTTP answers any method and path with JSON describing what it received,
so a probe can check that the backend itself answered and what exactly reached it (or, when the
request asks for it with X-L7lab-Response-Bytes, a large streamed body; a WebSocket handshake
is accepted, greeted with one JSON text message naming the endpoint, and every message echoed);
each request is also
appended to a JSON-lines log (the record of what a backend really received), rotated to
`requests.jsonl.1` past L7LAB_LOG_ROTATE_BYTES (see `dataplane/logfiles.py`). UDP
datagrams are answered with JSON of what arrived. Port 53, UDP and TCP, is the cluster DNS
instead (`dataplane/clusterdns.py`): it answers from the zone file the lab wrote (`--zone`,
read before confining), and logs each question as a line of the request log
(`"dns": NAME, "type", "rcode", "client", "transport"`). An SCTP INIT to a declared SCTP port is answered with an
INIT-ACK and logged (`"sctp": "INIT"`); an INIT to another port gets an ABORT, as an SCTP stack
answers it (see `_SctpResponder` for how this works with and without the kernel's SCTP).
A world host's TLS ports (--tls) serve the same HTTP answers over HTTPS: TLS 1.2 or later,
ALPN http/1.1, with the certificate the lab's CA issued it (dataplane/labca.py).

It binds addresses only, never resolves a name (a reverse lookup at start would stall for
seconds in a namespace with no DNS), and prints READY once every port is listening.

In a lab it starts as root and confines itself (`dataplane/confine.py`, with --uid, --gid and
--hide) once everything it needs is loaded and its log directory is open: an unprivileged uid,
the lab's control directory hidden. Loading first means the server's code and Python need not
be readable by that uid. Its request log lives in a directory of its own
(`<lab dir>/<endpoint namespace>/requests.jsonl`, see `logfiles.request_log`), owned by that
uid so that it can rotate the log there through the directory it holds open. Its TLS key and
certificate, under the lab's directory too, are loaded before confining for the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import signal
import socket
import ssl
import sys
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import WSMsgType, web

from . import sctp
from .logfiles import REQUEST_LOG, RotatingLog, bound_stderr

if TYPE_CHECKING:
    from . import clusterdns

# A request carrying this header gets that many bytes of a fixed pattern instead of the JSON
# echo (still logged like any request); with RESPONSE_CHUNKED_HEADER: yes, framed chunked.
RESPONSE_BYTES_HEADER = "X-L7lab-Response-Bytes"
RESPONSE_CHUNKED_HEADER = "X-L7lab-Response-Chunked"
MAX_RESPONSE_BYTES = 1 << 30
PATTERN_PIECE = bytes(range(256)) * 1024  # 256 KiB; every piece of a large response is a prefix of it


def _http_app(identity: dict[str, str], log: RotatingLog | None) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        record = {
            **identity,
            "method": request.method,
            "path": request.raw_path,
            "query": request.query_string,
            "http_version": f"{request.version.major}.{request.version.minor}",
            "headers": {k: v for k, v in request.headers.items()},
            "body_length": len(body),
            "client": f"{peer[0]}:{peer[1]}" if peer else "",
            "server_port": sock[1] if sock else 0,
        }
        if log is not None:
            log.write_line(json.dumps(record))
        size = request.headers.get(RESPONSE_BYTES_HEADER)
        if size is not None:
            return await _stream_bytes(request, identity, size)
        websocket = web.WebSocketResponse()
        if websocket.can_prepare(request).ok:
            return await _websocket_echo(request, websocket, identity)
        return web.json_response(record, headers={"X-L7lab-Backend": identity["endpoint"]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _websocket_echo(request: web.Request, websocket: web.WebSocketResponse,
                          identity: dict[str, str]) -> web.WebSocketResponse:
    """A WebSocket session: a greeting naming the endpoint (so a client knows the backend itself
    answered), then every text or binary message echoed until the client closes."""
    websocket.headers["X-L7lab-Backend"] = identity["endpoint"]
    await websocket.prepare(request)
    await websocket.send_str(json.dumps({"endpoint": identity["endpoint"], "websocket": "hello"}))
    async for message in websocket:
        if message.type == WSMsgType.TEXT:
            await websocket.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await websocket.send_bytes(message.data)
    return websocket


async def _stream_bytes(request: web.Request, identity: dict[str, str], size_text: str) -> web.StreamResponse:
    """A large response on demand: `size` bytes of a fixed pattern, sent in pieces as they are
    produced (Content-Length framing, or chunked when asked), with the body's SHA-256 in a header
    so a client can prove that every byte arrived unchanged."""
    try:
        size = int(size_text)
        if not 0 <= size <= MAX_RESPONSE_BYTES:
            raise ValueError
    except ValueError:
        return web.json_response({"error": f"{RESPONSE_BYTES_HEADER} must be an integer 0..{MAX_RESPONSE_BYTES}"},
                                 status=400, headers={"X-L7lab-Backend": identity["endpoint"]})
    chunked = request.headers.get(RESPONSE_CHUNKED_HEADER, "").lower() in ("1", "yes", "true")
    digest = await asyncio.get_running_loop().run_in_executor(None, pattern_sha256, size)  # ~1 s for 1 GiB
    response = web.StreamResponse(headers={"X-L7lab-Backend": identity["endpoint"],
                                           "X-L7lab-Body-Sha256": digest,
                                           "Content-Type": "application/octet-stream"})
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    sent = 0
    while sent < size:
        piece = PATTERN_PIECE[:min(len(PATTERN_PIECE), size - sent)]
        await response.write(piece)  # waits while the reader is slow: the body is never held whole
        sent += len(piece)
    await response.write_eof()
    return response


@functools.lru_cache(maxsize=64)
def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    whole, rest = divmod(size, len(PATTERN_PIECE))
    for _ in range(whole):
        digest.update(PATTERN_PIECE)
    digest.update(PATTERN_PIECE[:rest])
    return digest.hexdigest()


DNS_PORT = 53  # UDP and TCP: the cluster DNS (dataplane/clusterdns.py), answered from the zone file


def _dns_log(identity: dict[str, str], log: RotatingLog | None) -> Callable[[dict[str, Any]], None] | None:
    """Each DNS question as one line of the request log: endpoint, dns (the name), type, rcode,
    client, transport."""
    if log is None:
        return None
    return lambda entry: log.write_line(json.dumps({**identity, **entry}))


def load_zone(path: str | None) -> "clusterdns.Zone":
    """The zone the lab wrote (read before confining: the lab's directory is hidden then), or
    an empty one: a server started without a zone knows no name."""
    from . import clusterdns  # noqa: PLC0415 - only DNS ports need dnspython

    clusterdns.warm_up()
    return clusterdns.Zone.load(path) if path else clusterdns.Zone()


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, identity: dict[str, str]) -> None:
        self.identity = identity
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = {**self.identity, "client": f"{addr[0]}:{addr[1]}", "bytes": len(data),
                 "data": data[:512].decode("utf-8", "replace")}
        assert self.transport is not None
        self.transport.sendto(json.dumps(reply).encode(), addr)


def kernel_has_sctp() -> bool:
    """Whether the running kernel has an SCTP stack (built in or its module loaded). Read from
    /sys, never by opening an SCTP socket: that would make a distribution kernel load the module."""
    return os.path.isdir("/sys/module/sctp")


class _SctpResponder:
    """SCTP on the endpoint's declared SCTP ports, from a raw IP socket of protocol 132 (opened
    before the server gives up root: see `main`).

    Without the kernel's SCTP stack nothing else answers SCTP, so this answers every INIT: an
    INIT-ACK (our own tag, a State Cookie, the INIT's initiate tag as verification tag) on a
    declared port, an ABORT on any other. With the kernel's stack loaded, the kernel answers
    every INIT itself (an ABORT where no SCTP socket listens), so the server listens on the
    declared ports with kernel SCTP sockets and this only logs: a raw socket receives a copy of
    every SCTP packet either way. Each INIT is logged like an HTTP request."""

    def __init__(self, raw: socket.socket, ports: list[int], identity: dict[str, str],
                 log: RotatingLog | None, answer: bool) -> None:
        self.raw, self.ports, self.identity, self.log, self.answer = raw, set(ports), identity, log, answer

    def readable(self) -> None:
        while True:
            try:
                datagram = self.raw.recv(65535)
            except OSError:  # nothing more to read now (EAGAIN), or the socket is gone
                return
            self.handle(datagram)

    def handle(self, datagram: bytes) -> None:
        stripped = sctp.strip_ipv4(datagram)
        if stripped is None:
            return
        source, destination, payload = stripped
        packet = sctp.parse(payload)
        if packet is None or packet.chunk != sctp.INIT or packet.tag != 0 or not packet.initiate_tag:
            return  # only an INIT starts anything; the rest is not ours to answer (RFC 9260 8.4)
        declared = packet.dport in self.ports
        if self.answer:
            if declared:
                reply = sctp.init_ack(packet, int.from_bytes(os.urandom(4), "big") or 1,
                                      int.from_bytes(os.urandom(4), "big"), b"l7lab " + self.identity["endpoint"].encode())
            else:
                reply = sctp.abort_for(packet)
            try:
                self.raw.sendto(reply, (source, 0))
            except OSError:
                pass  # an unreachable peer: as a lost answer
        if self.log is not None:
            self.log.write_line(json.dumps({**self.identity, "sctp": "INIT", "client": f"{source}:{packet.sport}",
                                            "server": destination, "server_port": packet.dport,
                                            "answer": "INIT_ACK" if declared else "ABORT"}))


def open_sctp_raw(ports: list[int]) -> socket.socket | None:
    """The raw SCTP socket of an endpoint with SCTP ports (it needs root: opened before confining)."""
    if not ports:
        return None
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_SCTP)
    raw.setblocking(False)
    return raw


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server side of a TLS port: TLS 1.2 or later, ALPN http/1.1 (the only protocol the
    server speaks), the host's certificate and key. Loaded while still root: once confined the
    server can no longer read the lab's directory, where the key lives (0600)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert, key)
    return context


def open_log(path: str | None, log_dir: str | None) -> RotatingLog | None:
    """The request log: REQUEST_LOG in a directory (held open: it may be hidden later), or a
    path, or none."""
    if log_dir is not None:
        dir_fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return RotatingLog(REQUEST_LOG, dir_fd=dir_fd)
    return RotatingLog(path) if path else None


async def serve(endpoint: str, tcp_ports: list[int], udp_ports: list[int], log: RotatingLog | None,
                sctp_ports: list[int] | None = None, sctp_raw: socket.socket | None = None,
                tls_ports: list[int] | None = None, tls: ssl.SSLContext | None = None,
                zone: "clusterdns.Zone | None" = None) -> None:
    """Serve until SIGTERM/SIGINT. `tls_ports` (a subset of `tcp_ports`) speak HTTPS with `tls`;
    port 53 answers from the cluster DNS's `zone`."""
    identity = {"endpoint": endpoint}
    if DNS_PORT in tcp_ports + udp_ports:
        from . import clusterdns  # noqa: PLC0415 - only DNS ports need dnspython

        if zone is None:
            zone = load_zone(None)
    loop = asyncio.get_running_loop()
    kernel_sctp: list[socket.socket] = []
    if sctp_raw is not None:
        stack = kernel_has_sctp()
        for port in sctp_ports or []:
            if stack:  # the kernel answers INITs: it needs a listening socket on each declared port
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("0.0.0.0", port))
                listener.listen(16)
                kernel_sctp.append(listener)
        responder = _SctpResponder(sctp_raw, sctp_ports or [], identity, log, answer=not stack)
        loop.add_reader(sctp_raw.fileno(), responder.readable)
    runner = web.AppRunner(_http_app(identity, log), access_log=None, handle_signals=False)
    await runner.setup()
    dns_servers = []
    for port in tcp_ports:
        # An explicit socket: SO_REUSEADDR, and no name resolution of any kind.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        if port == DNS_PORT:  # TCP 53 is the cluster DNS (RFC 7766), every other TCP port HTTP
            assert zone is not None
            dns_servers.append(await clusterdns.serve_tcp(zone, sock=sock, log=_dns_log(identity, log)))
        else:
            context = tls if port in (tls_ports or []) else None
            await web.SockSite(runner, sock, shutdown_timeout=0.1, ssl_context=context).start()
    for port in udp_ports:
        if port == DNS_PORT:  # UDP 53 is the cluster DNS, every other UDP port an echo
            assert zone is not None
            await clusterdns.serve_udp(zone, "0.0.0.0", port, _dns_log(identity, log))
        else:
            await loop.create_datagram_endpoint(lambda: _UdpEcho(identity), local_addr=("0.0.0.0", port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    if sctp_raw is not None:
        loop.remove_reader(sctp_raw.fileno())
        sctp_raw.close()
    for listener in kernel_sctp:
        listener.close()
    for server in dns_servers:
        server.close()
    await runner.cleanup()
    if log:
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l7lab-podserver", description=__doc__)
    parser.add_argument("--lab", required=True, help="lab name (ownership marker)")
    parser.add_argument("--endpoint", required=True, help="pod key namespace/name or world host name")
    parser.add_argument("--tcp", default="", help="comma-separated TCP ports (HTTP)")
    parser.add_argument("--udp", default="", help="comma-separated UDP ports (echo)")
    parser.add_argument("--sctp", default="", help="comma-separated SCTP ports (INIT answered by INIT-ACK)")
    parser.add_argument("--tls", default="", help="comma-separated TCP ports (among --tcp) that serve HTTPS")
    parser.add_argument("--cert", default=None, help="the TLS ports' certificate (PEM)")
    parser.add_argument("--key", default=None, help="the TLS ports' private key (PEM)")
    parser.add_argument("--zone", default=None, metavar="FILE",
                        help="the cluster DNS's zone (JSON, dataplane/clusterdns.py), answered on port 53")
    parser.add_argument("--log", default=None, help="JSON-lines file of received HTTP requests")
    parser.add_argument("--log-dir", default=None, metavar="DIR",
                        help=f"write {REQUEST_LOG} (rotated) in DIR, instead of --log")
    parser.add_argument("--uid", type=int, default=None, help="confine: run as this uid (started as root)")
    parser.add_argument("--gid", type=int, default=None, help="confine: and this gid (default: the uid)")
    parser.add_argument("--hide", action="append", default=[], metavar="DIR",
                        help="confine: directory to hide from the server (repeatable)")
    args = parser.parse_args(argv)
    tcp = [int(p) for p in args.tcp.split(",") if p]
    udp = [int(p) for p in args.udp.split(",") if p]
    sctp_ports = [int(p) for p in args.sctp.split(",") if p]
    tls_ports = [int(p) for p in args.tls.split(",") if p]
    if tls_ports and (args.cert is None or args.key is None or not set(tls_ports) <= set(tcp)):
        parser.error("--tls needs --cert and --key, and its ports among --tcp")
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
        uvloop.install()
    except ImportError:
        pass
    bound_stderr()  # hostile requests make aiohttp log an error each: keep that log bounded
    try:
        # Read before confining: the zone file lives in the lab's directory, hidden from the server then.
        zone = load_zone(args.zone) if DNS_PORT in tcp + udp else None
        log = open_log(args.log, args.log_dir)
        sctp_raw = open_sctp_raw(sctp_ports)  # a raw socket needs CAP_NET_RAW: before confining
        tls = tls_context(args.cert, args.key) if tls_ports else None  # the key is root's: before confining
        if args.uid is not None:
            from .confine import confine  # noqa: PLC0415

            confine(args.uid, args.gid if args.gid is not None else args.uid, args.hide)
        asyncio.run(serve(args.endpoint, tcp, udp, log, sctp_ports, sctp_raw, tls_ports, tls, zone))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; ValueError: clusterdns.ZoneError
        print(f"podserver {args.endpoint}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
