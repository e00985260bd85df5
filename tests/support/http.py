"""Raw HTTP on plain sockets, for the proxy's tests on loopback and on a lab's real traffic alike.

* `Client`: a raw TCP client with an independent, strict response reader (it stops exactly at
  the message boundary, so what follows is the next response or nothing); it can read like a
  slow reader, wait for the peer to close, and take whatever is left until the close.
  `tests.support.l7_lab.PodClient` is the same client with its socket in a pod's namespace.
* `WebSocketClient`: wsproto on top of a `Client`.
* `request_bytes`, `pattern_bytes`, `h2_after_upgrade`: what the clients send; `Pieces`: those
  bytes as a stream reader that hands them out split exactly as given.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
from wsproto import ConnectionType, WSConnection
from wsproto.events import Event, Message, Request

from dataplane.timescale import scaled
from tests.support.wait import DEADLINE


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """A raw TCP client bound to a chosen 127.0.0.x source (its pod identity)."""

    _pace: tuple[float, int] | None = None  # while reading like a slow reader: (pause, bytes per read)

    def __init__(self, proxy_port: int, source: str = "127.0.0.2") -> None:
        self.sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=scaled(30), source_address=(source, 0))
        self.buf = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_tolerant(self, data: bytes) -> None:
        """sendall, tolerating the peer closing first (it may refuse a head before reading it all)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def request(self, method: str = "GET", path: str = "/", headers: dict | None = None, body: bytes = b"",
                host: str = "backend") -> Resp:
        hs = {"Host": host, **(headers or {})}
        if body:
            hs["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
        self.send(head.encode() + body)
        return self.read_response(head_only=method == "HEAD")

    def _fill(self) -> None:
        if self._pace is not None:  # a slow reader: small reads with a pause before each
            pause, size = self._pace
            time.sleep(pause)
            data = self.sock.recv(size)
        else:
            data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("connection closed")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int, sink: Callable[[bytes], object]) -> None:
        while n:
            if not self.buf:
                self._fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            sink(piece)

    def read_response(self, head_only: bool = False, sink: Callable[[bytes], object] | None = None,
                      pace: tuple[float, int] | None = None) -> Resp:
        """One response (a plain, independent parser: stops exactly at the message boundary).
        With `sink`, body pieces go to sink(piece) instead of being kept. With `pace`
        (pause in seconds, bytes per read), read like a slow reader; the caller usually also
        shrinks SO_RCVBUF so the slowness reaches the sender."""
        self._pace = pace
        try:
            return self._read_response(head_only, sink)
        finally:
            self._pace = None

    def _read_response(self, head_only: bool, sink: Callable[[bytes], object] | None) -> Resp:
        status_line = self._line()
        status = int(status_line.split(b" ")[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body: list[bytes] = []
        out = sink or body.append
        if head_only or status in (101, 204, 304) or 100 <= status < 200:
            pass
        elif headers.get("transfer-encoding", "").endswith("chunked"):
            while size := int(self._line().split(b";")[0], 16):
                self._take(size, out)
                assert self._line() == b""
            while self._line():
                pass
        elif "content-length" in headers:
            self._take(int(headers["content-length"]), out)
        else:  # close-delimited
            while True:
                try:
                    self._fill()
                except ConnectionError:
                    break
            out(self.buf)
            self.buf = b""
        return Resp(status, headers, b"".join(body))

    def closed(self) -> bool:
        """True if the peer closed the connection (EOF) with nothing more to read."""
        self.sock.settimeout(scaled(5))
        try:
            return self.sock.recv(1) == b"" and not self.buf
        except ConnectionResetError:
            return True

    def closed_by_peer(self, timeout: float = DEADLINE) -> bool:
        """Wait (bounded) for the peer to end the connection: EOF or reset, after whatever was
        still unread (which is thrown away). False if it is still open after `timeout` (scaled to
        this machine)."""
        self.sock.settimeout(scaled(timeout))
        try:
            while self.sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        except (TimeoutError, socket.timeout):
            return False
        return True

    def rest_until_closed(self, timeout: float | None = None) -> bytes:
        """What is buffered plus everything the peer sends until it closes (EOF or reset)."""
        if timeout is not None:
            self.sock.settimeout(scaled(timeout))
        data, self.buf = self.buf, b""
        while True:
            try:
                piece = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
        return data

    def count_until_closed(self, timeout: float = DEADLINE) -> int:
        """How many bytes arrive until the peer closes (EOF or reset), without keeping them."""
        self.sock.settimeout(scaled(timeout))
        received = 0
        try:
            while data := self.sock.recv(1 << 20):
                received += len(data)
        except ConnectionResetError:
            pass
        return received

    def close(self) -> None:
        self.sock.close()


class WebSocketClient:
    """A WebSocket client (wsproto) over a raw `Client`'s socket."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    def __enter__(self) -> "WebSocketClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.close()

    def handshake(self, path: str, extra: bytes = b"") -> None:
        """Send the upgrade request for `path` (and `extra` bytes in the same write)."""
        self.c.send(self.ws.send(Request(host="backend", target=path)) + extra)

    def next_event(self) -> Event:
        while not self.events:
            data = self.c.sock.recv(65536)
            assert data, "the connection was closed"
            self.ws.receive_data(data)
            self.events += list(self.ws.events())
        return self.events.pop(0)

    def send_text(self, text: str) -> None:
        self.c.send(self.ws.send(Message(data=text)))


class Pieces:
    """A stream reader that hands out exactly the given pieces, one per read (a
    peer's writes, as the proxy's stream reader sees them)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [p for p in pieces if p]

    async def read(self, n: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
        return piece[:n]


def request_bytes(method: str, path: str, *, host: str = "backend", headers: dict[str, str] | None = None,
                  body: bytes = b"") -> bytes:
    hs = {"Host": host, **(headers or {})}
    if (body or method in ("POST", "PUT")) and "Transfer-Encoding" not in hs:
        hs.setdefault("Content-Length", str(len(body)))
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n").encode() + body


def pattern_bytes(n: int, seed: int = 7) -> bytes:
    return bytes((i * seed + (i >> 8)) & 0xFF for i in range(n))


def h2_after_upgrade(method: str, path: str) -> tuple[bytes, bytes]:
    """(HTTP2-Settings value, the HTTP/2 bytes a client sends once the server has switched):
    the connection preface and a real HEADERS frame for `method path` on stream 3."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()  # also queues the preface
    conn.send_headers(3, [(":method", method), (":path", path), (":authority", "backend"), (":scheme", "http")],
                      end_stream=True)
    return settings, conn.data_to_send()
