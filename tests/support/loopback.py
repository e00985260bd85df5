"""The proxy's loopback harness (no root): a recording backend, an event loop in a thread, and
the policy state of a three-pod topology moved onto 127.0.0.x addresses.

* `Backend`: an asyncio HTTP server on 127.0.0.x that records the exact raw bytes of every
  connection and the requests it parsed (with llhttp, i.e. a lenient real-world parser: what a
  smuggled request would look like to a real backend). Paths: /big/N answers N bytes
  (Content-Length), /chunked/N answers N bytes chunked, /close/N close-delimited, /upload answers
  the size and sha256 of the request body, an upgrade request is answered 101 (switching to the first protocol offered) and then
  every byte is echoed upper-cased; anything else 200
  "ok METHOD URL".
* `LoopThread`: one event loop in a thread hosting backend and proxy, so tests use plain sockets.
* `tests.support.http.Client`: the raw client the tests talk to the proxy with.
* `engine()` and `remap()`: the oracle for real CiliumNetworkPolicy YAML (`POLICY`, which the
  attack corpus is written against) and its MapState with every pod moved to 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import textwrap
import threading
from dataclasses import dataclass, field

import httptools

from dataplane.mapstate import MapState
from dataplane.timescale import scaled
from tests.support.policy import scenario

RAW_CAP = 2 * 1024 * 1024  # raw bytes kept per backend connection (large uploads are only counted)


@dataclass
class Seen:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body_len: int = 0
    sha: str = ""


@dataclass
class BackendConn:
    raw: bytearray = field(default_factory=bytearray)
    total: int = 0
    requests: list[Seen] = field(default_factory=list)


class Backend:
    def __init__(self, host: str = "127.0.0.3") -> None:
        self.host = host
        self.port = 0
        self.conns: list[BackendConn] = []
        self._server: asyncio.base_events.Server | None = None

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.conns)

    @property
    def requests(self) -> list[Seen]:
        return [r for c in self.conns for r in c.requests]

    def clear(self) -> None:
        self.conns.clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()

    async def restart(self) -> None:
        """Listen again on the same address and port (after `stop`)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = BackendConn()
        self.conns.append(rec)
        out: list[tuple[Seen, bool]] = []
        cur: dict = {}

        class P:
            def on_message_begin(self):
                cur.clear()
                cur.update(url=b"", headers=[], n=0, h=hashlib.sha256())

            def on_url(self, u):
                cur["url"] += u

            def on_header(self, n, v):
                cur["headers"].append((n.decode("latin-1"), v.decode("latin-1")))

            def on_body(self, b):
                cur["n"] += len(b)
                cur["h"].update(b)

            def on_message_complete(self):
                seen = Seen(parser.get_method().decode(), cur["url"].decode("latin-1"), cur["headers"], cur["n"],
                            cur["h"].hexdigest())
                rec.requests.append(seen)
                out.append((seen, parser.should_keep_alive()))

        parser = httptools.HttpRequestParser(P())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                rec.total += len(data)
                if len(rec.raw) < RAW_CAP:
                    rec.raw += data[:RAW_CAP - len(rec.raw)]
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    out.clear()  # the upgrade request itself is already in rec.requests
                    if parser.get_method() == b"CONNECT":
                        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    else:
                        # Switch to the first protocol offered (the echo below speaks any of them).
                        offered = next((v for n, v in rec.requests[-1].headers if n.lower() == "upgrade"), "echo")
                        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %b\r\n\r\n"
                                     % offered.split(",")[0].strip().encode("latin-1"))
                    while True:  # echo mode
                        data = await reader.read(65536)
                        if not data:
                            break
                        rec.raw += data
                        writer.write(data.upper())
                    break
                except httptools.HttpParserError:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    break
                while out:
                    seen, keep = out.pop(0)
                    if not await self._answer(seen, writer):
                        return
                    if not keep:
                        await writer.drain()
                        writer.close()
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        parts = seen.url.split("?")[0].split("/")
        kind = parts[1] if len(parts) > 1 else ""
        n = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        if kind == "big":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            await _stream(writer, n, lambda piece: piece)
        elif kind == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await _stream(writer, n, lambda piece: b"%x\r\n%b\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
        elif kind == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            await _stream(writer, n, lambda piece: piece)
            await writer.drain()
            writer.close()
            return False
        elif kind == "upload":
            body = f"{seen.body_len} {seen.sha}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        else:
            body = f"ok {seen.method} {seen.url}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body if seen.method != "HEAD" else b""))
        return True


async def _stream(writer: asyncio.StreamWriter, n: int, frame) -> None:
    piece = b"x" * 65536
    while n:
        k = min(n, len(piece))
        writer.write(frame(piece[:k]))
        n -= k
        await writer.drain()


class LoopThread:
    """An event loop running in a daemon thread; `run(coro)` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(scaled(timeout))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --------------------------------------------------------------------------- policy state

TOPOLOGY = """\
name: proxytest
namespaces:
  - {name: shop, labels: {team: shop}}
pods:
  - {name: frontend, namespace: shop, labels: {app: frontend}, ports: [{port: PORT}]}
  - {name: backend, namespace: shop, labels: {app: backend}, ports: [{port: PORT}]}
  - {name: stranger, namespace: shop, labels: {app: stranger}, ports: [{port: PORT}]}
"""

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-l7, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            http:
              - {method: "GET|HEAD", path: "/public(/.*)?"}
              - {method: GET, path: "/search\\\\?q=[a-z]+"}
              - {method: "POST|PUT", path: "/upload"}
              - {method: GET, path: "/(big|chunked|close)/[0-9]+"}
              - {method: GET, path: "/upgrade"}
              - {method: CONNECT}
              - {method: GET, path: "/host", host: "backend:8080"}
              - {method: GET, path: "/token", headers: ["X-Token: s3cret"]}
              - {method: GET, path: "/flag", headerMatches: [{name: X-Flag}]}
"""

# Pod name -> loopback address used in tests.
ADDRESSES = {"shop/frontend": "127.0.0.2", "shop/backend": "127.0.0.3", "shop/stranger": "127.0.0.4"}


def engine(port: int, policy: str = POLICY):
    from dataplane.policy import PolicyEngine  # noqa: PLC0415
    return PolicyEngine(scenario(TOPOLOGY.replace("PORT", str(port)),
                                 textwrap.dedent(policy).replace("PORT", str(port)) if policy else ""))


def remap(state: MapState, engine) -> MapState:
    """The same state with every pod moved to its 127.0.0.x address (ipcache and endpoints)."""
    moved = MapState.from_json(state.to_json())
    for key, pod in engine.scenario.pods.items():
        ident = moved.ipcache.pop(f"{pod.ip}/32")
        moved.ipcache[f"{ADDRESSES[key]}/32"] = ident
    for eid, ep in list(moved.endpoints.items()):
        moved.endpoints[eid] = dataclasses.replace(ep, ip=ADDRESSES[ep.name])
    return moved
