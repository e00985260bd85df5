"""The Linux socket options the proxy sets its marks with.

The mark values themselves (the from-proxy magic and the identity encoding, `from_proxy_mark`)
are part of the datapath's ABI: declared once in dataplane/abi.py, laid out in
dataplane/bpf/lib/common.h, and explained in docs/proxy.md ("Marks").
"""

from __future__ import annotations

SO_MARK = 36  # socket.SO_MARK (Linux); spelled out because older Pythons lack the constant
IP_TRANSPARENT = 19  # socket.IP_TRANSPARENT (Linux)
