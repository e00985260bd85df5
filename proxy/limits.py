"""Limits a pod cannot exhaust: timeouts, connection caps and the progress measure they rely on.

Every client connection of the proxy costs two descriptors (client and upstream), buffers and an
asyncio task. Without limits one pod could hold them all: connections that never send a head or
trickle one in (slowloris), keep-alive connections left open, a peer that stops reading or
sending in the middle of a body, or simply thousands of connections. The settings here bound
each of those (defaults follow Envoy's recommendations for an edge proxy where it has one):

  * idle timeout: a connection with no request in flight and no byte of the next head is
    closed quietly (Envoy's `idle_timeout`);
  * header timeout: once the first byte of a head has arrived, the whole head must follow in
    this time, else 408 and close (Envoy's `request_headers_timeout`, 10 s at the edge);
  * progress timeout: while a request is in flight (body up, response down, tunnel), some byte
    must move on the client or upstream socket in this time, else the exchange ends (Envoy's
    `stream_idle_timeout`, 300 s). A slow transfer that keeps moving is never cut;
  * connection caps: at most `max_connections` client connections at once, and at most
    `max_connections_per_identity` from one source security identity; a connection beyond a
    cap is answered 503 and closed at once, so other identities keep being served;
  * learn timeout: the longest a DNS answer with addresses waits for the lab's FQDN learner
    before it is released anyway (`proxy.fqdn`).

Progress is what the kernel saw, not what the proxy's code did: the sum of the bytes the peer
acknowledged and the bytes received from it (TCP_INFO) on both sockets of a connection. A peer
that stops reading stops acknowledging (its window closes); one that stops sending stops
delivering; either way the sum stops moving, whichever part of the proxy waits on it.
"""

from __future__ import annotations

import math
import socket
import struct
from collections import Counter
from dataclasses import dataclass, fields, replace

from .fqdn import LEARN_TIMEOUT_S

IDLE_TIMEOUT_S = 60.0  # Cilium's proxy idle timeout; short enough that forgotten connections free their slot
HEADER_TIMEOUT_S = 10.0  # Envoy's request_headers_timeout in its edge configuration
PROGRESS_TIMEOUT_S = 300.0  # Envoy's stream_idle_timeout default
# A connection holds two descriptors and, at worst, about 1.3 MiB of buffers per direction (see
# docs/proxy.md "Limits"): with 512, one stalled direction on every connection costs near
# 660 MiB, one identity's share (a quarter) near 170 MiB. The lab's probes use at most 96 at once.
MAX_CONNECTIONS = 512
MAX_CONNECTIONS_PER_IDENTITY = 128

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked (since 4.1) and tcpi_bytes_received (since 4.6),
# two u64 after 120 bytes of older fields; the layout only ever grows at its end.
_TCP_INFO_LEN = 136
_BYTES_ACKED_AT = 120


@dataclass(frozen=True)
class Limits:
    """The proxy's resource limits (one set per process; `python -m proxy` flags set them)."""

    idle_timeout: float = IDLE_TIMEOUT_S
    header_timeout: float = HEADER_TIMEOUT_S
    progress_timeout: float = PROGRESS_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_identity: int = MAX_CONNECTIONS_PER_IDENTITY
    learn_timeout: float = LEARN_TIMEOUT_S

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{flag_name(f.name)} must be a finite number greater than 0, not {value!r}")

    @classmethod
    def parse(cls, spec: str, base: "Limits | None" = None) -> "Limits":
        """`name=value,...` with the flag names (`idle-timeout=5,max-connections=100`) over `base`."""
        kinds = {flag_name(f.name): (f.name, f.type) for f in fields(cls)}
        changes: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, text = item.partition("=")
            if not sep or name.strip() not in kinds:
                raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
            attr, kind = kinds[name.strip()]
            try:
                changes[attr] = int(text) if kind in (int, "int") else float(text)
            except ValueError:
                raise ValueError(f"{name.strip()}: expected {'an integer' if kind in (int, 'int') else 'a number'}"
                                 f" of {'connections' if kind in (int, 'int') else 'seconds'}, not {text.strip()!r}")
        return replace(base or cls(), **changes)


def flag_name(attr: str) -> str:
    return attr.replace("_", "-")


class ConnectionCaps:
    """Counts the admitted client connections, in all and per source identity."""

    def __init__(self) -> None:
        self.total = 0
        self.by_identity: Counter[int] = Counter()

    def admit(self, identity: int, limits: Limits) -> str:
        """Count a new connection in, or return why it is refused (nothing counted then)."""
        if self.total >= limits.max_connections:
            return (f"connection limit: the proxy already has {self.total} connections open "
                    f"(max-connections {limits.max_connections})")
        held = self.by_identity[identity]
        if held >= limits.max_connections_per_identity:
            return (f"connection limit: identity {identity} already has {held} connections open "
                    f"(max-connections-per-identity {limits.max_connections_per_identity})")
        self.total += 1
        self.by_identity[identity] += 1
        return ""

    def release(self, identity: int) -> None:
        self.total -= 1
        self.by_identity[identity] -= 1
        if self.by_identity[identity] <= 0:
            del self.by_identity[identity]


def tcp_progress(sock: object) -> int:
    """Bytes the peer acknowledged plus bytes received from it so far; 0 if unknown (a closed
    socket, or not TCP). Any change between two readings is progress."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)  # type: ignore[attr-defined]
    except (OSError, AttributeError, ValueError):
        return 0
    if len(info) < _TCP_INFO_LEN:
        return 0
    acked, received = struct.unpack_from("=QQ", info, _BYTES_ACKED_AT)
    return acked + received
