"""skb->mark values the proxy sets, and the socket options it sets them with.

The mark layout is the datapath's (bpf/lib/common.h) and is declared once, for Python, in
dataplane/abi.py (`from_proxy_mark`, `identity_of_mark`, with the proxy's listening port,
PROXY_PORT); this module holds the Linux socket options the proxy sets them with:

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

SO_MARK = 36  # socket.SO_MARK (Linux); spelled out because older Pythons lack the constant
IP_TRANSPARENT = 19  # socket.IP_TRANSPARENT (Linux)
