"""The ABI between the Python side of l7lab and the BPF datapath (dataplane/bpf/lib/*.h), declared once.

Responsibility: every number and every struct layout that both the C programs and Python know
about lives here, and nowhere else in Python: reserved identities, policy directions and
verdicts, flow verdicts, drop reasons and hooks, skb->mark magics, endpoint and conntrack flags,
the policy LPM fixed prefix, protocol numbers, the proxy port, the map sizes and lifetimes the
loader passes to the compiler, and the key/value layout of every map plus the flow event.
Every other module imports them from here.

How the two sides stay in step (the model is Cilium's pkg/datapath/alignchecker):

* Tunables (map sizes, lifetimes, pages of the ring buffer) are parameters of the C code: the
  loader passes them as `-D` cflags built by `c_defines()`, and the headers refuse to compile
  without them, so their value is written only here.
* Constants the C code defines itself (`#define`, `enum`) are listed in `C_CONSTANTS` as
  "C expression -> value"; structs are `ctypes` Structures declared with the offset of each
  field next to it (`c_struct` checks those offsets when this module is imported).
* abicheck.py compares these declarations with the C side: tests/kernel/test_abi_compiled.py
  with what the compiler makes of the headers (every constant, and every field's name, C type
  including byte order, offset and size) and with the loaded datapath's maps;
  tests/unit/test_abi_headers.py with the headers as text, so that a constant or struct added
  on the C side alone is noticed too.

Pure Python: no bcc, nothing from the rest of l7lab, so that every layer may import it.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

# -- identities (Cilium pkg/identity/numericidentity.go) ----------------------------------------
IDENTITY_ANY = 0  # in a policy key: any remote identity
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_UNMANAGED = 3
IDENTITY_HEALTH = 4
IDENTITY_INIT = 5
IDENTITY_REMOTE_NODE = 6
IDENTITY_KUBE_APISERVER = 7
IDENTITY_INGRESS = 8
IDENTITY_WORLD_IPV4 = 9
IDENTITY_FIRST_LABEL_BASED = 256
IDENTITY_FIRST_CIDR = 1 << 24

RESERVED_IDENTITIES: dict[str, int] = {
    "host": IDENTITY_HOST,
    "world": IDENTITY_WORLD,
    "unmanaged": IDENTITY_UNMANAGED,
    "health": IDENTITY_HEALTH,
    "init": IDENTITY_INIT,
    "remote-node": IDENTITY_REMOTE_NODE,
    "kube-apiserver": IDENTITY_KUBE_APISERVER,
    "ingress": IDENTITY_INGRESS,
}

# -- protocols (IPPROTO_* of linux/in.h; 0 in a policy key means any protocol) ------------------
PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_SCTP = 132
PROTOCOLS: dict[str, int] = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ICMP": PROTO_ICMP}
PROTOCOL_NAMES: dict[int, str] = {number: name for name, number in PROTOCOLS.items()}

# TCP flag bits of the flow event's tcp_flags (the raw flags byte of the TCP header; TCPF_* in parse.h)
TCPF_FIN = 0x01
TCPF_SYN = 0x02
TCPF_RST = 0x04
TCPF_PSH = 0x08
TCPF_ACK = 0x10
TCP_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (TCPF_SYN, "SYN"), (TCPF_ACK, "ACK"), (TCPF_FIN, "FIN"), (TCPF_RST, "RST"), (TCPF_PSH, "PSH"))

PROXY_PORT = 15001  # the L7 proxy's transparent listener inside the node namespace


# -- enums (dataplane/bpf/lib/common.h, dataplane/bpf/lib/drop.h) ---------------------------------------------------
class Direction(enum.IntEnum):
    """Policy direction (DIR_* in common.h)."""

    INGRESS = 0
    EGRESS = 1


class Verdict(enum.IntEnum):
    """Per-entry policy verdict (POLICY_* in common.h); ordered by precedence so that combining
    entries is `max`."""

    NONE = 0  # no entry matched
    ALLOW = 1
    REDIRECT = 2
    DENY = 3


class FlowVerdict(enum.IntEnum):
    """What the datapath did with a packet (enum flow_verdict in drop.h)."""

    FORWARD = 0
    DROP = 1
    REDIRECT = 2
    AUDIT = 3  # would have been dropped; passed because of audit mode


class DropReason(enum.IntEnum):
    """Why a packet was dropped (enum drop_reason in drop.h); NONE for packets that were not."""

    NONE = 0
    POLICY_DENIED = 1  # no policy entry matched and enforcement is on
    POLICY_EXPLICIT_DENY = 2  # a DENY entry matched
    PROXY_SOCKET_MISSING = 3  # REDIRECT but no proxy listener: fail closed
    PROXY_ASSIGN_FAILED = 4  # bpf_sk_assign refused the socket: fail closed
    MALFORMED_L2 = 5  # truncated Ethernet header
    MALFORMED_L3 = 6  # truncated IPv4 header, ihl < 5, ihl past the data, bad tot_len
    MALFORMED_L4 = 7  # truncated TCP/UDP/ICMP/SCTP header, TCP doff < 5
    UNSUPPORTED_L3 = 8  # IPv6 and any ethertype other than IPv4 and ARP
    FRAGMENT = 9  # IPv4 fragment of a flow redirected to the L7 proxy (not supported)
    SOURCE_SPOOFED = 10  # source address not the one of the endpoint bound to the interface
    PROXY_NOT_AT_EGRESS = 11  # REDIRECT for node-originated traffic: no sk_assign at tc egress
    FRAGMENT_UNKNOWN = 12  # non-first IPv4 fragment of no known flow (first fragment unseen or dropped)
    NO_SERVICE_BACKEND = 13  # to a service address whose service has no backend (Cilium's "no service backend")


class TracePoint(enum.IntEnum):
    """One step of a traced flow (enum trace_point in dataplane/bpf/lib/trace.h, where the
    arguments a0..a4 of each are listed)."""

    HOOK = 1  # a program saw a packet of a traced flow
    PARSE = 2  # parsed as IPv4
    MARK_PASS = 3  # to_container passed it on its DECIDED mark
    SPOOF_CHECK = 4  # anti-spoofing of a bound interface
    CONNTRACK = 5  # conntrack lookup result
    IDENTITY = 6  # a source or destination identity and where it came from
    POLICY_LOOKUP = 7  # one policy map lookup: key, hit or miss
    POLICY_DECISION = 8  # one endpoint's policy in one direction
    DECISION = 9  # the packet's combined decision
    PROXY_ASSIGN = 10  # bpf_sk_assign to the L7 proxy and the mark set
    CT_CREATE = 11  # a new conntrack entry
    FROM_PROXY = 12  # to_container: the proxy's upstream, identity from the mark
    RESULT = 13  # what the program returned


class TraceSide(enum.IntEnum):
    """TRACE_IDENTITY a0 (TRACE_SIDE_* in trace.h)."""

    SOURCE = 0
    DESTINATION = 1


class IdentityOrigin(enum.IntEnum):
    """TRACE_IDENTITY a2: where an identity came from (TRACE_ID_FROM_* in trace.h)."""

    ENDPOINT = 1  # the endpoints map: a local endpoint
    IPCACHE = 2  # the ipcache, longest prefix match
    WORLD = 3  # in neither: world
    MARK = 4  # the from-proxy skb->mark
    NODE = 5  # sent by the node's own stack: host


class TraceSocket(enum.IntEnum):
    """TRACE_PROXY_ASSIGN a1: which socket the lookup found (TRACE_SK_* in trace.h)."""

    NONE = 0
    FLOW = 1  # the proxy's accepted socket of this flow
    LISTENER = 2  # the proxy listener on 127.0.0.1:proxy_port


class CtResult(enum.IntEnum):
    """A conntrack lookup's result (CT_* in conntrack.h)."""

    NEW = 0
    ESTABLISHED = 1
    REPLY = 2
    RELATED = 3  # an ICMP error about a tracked flow


class Hook(enum.IntEnum):
    """Which program produced an event (HOOK_* in common.h)."""

    FROM_CONTAINER = 0  # tc ingress on the node side: leaving a pod / world host
    TO_CONTAINER = 1  # tc egress on the node side: entering a pod


# -- skb->mark (common.h has the whole layout) --------------------------------------------------
MARK_MAGIC_MASK = 0x00000F00
MARK_MAGIC_TO_PROXY = 0x00000200  # from_container + bpf_sk_assign; "ip rule fwmark 0x200/0xf00"
MARK_MAGIC_FROM_PROXY = 0x00000A00  # the proxy's SO_MARK on upstream sockets
MARK_MAGIC_DECIDED = 0x00000E00  # from_container forwarded it: to_container does not check again


def from_proxy_mark(identity: int) -> int:
    """SO_MARK for an upstream socket carrying traffic of source `identity` (Cilium's
    identity-in-mark: identity bits 0..15 in mark bits 16..31, bits 16..23 in bits 0..7)."""
    return MARK_MAGIC_FROM_PROXY | ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF)


def identity_of_mark(mark: int) -> int | None:
    """Inverse of `from_proxy_mark` (None if the mark is not a from-proxy mark)."""
    if mark & MARK_MAGIC_MASK != MARK_MAGIC_FROM_PROXY:
        return None
    return ((mark >> 16) & 0xFFFF) | ((mark & 0xFF) << 16)


# -- flags and the policy key prefix (common.h, maps.h) -----------------------------------------
EP_F_INGRESS_ENFORCED = 0x01  # struct endpoint_info.flags
EP_F_EGRESS_ENFORCED = 0x02
EP_F_AUDIT = 0x04
CT_F_CLOSING = 0x01  # struct ct_entry.flags
CT_F_FROM_PROXY = 0x02
LB_F_AFFINITY = 0x01  # struct lb_service.flags: sessionAffinity ClientIP
# struct flow_event.flags: the packet is the L7 proxy's upstream connection (mark FROM_PROXY),
# which skips policy as in Cilium; its event carries no policy decision (a trace, not a verdict)
FLOW_EVENT_F_FROM_PROXY = 0x01
POLICY_FIXED_PREFIX = 64  # identity, endpoint id, direction, protocol; the port prefix follows
POLICY_FULL_PREFIX = POLICY_FIXED_PREFIX + 16

# -- tunables: parameters of the C code, passed as -D cflags (the headers have no defaults) -----
POLICY_MAP_SIZE = 262144
IPCACHE_MAP_SIZE = 65536
ENDPOINTS_MAP_SIZE = 4096
CT_MAP_SIZE = 65536
FRAG_MAP_SIZE = 8192  # datagrams in flight whose later fragments are expected
METRICS_MAP_SIZE = 1024  # (verdict, reason, direction) combinations
IF_BIND_MAP_SIZE = 4096  # interfaces with an anti-spoofing binding
EVENTS_PAGES = 64  # ring buffer size in pages (a power of two)
TRACE_MAP_SIZE = 64  # flows traced at once (lib/trace.h)
TRACE_PAGES = 16  # trace ring buffer size in pages (a power of two)
FRAG_LIFETIME_S = 30  # how long a first fragment vouches for its later ones (ipfrag_time)
CT_LIFETIME_TCP_S = 21600  # established TCP
CT_LIFETIME_OTHER_S = 60  # UDP, ICMP, other protocols, and TCP before the handshake completes
CT_LIFETIME_CLOSE_S = 10  # after FIN or RST
LB_MAP_SIZE = 65536  # service slots, backends and rev-NAT entries (lib/lb.h)


# struct __sk_buff (include/uapi/linux/bpf.h): the context BPF_PROG_TEST_RUN passes in and out.
SKB_CTX_SIZE = 192
SKB_OFF_MARK = 8
SKB_OFF_INGRESS_IFINDEX = 36


def c_defines(*, audit: bool = False, debug: bool = False, policy_map_size: int = POLICY_MAP_SIZE,
              ct_map_size: int = CT_MAP_SIZE, tracing: bool = True) -> dict[str, int]:
    """The -D values the datapath is compiled with (the loader turns them into cflags)."""
    return {
        "TRACING": int(tracing),  # 0: trace points compiled out (benchmarks measure their cost)
        "AUDIT_ALL": int(audit),  # 1: every would-be drop passes and is reported as AUDIT
        "DEBUG": int(debug),  # 1: bpf_trace_printk on drops
        "POLICY_MAP_SIZE": policy_map_size,
        "IPCACHE_MAP_SIZE": IPCACHE_MAP_SIZE,
        "ENDPOINTS_MAP_SIZE": ENDPOINTS_MAP_SIZE,
        "CT_MAP_SIZE": ct_map_size,
        "FRAG_MAP_SIZE": FRAG_MAP_SIZE,
        "METRICS_MAP_SIZE": METRICS_MAP_SIZE,
        "IF_BIND_MAP_SIZE": IF_BIND_MAP_SIZE,
        "EVENTS_PAGES": EVENTS_PAGES,
        "TRACE_MAP_SIZE": TRACE_MAP_SIZE,
        "TRACE_PAGES": TRACE_PAGES,
        "FRAG_LIFETIME_S": FRAG_LIFETIME_S,
        "CT_LIFETIME_TCP_S": CT_LIFETIME_TCP_S,
        "CT_LIFETIME_OTHER_S": CT_LIFETIME_OTHER_S,
        "CT_LIFETIME_CLOSE_S": CT_LIFETIME_CLOSE_S,
        "LB_MAP_SIZE": LB_MAP_SIZE,
    }


# -- struct layouts (dataplane/bpf/lib/maps.h) ------------------------------------------------------------
U8, U16, U32, U64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
BE16, BE32 = ctypes.c_uint16.__ctype_be__, ctypes.c_uint32.__ctype_be__  # __be16, __be32

# The C spelling of each field type, as the compiler reports it (typedef names kept).
_C_TYPE_NAMES: dict[type, str] = {U8: "u8", U16: "u16", U32: "u32", U64: "u64", BE16: "__be16", BE32: "__be32"}


def c_type_name(ctype: type) -> str:
    """'u16', '__be32', 'u8[3]': the C type a ctypes field type stands for."""
    length = getattr(ctype, "_length_", None)
    if length is not None:
        return f"{c_type_name(ctype._type_)}[{length}]"  # type: ignore[attr-defined]
    try:
        return _C_TYPE_NAMES[ctype]
    except KeyError:
        raise TypeError(f"{ctype!r} is not a type the datapath ABI uses") from None


def c_struct(c_name: str, size: int, fields: list[tuple[str, type, int]]) -> type[ctypes.Structure]:
    """A ctypes Structure for `struct c_name`, from (field, type, offset) rows as maps.h writes
    them; every offset and the total size are checked here, so the table below is the layout."""
    cls = type(c_name, (ctypes.Structure,), {"_fields_": [(name, ctype) for name, ctype, _ in fields],
                                              "c_name": c_name})
    for name, _, offset in fields:
        if getattr(cls, name).offset != offset:
            raise TypeError(f"struct {c_name}.{name}: declared at {offset}, natural layout puts it at "
                            f"{getattr(cls, name).offset} (add explicit padding)")
    if ctypes.sizeof(cls) != size:
        raise TypeError(f"struct {c_name}: declared {size} bytes, fields make {ctypes.sizeof(cls)}")
    return cls


CIpcacheKey = c_struct("ipcache_key", 8, [
    ("prefixlen", U32, 0),
    ("addr", BE32, 4),
])
CIpcacheValue = c_struct("ipcache_value", 8, [
    ("identity", U32, 0),
    ("flags", U32, 4),  # reserved, 0
])
CEndpointInfo = c_struct("endpoint_info", 8, [
    ("identity", U32, 0),
    ("endpoint_id", U16, 4),
    ("flags", U8, 6),  # EP_F_*
    ("pad", U8, 7),
])
CPolicyKey = c_struct("policy_key", 16, [
    ("prefixlen", U32, 0),  # POLICY_FIXED_PREFIX + port prefix
    ("identity", U32, 4),
    ("endpoint_id", U16, 8),
    ("direction", U8, 10),
    ("protocol", U8, 11),
    ("port", BE16, 12),  # big endian: its high bits come first, as LPM requires
    ("pad", U16, 14),
])
CPolicyValue = c_struct("policy_value", 8, [
    ("verdict", U8, 0),
    ("pad", U8, 1),
    ("proxy_port", U16, 2),
    ("rule_id", U32, 4),
])
CCtKey = c_struct("ct_key", 16, [
    ("saddr", BE32, 0),
    ("daddr", BE32, 4),
    ("sport", BE16, 8),
    ("dport", BE16, 10),
    ("proto", U8, 12),
    ("pad", U8 * 3, 13),
])
CCtEntry = c_struct("ct_entry", 32, [
    ("expires_ns", U64, 0),
    ("packets", U64, 8),
    ("src_identity", U32, 16),
    ("rule_id", U32, 20),
    ("proxy_port", U16, 24),
    ("flags", U8, 26),  # CT_F_*
    ("pad", U8, 27),
    ("rev_nat_index", U16, 28),  # != 0: a flow to a service; replies leave as lb_revnat[index]
    ("pad2", U16, 30),
])
CLbServiceKey = c_struct("lb_service_key", 12, [
    ("addr", BE32, 0),  # the ClusterIP
    ("port", BE16, 4),
    ("proto", U8, 6),
    ("pad", U8, 7),
    ("slot", U16, 8),  # 0: the service; 1..count: its backends
    ("pad2", U16, 10),
])
CLbService = c_struct("lb_service", 12, [
    ("backend_id", U32, 0),  # slots 1..count
    ("count", U16, 4),  # slot 0
    ("rev_nat_index", U16, 6),  # slot 0
    ("flags", U8, 8),  # slot 0: LB_F_*
    ("pad", U8 * 3, 9),
])
CLbBackend = c_struct("lb_backend", 8, [
    ("addr", BE32, 0),
    ("port", BE16, 4),
    ("pad", U16, 6),
])
CLbRevNat = c_struct("lb_revnat", 8, [
    ("addr", BE32, 0),
    ("port", BE16, 4),
    ("pad", U16, 6),
])
CLbFlow = c_struct("lb_flow", 16, [
    ("expires_ns", U64, 0),
    ("backend_id", U32, 8),
    ("rev_nat_index", U16, 12),
    ("pad", U16, 14),
])
CFragKey = c_struct("frag_key", 12, [
    ("saddr", BE32, 0),
    ("daddr", BE32, 4),
    ("id", BE16, 8),
    ("proto", U8, 10),
    ("pad", U8, 11),
])
CFragEntry = c_struct("frag_entry", 16, [
    ("expires_ns", U64, 0),
    ("sport", BE16, 8),
    ("dport", BE16, 10),
    ("policy_port", U16, 12),
    ("tcp_flags", U8, 14),
    ("pad", U8, 15),
])
CMetricsKey = c_struct("metrics_key", 4, [
    ("verdict", U8, 0),
    ("reason", U8, 1),
    ("direction", U8, 2),
    ("pad", U8, 3),
])
CMetricsValue = c_struct("metrics_value", 16, [
    ("packets", U64, 0),
    ("bytes", U64, 8),
])
CIfBinding = c_struct("if_binding", 4, [
    ("endpoint_id", U16, 0),
    ("pad", U16, 2),
])
CFlowEvent = c_struct("flow_event", 64, [
    ("ts_ns", U64, 0),
    ("saddr", BE32, 8),
    ("daddr", BE32, 12),
    ("sport", U16, 16),  # host order
    ("dport", U16, 18),
    ("proto", U8, 20),
    ("verdict", U8, 21),  # FlowVerdict
    ("reason", U8, 22),  # DropReason
    ("direction", U8, 23),  # Direction of the policy that decided
    ("src_identity", U32, 24),
    ("dst_identity", U32, 28),
    ("src_endpoint", U16, 32),
    ("dst_endpoint", U16, 34),
    ("rule_id", U32, 36),
    ("proxy_port", U16, 40),
    ("tcp_flags", U8, 42),
    ("hook", U8, 43),  # Hook
    ("ifindex", U32, 44),
    ("pkt_len", U32, 48),
    ("flags", U8, 52),  # FLOW_EVENT_F_*
    ("icmp_type", U8, 53),  # ICMP: the packet's type and code (Hubble's l4.ICMPv4); else 0
    ("icmp_code", U8, 54),
    ("pad", U8, 55),
    ("other_rule_id", U32, 56),  # the rule of the direction not reported that allowed it; 0 if none
    ("pad2", U32, 60),
])

CTraceKey = c_struct("trace_key", 16, [
    ("saddr", BE32, 0),
    ("daddr", BE32, 4),
    ("sport", BE16, 8),  # 0: any source port
    ("dport", BE16, 10),
    ("proto", U8, 12),
    ("pad", U8 * 3, 13),
])
CTraceValue = c_struct("trace_value", 8, [
    ("trace_id", U32, 0),
    ("pad", U32, 4),
])
CTraceEvent = c_struct("trace_event", 64, [
    ("ts_ns", U64, 0),
    ("trace_id", U32, 8),
    ("packet_id", U32, 12),  # one value per program run: groups the events of one packet
    ("point", U16, 16),  # TracePoint
    ("line", U16, 18),  # __LINE__ of the emitting call
    ("hook", U8, 20),  # Hook
    ("proto", U8, 21),
    ("tcp_flags", U8, 22),
    ("pad", U8, 23),
    ("ifindex", U32, 24),
    ("saddr", BE32, 28),
    ("daddr", BE32, 32),
    ("sport", U16, 36),  # host order
    ("dport", U16, 38),
    ("arg", U32 * 5, 40),  # per point: dataplane/bpf/lib/trace.h
    ("pad2", U32, 60),
])

STRUCTS: tuple[type[ctypes.Structure], ...] = (
    CIpcacheKey, CIpcacheValue, CEndpointInfo, CPolicyKey, CPolicyValue, CCtKey, CCtEntry, CFragKey,
    CFragEntry, CMetricsKey, CMetricsValue, CIfBinding, CFlowEvent, CTraceKey, CTraceValue, CTraceEvent,
    CLbServiceKey, CLbService, CLbBackend, CLbRevNat, CLbFlow)


@dataclass(frozen=True)
class MapLayout:
    """Key and value type of one BPF map of dataplane/bpf/datapath.c (per-CPU maps: one CPU's value)."""

    key: type
    value: type
    size_define: str  # the -D name dataplane/bpf/datapath.c sizes the map with

    @property
    def max_entries(self) -> int:
        """The map's size in a datapath compiled with the default c_defines()."""
        return c_defines()[self.size_define]


MAPS: dict[str, MapLayout] = {
    "ipcache": MapLayout(CIpcacheKey, CIpcacheValue, "IPCACHE_MAP_SIZE"),
    "endpoints": MapLayout(BE32, CEndpointInfo, "ENDPOINTS_MAP_SIZE"),  # IPv4 address -> endpoint
    "policy": MapLayout(CPolicyKey, CPolicyValue, "POLICY_MAP_SIZE"),
    "conntrack": MapLayout(CCtKey, CCtEntry, "CT_MAP_SIZE"),
    "fragments": MapLayout(CFragKey, CFragEntry, "FRAG_MAP_SIZE"),
    "metrics": MapLayout(CMetricsKey, CMetricsValue, "METRICS_MAP_SIZE"),
    "if_bind": MapLayout(U32, CIfBinding, "IF_BIND_MAP_SIZE"),  # ifindex -> binding
    "trace_flows": MapLayout(CTraceKey, CTraceValue, "TRACE_MAP_SIZE"),  # traced flows -> trace id
    "lb_services": MapLayout(CLbServiceKey, CLbService, "LB_MAP_SIZE"),  # (ClusterIP, port, proto, slot)
    "lb_backends": MapLayout(U32, CLbBackend, "LB_MAP_SIZE"),  # backend id -> address, target port
    "lb_revnat": MapLayout(U32, CLbRevNat, "LB_MAP_SIZE"),  # rev-NAT index -> service address
    "lb_flows": MapLayout(CCtKey, CLbFlow, "CT_MAP_SIZE"),  # a client's tuple -> its backend
}


@dataclass(frozen=True)
class FixedMapLayout:
    """A map of dataplane/bpf/datapath.c whose size is part of what it means, not a tunable."""

    key: type
    value: type
    max_entries: int


FIXED_MAPS: dict[str, FixedMapLayout] = {
    # slot 0: how many entries trace_flows holds; 0 tells every packet that nothing is traced
    "trace_switch": FixedMapLayout(U32, U32, 1),
}

# Ring buffers of dataplane/bpf/datapath.c: the struct each carries and the -D that sizes it (pages).
RING_BUFFERS: dict[str, tuple[type[ctypes.Structure], str]] = {
    "events": (CFlowEvent, "EVENTS_PAGES"),
    "traces": (CTraceEvent, "TRACE_PAGES"),
}


def ipv4_be32(address: str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the integer a __be32 field holds."""
    return int(ipaddress.IPv4Address(address))


# -- constants the C code defines, as "C expression -> value" -----------------------------------
def _enum_constants(prefix: str, members: Iterable[enum.IntEnum]) -> dict[str, int]:
    return {f"{prefix}{m.name}": int(m) for m in members}


C_CONSTANTS: dict[str, int] = {
    "IDENTITY_ANY": IDENTITY_ANY,
    "IDENTITY_HOST": IDENTITY_HOST,
    "IDENTITY_WORLD": IDENTITY_WORLD,
    **_enum_constants("DIR_", Direction),
    **_enum_constants("POLICY_", Verdict),
    **_enum_constants("VERDICT_", FlowVerdict),
    **_enum_constants("REASON_", DropReason),
    **_enum_constants("HOOK_", Hook),
    **_enum_constants("TRACE_", TracePoint),
    **_enum_constants("TRACE_SIDE_", TraceSide),
    **_enum_constants("TRACE_ID_FROM_", IdentityOrigin),
    **_enum_constants("TRACE_SK_", TraceSocket),
    **_enum_constants("CT_", CtResult),
    "MARK_MAGIC_MASK": MARK_MAGIC_MASK,
    "MARK_MAGIC_TO_PROXY": MARK_MAGIC_TO_PROXY,
    "MARK_MAGIC_FROM_PROXY": MARK_MAGIC_FROM_PROXY,
    "MARK_MAGIC_DECIDED": MARK_MAGIC_DECIDED,
    "EP_F_INGRESS_ENFORCED": EP_F_INGRESS_ENFORCED,
    "EP_F_EGRESS_ENFORCED": EP_F_EGRESS_ENFORCED,
    "EP_F_AUDIT": EP_F_AUDIT,
    "CT_F_CLOSING": CT_F_CLOSING,
    "CT_F_FROM_PROXY": CT_F_FROM_PROXY,
    "LB_F_AFFINITY": LB_F_AFFINITY,
    "FLOW_EVENT_F_FROM_PROXY": FLOW_EVENT_F_FROM_PROXY,
    "POLICY_FIXED_PREFIX": POLICY_FIXED_PREFIX,
    "POLICY_FULL_PREFIX": POLICY_FULL_PREFIX,
    "IPPROTO_ICMP": PROTO_ICMP,
    "IPPROTO_TCP": PROTO_TCP,
    "IPPROTO_UDP": PROTO_UDP,
    "IPPROTO_SCTP": PROTO_SCTP,
    "TCPF_FIN": TCPF_FIN,
    "TCPF_SYN": TCPF_SYN,
    "TCPF_RST": TCPF_RST,
    "TCPF_PSH": TCPF_PSH,
    "TCPF_ACK": TCPF_ACK,
    "sizeof(struct __sk_buff)": SKB_CTX_SIZE,
    "__builtin_offsetof(struct __sk_buff, mark)": SKB_OFF_MARK,
    "__builtin_offsetof(struct __sk_buff, ingress_ifindex)": SKB_OFF_INGRESS_IFINDEX,
}

# Names the headers define for the C side alone (parser states, conntrack results, include
# guards...): the header check accepts these without a Python mirror. Anything else a header
# defines as a number must be in C_CONSTANTS or c_defines().
C_PRIVATE_NAMES = frozenset({
    "PARSE_IPV4", "PARSE_ARP", "PKT_FRAG_NONE", "PKT_FRAG_FIRST", "PKT_FRAG_LATER", "FRAG_IP_MF",
    "FRAG_OFFSET_MASK",
})
