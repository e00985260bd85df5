"""What a protocol handler of the proxy gets from the proxy process, and what it must offer.

The proxy process owns the policy snapshot, the event log and the listening address; the HTTP
side (`proxy.server`) and each datagram protocol's side (`proxy.dns`) use them through this
contract, so no handler imports another and none imports the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .events import EventLog
    from .state import Snapshot


class ProxyContext(Protocol):
    """The proxy process as its handlers see it (`proxy.server.ProxyServer` is one)."""

    snapshot: "Snapshot"  # replaced whole on reload: read it once per request
    events: "EventLog"
    host: str
    port: int  # the proxy port: every protocol is received on it, one socket per transport
    transparent: bool  # IP_TRANSPARENT listeners (off in tests without a datapath)
    mark: bool  # mark upstream traffic as from-proxy
    original_dst: tuple[str, int] | None  # tests: the original destination of everything


class DatagramHandler(Protocol):
    """The side of one L7 protocol the proxy receives as datagrams (DNS on UDP)."""

    port: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
