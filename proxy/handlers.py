"""Which handler serves which L7 protocol of the `l7` registry.

A connection or datagram is dispatched on the protocol of the L7 rule sets that apply to it
(`proxy.state.ConnectionPolicy.protocol`, from `l7.decide.protocol_for`). Stream protocols (TCP)
are served per accepted connection by `proxy.server`: HTTP by its own `ClientConnection`, the
others listed in STREAM_HANDLERS here (DNS over TCP). Datagram protocols (UDP) own a socket on
the proxy port and are listed in DATAGRAM_HANDLERS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from .context import DatagramHandler, ProxyContext, StreamConnection
from .dns import DnsProxy
from .dnstcp import serve_dns_connection

DATAGRAM_HANDLERS: Mapping[str, Callable[[ProxyContext], DatagramHandler]] = {"dns": DnsProxy}
STREAM_HANDLERS: Mapping[str, Callable[[StreamConnection], Awaitable[None]]] = {"dns": serve_dns_connection}
