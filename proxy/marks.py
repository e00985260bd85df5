"""skb->mark values the proxy uses, in one place (the layout is bpf/lib/common.h's).

    bits  8..11  (0x00000f00)  magic
        0x200  TO_PROXY    set by from_container with bpf_sk_assign (not used by the proxy)
        0xa00  FROM_PROXY  set by the proxy with SO_MARK on its upstream sockets
    FROM_PROXY: bits 16..31 carry identity bits 0..15 and bits 0..7 carry identity bits 16..23
    (Cilium's identity-in-mark encoding): 24 identity bits fit; the datapath only needs the
    magic to recognise the proxy, the identity is for events and debugging.

to_container recognises the FROM_PROXY magic and lets the packet pass without a second policy
check: the proxy already decided.
"""

from __future__ import annotations

MARK_MAGIC_MASK = 0x00000F00
MARK_MAGIC_TO_PROXY = 0x00000200
MARK_MAGIC_FROM_PROXY = 0x00000A00

SO_MARK = 36  # socket.SO_MARK (Linux); spelled out because older Pythons lack the constant
IP_TRANSPARENT = 19  # socket.IP_TRANSPARENT (Linux)


def from_proxy_mark(identity: int) -> int:
    """SO_MARK value for an upstream socket carrying traffic of source `identity`."""
    return MARK_MAGIC_FROM_PROXY | ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF)


def identity_of_mark(mark: int) -> int | None:
    """Inverse of `from_proxy_mark` (None if the mark is not a from-proxy mark)."""
    if mark & MARK_MAGIC_MASK != MARK_MAGIC_FROM_PROXY:
        return None
    return ((mark >> 16) & 0xFFFF) | ((mark & 0xFF) << 16)
