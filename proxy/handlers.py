"""Which handler serves which L7 protocol of the `l7` registry.

A connection or datagram is dispatched on the protocol of the L7 rule sets that apply to it
(`proxy.state.ConnectionPolicy.protocol`, from `l7.decide.protocol_for`). Stream protocols (TCP)
are served per accepted connection by `proxy.server`; datagram protocols (UDP) own a socket on
the proxy port and are listed here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .context import DatagramHandler, ProxyContext
from .dns import DnsProxy

DATAGRAM_HANDLERS: Mapping[str, Callable[[ProxyContext], DatagramHandler]] = {"dns": DnsProxy}
