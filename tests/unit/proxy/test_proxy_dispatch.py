"""The proxy's handlers: one per L7 protocol of the `l7` registry, reached by dispatch on the
protocol of the rule sets that apply, and given the proxy process through `ProxyContext`."""

from __future__ import annotations

import asyncio

from l7.protocol import protocols
from proxy.dns import DnsProxy
from proxy.dnstcp import serve_dns_connection
from proxy.events import EventLog
from proxy.handlers import DATAGRAM_HANDLERS
from proxy.server import STREAM_HANDLERS, ClientConnection, ProxyServer
from proxy.state import Snapshot


def test_every_l7_protocol_has_a_handler_for_each_of_its_transports():
    """A protocol the oracle judges but no proxy handler serves would be judged in `explain`
    and never enforced: the registries must match, transport by transport."""
    by_transport = {"TCP": set(STREAM_HANDLERS), "UDP": set(DATAGRAM_HANDLERS)}
    for proto in protocols().values():
        for transport in proto.transports:
            assert proto.name in by_transport[transport], f"no proxy handler for {proto.name} on {transport}"
    assert by_transport == {t: {p.name for p in protocols().values() if t in p.transports} for t in by_transport}
    assert STREAM_HANDLERS["http"] is ClientConnection.run and DATAGRAM_HANDLERS["dns"] is DnsProxy
    assert STREAM_HANDLERS["dns"] is serve_dns_connection


def test_the_server_starts_and_stops_the_datagram_handlers_it_is_given():
    seen: list[tuple[str, object]] = []

    class Recorder:
        def __init__(self, context) -> None:
            self.context, self.port = context, 0
            seen.append(("made", context))

        async def start(self) -> None:
            seen.append(("start", self.context.snapshot))

        async def stop(self) -> None:
            seen.append(("stop", None))

    async def run() -> ProxyServer:
        server = ProxyServer(Snapshot.empty(), "127.0.0.1", 0, transparent=False, mark=False, events=EventLog(),
                             datagram_handlers={"dns": Recorder})
        await server.start()
        assert isinstance(server.datagram["dns"], Recorder)
        await server.stop()
        return server

    server = asyncio.run(run())
    assert seen == [("made", server), ("start", server.snapshot), ("stop", None)]


def _answer_to_a_request() -> bytes:
    """What a client gets for one request on a fresh connection (b"" if closed unanswered)."""
    async def run() -> bytes:
        server = ProxyServer(Snapshot.empty(), "127.0.0.1", 0, transparent=False, mark=False, events=EventLog(),
                             original_dst=("127.0.0.1", 9), datagram_handlers={})
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            try:
                return await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                return b""
            finally:
                writer.close()
        finally:
            await server.stop()

    return asyncio.run(run())


def test_a_connection_of_a_protocol_without_a_stream_handler_is_closed(monkeypatch):
    """Dispatch is on `ConnectionPolicy.protocol`: HTTP's handler answers (403: the empty
    snapshot allows nothing); with no handler for it, the connection is closed unanswered
    (fail closed) rather than served as something else."""
    assert _answer_to_a_request().startswith(b"HTTP/1.1 403 Forbidden")
    monkeypatch.setattr("proxy.server.STREAM_HANDLERS", {})
    assert _answer_to_a_request() == b""
