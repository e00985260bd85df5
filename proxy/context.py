"""What a protocol handler of the proxy gets from the proxy process, and what it must offer.

The proxy process owns the policy snapshot, the event log, the limits, the listening address
and the client of the FQDN learner; the HTTP side (`proxy.server`) and each other protocol's
sides (`proxy.dns` on UDP, `proxy.dnstcp` on TCP) use them through this contract, so no handler
imports another protocol's and none imports the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .events import EventLog
    from .fqdn import FqdnLearner
    from .limits import Limits
    from .state import ConnectionPolicy, Snapshot
    from .stream import BufferedStream


class ProxyContext(Protocol):
    """The proxy process as its handlers see it (`proxy.server.ProxyServer` is one)."""

    snapshot: "Snapshot"  # replaced whole on reload: read it once per request
    events: "EventLog"
    host: str
    port: int  # the proxy port: every protocol is received on it, one socket per transport
    transparent: bool  # IP_TRANSPARENT listeners (off in tests without a datapath)
    mark: bool  # mark upstream traffic as from-proxy
    original_dst: tuple[str, int] | None  # tests: the original destination of everything
    limits: "Limits"  # timeouts of client connections (idle, a message's arrival, progress)
    learner: "FqdnLearner | None"  # where DNS answers' addresses are learned; None: no learning


class StreamConnection(Protocol):
    """One accepted TCP connection as a stream protocol's handler gets it (`proxy.server`'s
    `ClientConnection`): admitted under the connection caps, closed by the server afterwards."""

    server: ProxyContext
    client: "BufferedStream"
    peer: tuple[str, int]  # the client
    dst: tuple[str, int]  # the original destination

    def policy(self, snap: "Snapshot") -> "ConnectionPolicy": ...


class DatagramHandler(Protocol):
    """The side of one L7 protocol the proxy receives as datagrams (DNS on UDP)."""

    port: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
