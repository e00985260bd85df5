"""The datapath loader: the only module of l7lab that imports `bcc`.

Responsibility: compile bpf/datapath.c once (both tc programs, sharing every map), hand out the
program fds for the topology code to attach, write a `MapState` into the BPF maps as a diff
against what it wrote last, and read back metrics and flow events. It also runs programs on
test packets (BPF_PROG_TEST_RUN) for tests and benchmarks.

Map layouts are packed here with `struct` and must match bpf/lib/maps.h byte for byte; the
constructor checks every size against the compiled map so a drift fails at start, not silently.
`bcc` is imported inside `Datapath.__init__`, so `FlowEvent`, the constants and the packing
helpers can be imported on machines without BCC.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .bpfsource import BPF_DIR, MAIN_SOURCE
from .errors import SetupError
from .mapstate import Direction, MapState, PolicyKey, PolicyEntry, EndpointState
from .reasons import DropReason, FlowVerdict, Hook

PROGRAMS = ("from_container", "to_container")

# skb->mark layout (bpf/lib/common.h): magic in 0xf00.
MARK_MAGIC_MASK = 0x0F00
MARK_MAGIC_TO_PROXY = 0x0200  # ip rule fwmark 0x200/0xf00 lookup 2004
MARK_MAGIC_FROM_PROXY = 0x0A00
MARK_MAGIC_DECIDED = 0x0E00

EP_F_INGRESS_ENFORCED = 0x01
EP_F_EGRESS_ENFORCED = 0x02
EP_F_AUDIT = 0x04

POLICY_FIXED_PREFIX = 64  # identity, endpoint id, direction, protocol; the port prefix follows

# name: (key format, value format) -- see bpf/lib/maps.h
LAYOUTS: dict[str, tuple[str, str]] = {
    "ipcache": ("<I4s", "<II"),
    "endpoints": ("4s", "<IHBB"),
    "policy": ("<IIHBB2sH", "<BBHI"),
    "conntrack": ("<4s4s2s2sB3x", "<QQIIHB5x"),
    "metrics": ("<BBBx", "<QQ"),
    "if_bind": ("<I", "<HH"),
    # {saddr, daddr, IP id, proto} -> {expires_ns, sport, dport, policy_port, tcp_flags}
    "fragments": ("<4s4s2sBx", "<Q2s2sHBx"),
}
EVENT_FORMAT = "<Q4s4sHHBBBBIIHHIHBBII4x"
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)  # 56


def from_proxy_mark(identity: int) -> int:
    """The SO_MARK the proxy sets on an upstream socket for a client of `identity` (Cilium's
    identity-in-mark: identity bits 0..15 in mark bits 16..31, bits 16..23 in bits 0..7)."""
    return ((identity & 0xFFFF) << 16) | MARK_MAGIC_FROM_PROXY | ((identity >> 16) & 0xFF)


# -- packing (pure) -------------------------------------------------------------------------------
def pack_ipcache(prefix: str, identity: int) -> tuple[bytes, bytes]:
    net = ipaddress.IPv4Network(prefix, strict=False)
    return (struct.pack(LAYOUTS["ipcache"][0], net.prefixlen, net.network_address.packed),
            struct.pack(LAYOUTS["ipcache"][1], identity, 0))


def pack_endpoint(ep: EndpointState) -> tuple[bytes, bytes]:
    if not 1 <= ep.endpoint_id <= 0xFFFF:
        raise ValueError(f"endpoint id {ep.endpoint_id} of {ep.name} is outside 1..65535")
    flags = ((EP_F_INGRESS_ENFORCED if ep.ingress_enforced else 0)
             | (EP_F_EGRESS_ENFORCED if ep.egress_enforced else 0) | (EP_F_AUDIT if ep.audit else 0))
    addr = ipaddress.IPv4Address(ep.ip.split("/")[0])
    return addr.packed, struct.pack(LAYOUTS["endpoints"][1], ep.identity, ep.endpoint_id, flags, 0)


def pack_policy(key: PolicyKey, entry: PolicyEntry) -> tuple[bytes, bytes]:
    if key.protocol == 0 and (key.port or key.port_prefix):
        raise ValueError(f"{key}: an any-protocol entry cannot have a port")
    if not 0 <= key.port_prefix <= 16:
        raise ValueError(f"{key}: port prefix must be 0..16")
    # Only the prefix bits of the port are meaningful; keep the rest zero so equal keys are equal.
    port = key.port & (0xFFFF << (16 - key.port_prefix)) & 0xFFFF
    k = struct.pack(LAYOUTS["policy"][0], POLICY_FIXED_PREFIX + key.port_prefix, key.identity,
                    key.endpoint_id, int(key.direction), key.protocol, struct.pack("!H", port), 0)
    rule = entry.rule_ids[0] if entry.rule_ids else 0
    v = struct.pack(LAYOUTS["policy"][1], int(entry.verdict), 0, entry.proxy_port, rule)
    return k, v


# -- results --------------------------------------------------------------------------------------
@dataclass
class SyncStats:
    """What one sync() wrote: counts per map, and every write in the order it was made."""

    added: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    writes: list[tuple[str, str, Any]] = field(default_factory=list)  # (map, "update"|"delete", key)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.writes)


@dataclass(frozen=True)
class FlowEvent:
    """One flow event from the ring buffer (struct flow_event in bpf/lib/maps.h)."""

    ts_ns: int
    src: str
    dst: str
    sport: int
    dport: int
    protocol: int
    verdict: FlowVerdict
    reason: DropReason
    direction: Direction  # of the policy that decided (docs/datapath.md)
    src_identity: int
    dst_identity: int
    src_endpoint: int  # 0: not a local endpoint
    dst_endpoint: int
    rule_id: int
    proxy_port: int
    tcp_flags: int
    hook: Hook
    ifindex: int
    length: int

    @property
    def endpoint_id(self) -> int:
        """The endpoint whose policy the verdict is about."""
        return self.src_endpoint if self.direction == Direction.EGRESS else self.dst_endpoint

    @classmethod
    def decode(cls, raw: bytes) -> "FlowEvent":
        (ts, saddr, daddr, sport, dport, proto, verdict, reason, direction, sid, did, sep, dep,
         rule, pport, flags, hook, ifindex, length) = struct.unpack(EVENT_FORMAT, raw[:EVENT_SIZE])
        return cls(ts, str(ipaddress.IPv4Address(saddr)), str(ipaddress.IPv4Address(daddr)), sport, dport,
                   proto, FlowVerdict(verdict), DropReason(reason), Direction(direction), sid, did, sep, dep,
                   rule, pport, flags, Hook(hook), ifindex, length)


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    mark: int  # skb->mark after the program ran


class _TestRunOpts(ctypes.Structure):  # libbpf struct bpf_test_run_opts (libbpf >= 0.8)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class _TestRunAttr(ctypes.Structure):  # union bpf_attr, BPF_PROG_TEST_RUN member
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff); offsets below from include/uapi/linux/bpf.h
SKB_OFF_MARK, SKB_OFF_INGRESS_IFINDEX, SKB_OFF_IFINDEX = 8, 36, 40
BPF_PROG_TEST_RUN = 10
SYS_BPF = 321  # x86_64


def _load_libbpf_test_run() -> Callable[..., int] | None:
    for name in ("libbpf.so.1", "libbpf.so.0", "libbcc_bpf.so.0"):
        try:
            fn = getattr(ctypes.CDLL(name, use_errno=True), "bpf_prog_test_run_opts")
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        fn.restype = ctypes.c_int
        return fn
    return None


# -- the loader -----------------------------------------------------------------------------------
class Datapath:
    """Both tc programs, compiled once, and their maps. Use as a context manager or close()."""

    def __init__(self, *, audit: bool = False, debug: bool = False, policy_map_size: int = 262144,
                 ct_map_size: int = 65536) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - the one place l7lab imports bcc
        except ImportError as exc:
            raise SetupError("cannot import bcc: install the distribution's python3-bpfcc and create "
                             "the venv with --system-site-packages (scripts/setup.sh)") from exc
        self.audit = audit
        cflags = [f"-I{BPF_DIR}", f"-DAUDIT_ALL={int(audit)}", f"-DDEBUG={int(debug)}",
                  f"-DPOLICY_MAP_SIZE={policy_map_size}", f"-DCT_MAP_SIZE={ct_map_size}",
                  "-Wno-unused-function"]
        try:
            self._bpf = BPF(src_file=str(MAIN_SOURCE).encode(), cflags=cflags)
            self._fns = {name: self._bpf.load_func(name.encode(), BPF.SCHED_CLS) for name in PROGRAMS}
        except Exception as exc:  # BCC raises plain Exception on compile/verifier failure
            raise SetupError(f"BCC could not compile or load bpf/datapath.c: {exc}") from exc
        self._tables = {name: self._bpf.get_table(name.encode()) for name in LAYOUTS}
        for name, (kfmt, vfmt) in LAYOUTS.items():
            t = self._tables[name]
            leaf = getattr(t, "sLeaf", t.Leaf)  # per-CPU tables: one CPU's value
            sizes = (ctypes.sizeof(t.Key), ctypes.sizeof(leaf)), (struct.calcsize(kfmt), struct.calcsize(vfmt))
            if sizes[0] != sizes[1]:
                raise SetupError(f"map {name}: layout drift between bpf/lib/maps.h {sizes[0]} and datapath.py {sizes[1]}")
        # What sync() last wrote, per map: raw key -> (raw value, Python key for reports).
        self._written: dict[str, dict[bytes, tuple[bytes, Any]]] = {"policy": {}, "ipcache": {}, "endpoints": {},
                                                                     "if_bind": {}}
        self._events: list[FlowEvent] = []
        self._bpf[b"events"].open_ring_buffer(self._on_event)
        self._test_run_fn = _load_libbpf_test_run()
        self._closed = False

    # -- programs ---------------------------------------------------------------------------------
    def program_fd(self, name: str) -> int:
        """SCHED_CLS program fd for tc direct-action attach: 'from_container' or 'to_container'."""
        if name not in self._fns:
            raise KeyError(f"no program {name!r}; have {', '.join(PROGRAMS)}")
        return self._fns[name].fd

    # -- map state --------------------------------------------------------------------------------
    def sync(self, state: MapState, interfaces: dict[int, int] | None = None) -> SyncStats:
        """Write `state` as a diff against the last sync. Adds and updates go first (policy, then
        ipcache, then endpoints, so enforcement never turns on before its allows exist), deletions
        last (the reverse order): a flow allowed both before and after never sees a gap.
        `interfaces` (node-side ifindex -> endpoint id, 0 for a world link) feeds anti-spoofing;
        None leaves the bindings as they are."""
        started = time.monotonic()
        desired: dict[str, dict[bytes, tuple[bytes, Any]]] = {"policy": {}, "ipcache": {}, "endpoints": {}}
        for pkey, entry in state.policy.items():
            k, v = pack_policy(pkey, entry)
            desired["policy"][k] = (v, pkey)
        for prefix, identity in state.ipcache.items():
            k, v = pack_ipcache(prefix, identity)
            desired["ipcache"][k] = (v, prefix)
        for ep in state.endpoints.values():
            k, v = pack_endpoint(ep)
            desired["endpoints"][k] = (v, ep.ip)
        if interfaces is not None:
            desired["if_bind"] = {struct.pack("<I", i): (struct.pack("<HH", e, 0), i) for i, e in interfaces.items()}
        stats = SyncStats()
        order = [m for m in ("policy", "ipcache", "endpoints", "if_bind") if m in desired]
        for name in order:
            self._apply_upserts(name, desired[name], stats)
        for name in reversed(order):
            self._apply_deletes(name, desired[name], stats)
        stats.seconds = time.monotonic() - started
        return stats

    def _apply_upserts(self, name: str, want: dict[bytes, tuple[bytes, Any]], stats: SyncStats) -> None:
        table, have = self._tables[name], self._written[name]
        for k, (v, pykey) in want.items():
            old = have.get(k)
            if old is not None and old[0] == v:
                continue
            table[table.Key.from_buffer_copy(k)] = table.Leaf.from_buffer_copy(v)
            have[k] = (v, pykey)
            counter = stats.added if old is None else stats.updated
            counter[name] = counter.get(name, 0) + 1
            stats.writes.append((name, "update", pykey))

    def _apply_deletes(self, name: str, want: dict[bytes, tuple[bytes, Any]], stats: SyncStats) -> None:
        table, have = self._tables[name], self._written[name]
        for k in [k for k in have if k not in want]:
            try:
                del table[table.Key.from_buffer_copy(k)]
            except KeyError:
                pass  # already gone: the goal is reached
            stats.deleted[name] = stats.deleted.get(name, 0) + 1
            stats.writes.append((name, "delete", have.pop(k)[1]))

    def flush_conntrack(self) -> None:
        """Forget every tracked flow (tests; a lab restart), and every datagram whose later
        fragments were expected (their flow is forgotten with it)."""
        self._tables["conntrack"].clear()
        self._tables["fragments"].clear()

    def conntrack_size(self) -> int:
        return len(self._tables["conntrack"].items())

    def fragments_size(self) -> int:
        """Datagrams recorded by a passed first fragment (the `fragments` LRU map)."""
        return len(self._tables["fragments"].items())

    # -- observation ------------------------------------------------------------------------------
    def metrics(self) -> dict[tuple[FlowVerdict, DropReason, Direction], int]:
        """Packets per (verdict, reason, direction), summed over CPUs."""
        return {k: pkts for k, (pkts, _) in self.metrics_detail().items()}

    def metrics_detail(self) -> dict[tuple[FlowVerdict, DropReason, Direction], tuple[int, int]]:
        """(packets, bytes) per (verdict, reason, direction), summed over CPUs."""
        out: dict[tuple[FlowVerdict, DropReason, Direction], tuple[int, int]] = {}
        table = self._tables["metrics"]
        for key, percpu in table.items():
            verdict, reason, direction = struct.unpack("<BBBx", bytes(key))
            pkts = sum(v.packets for v in percpu)
            nbytes = sum(v.bytes for v in percpu)
            out[(FlowVerdict(verdict), DropReason(reason), Direction(direction))] = (pkts, nbytes)
        return out

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        self._events.append(FlowEvent.decode(ctypes.string_at(data, size)))
        return 0

    def poll_events(self, timeout_ms: int = 0) -> list[FlowEvent]:
        """Events produced since the last call; waits up to timeout_ms for the first one."""
        self._bpf.ring_buffer_poll(timeout_ms)
        out, self._events = self._events, []
        return out

    # -- BPF_PROG_TEST_RUN ------------------------------------------------------------------------
    def test_run(self, prog: str, packet: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
        """Run a program on one packet (BPF_PROG_TEST_RUN): (retval, packet out, ns per run)."""
        r = self.test_run_full(prog, packet, repeat)
        return r.retval, r.data, r.duration_ns

    def test_run_full(self, prog: str, packet: bytes, repeat: int = 1, *, mark: int = 0,
                      ingress_ifindex: int = 0) -> TestRunResult:
        """As test_run, with skb->mark and skb->ingress_ifindex set on the way in and the mark read
        back. The packet runs in the caller's network namespace (socket lookups happen there)."""
        fd = self.program_fd(prog)
        data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
        data_out = ctypes.create_string_buffer(len(packet) + 512)
        ctx_in = ctypes.create_string_buffer(SKB_CTX_SIZE)
        struct.pack_into("<I", ctx_in, SKB_OFF_MARK, mark)
        struct.pack_into("<I", ctx_in, SKB_OFF_INGRESS_IFINDEX, ingress_ifindex)
        ctx_out = ctypes.create_string_buffer(SKB_CTX_SIZE)
        if self._test_run_fn is not None:
            opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(data_in),
                                data_out=ctypes.addressof(data_out), data_size_in=len(packet),
                                data_size_out=len(data_out), ctx_in=ctypes.addressof(ctx_in),
                                ctx_out=ctypes.addressof(ctx_out), ctx_size_in=SKB_CTX_SIZE,
                                ctx_size_out=SKB_CTX_SIZE, repeat=repeat)
            rc = self._test_run_fn(fd, ctypes.byref(opts))
            err = -rc if rc < 0 else 0
            result = (opts.retval, opts.data_size_out, opts.duration)
        else:
            attr = _TestRunAttr(prog_fd=fd, data_size_in=len(packet), data_size_out=len(data_out),
                                data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
                                repeat=repeat, ctx_size_in=SKB_CTX_SIZE, ctx_size_out=SKB_CTX_SIZE,
                                ctx_in=ctypes.addressof(ctx_in), ctx_out=ctypes.addressof(ctx_out))
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
            err = ctypes.get_errno() if rc < 0 else 0
            result = (attr.retval, attr.data_size_out, attr.duration)
        if err:
            raise OSError(err, f"BPF_PROG_TEST_RUN on {prog}: {os.strerror(err)}")
        retval, size_out, duration = result
        (mark_out,) = struct.unpack_from("<I", ctx_out, SKB_OFF_MARK)
        return TestRunResult(retval, data_out.raw[:size_out], duration, mark_out)

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Unload programs and maps (attached filters keep their own reference)."""
        if not self._closed:
            self._closed = True
            self._bpf.cleanup()

    def __enter__(self) -> "Datapath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Datapath", "FlowEvent", "SyncStats", "TestRunResult", "from_proxy_mark",
           "MARK_MAGIC_MASK", "MARK_MAGIC_TO_PROXY", "MARK_MAGIC_FROM_PROXY", "MARK_MAGIC_DECIDED"]
