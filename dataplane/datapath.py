"""The datapath loader: the only module of l7lab that imports `bcc`.

Responsibility: compile dataplane/bpf/datapath.c once (both tc programs, sharing every map), hand out the
program fds for the topology code to attach, write a `MapState` into the BPF maps as a diff
against what it wrote last, and read back metrics and flow events. Per-flow tracing: write the
flows to trace (`trace_start` / `trace_stop`, maps trace_flows and trace_switch) and read their
trace events (`poll_traces`). It also runs programs on test packets (BPF_PROG_TEST_RUN) for
tests and benchmarks, and asks the kernel, one capability at a time, for what the datapath needs
(`probe_map_create`, `ProbeBuild`: the setup self-check, dataplane/selfcheck.py).

Map keys and values and the flow event are the ctypes structs of dataplane/abi.py, which also
holds every constant shared with dataplane/bpf/lib/*.h and the tunables passed to the compiler as -D
cflags; the constructor checks each map's types against those BCC derived from the compiled
program, so a drift fails at start, not silently (tests/kernel/test_abi_compiled.py checks every field).
`bcc` is imported inside `Datapath.__init__`, `probe_c_abi` and `ProbeBuild`, so `FlowEvent` and the packing
helpers can be imported on machines without BCC.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import struct
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import abi, abicheck
from .abi import Direction, DropReason, FlowVerdict, Hook
from .bpfsource import BPF_DIR, MAIN_SOURCE
from .errors import SetupError
from .mapstate import EndpointState, MapState, PolicyEntry, PolicyKey, ServiceEntry

PROGRAMS = ("from_container", "to_container")
# Events read from the ring buffers but not yet collected by poll_events / poll_traces: the newest
# are kept, older ones counted in Datapath.events_lost / traces_lost (a reader that stops
# polling costs memory up to these bounds, never more).
EVENT_BACKLOG = 65536
TRACE_BACKLOG = 16384


def _cflags(defines: dict[str, int]) -> list[str]:
    return [f"-I{BPF_DIR}", *(f"-D{name}={value}" for name, value in defines.items()), "-Wno-unused-function"]


# -- packing (pure) -------------------------------------------------------------------------------
def pack_ipcache(prefix: str, identity: int) -> tuple[bytes, bytes]:
    net = ipaddress.IPv4Network(prefix, strict=False)
    return (bytes(abi.CIpcacheKey(prefixlen=net.prefixlen, addr=int(net.network_address))),
            bytes(abi.CIpcacheValue(identity=identity, flags=0)))


def pack_endpoint(ep: EndpointState) -> tuple[bytes, bytes]:
    if not 1 <= ep.endpoint_id <= 0xFFFF:
        raise ValueError(f"endpoint id {ep.endpoint_id} of {ep.name} is outside 1..65535")
    flags = ((abi.EP_F_INGRESS_ENFORCED if ep.ingress_enforced else 0)
             | (abi.EP_F_EGRESS_ENFORCED if ep.egress_enforced else 0) | (abi.EP_F_AUDIT if ep.audit else 0))
    key = abi.MAPS["endpoints"].key(abi.ipv4_be32(ep.ip.split("/")[0]))
    return bytes(key), bytes(abi.CEndpointInfo(identity=ep.identity, endpoint_id=ep.endpoint_id, flags=flags))


def pack_policy(key: PolicyKey, entry: PolicyEntry) -> tuple[bytes, bytes]:
    if key.protocol == abi.PROTO_ANY and (key.port or key.port_prefix):
        raise ValueError(f"{key}: an any-protocol entry cannot have a port")
    if not 0 <= key.port_prefix <= 16:
        raise ValueError(f"{key}: port prefix must be 0..16")
    # Only the prefix bits of the port are meaningful; keep the rest zero so equal keys are equal.
    port = key.port & (0xFFFF << (16 - key.port_prefix)) & 0xFFFF
    k = abi.CPolicyKey(prefixlen=abi.POLICY_FIXED_PREFIX + key.port_prefix, identity=key.identity,
                       endpoint_id=key.endpoint_id, direction=int(key.direction), protocol=key.protocol, port=port)
    rule = entry.rule_ids[0] if entry.rule_ids else 0
    v = abi.CPolicyValue(verdict=int(entry.verdict), proxy_port=entry.proxy_port, rule_id=rule)
    return bytes(k), bytes(v)


def unpack_policy(key: bytes, value: bytes) -> tuple[PolicyKey, PolicyEntry]:
    """The inverse of `pack_policy`: a policy map entry as the kernel holds it. The value keeps
    one rule id (the first of `PolicyEntry.rule_ids`), so `rule_ids` has at most one, none for 0."""
    k = abi.CPolicyKey.from_buffer_copy(key)
    v = abi.CPolicyValue.from_buffer_copy(value)
    port_prefix = k.prefixlen - abi.POLICY_FIXED_PREFIX
    if not 0 <= port_prefix <= 16:
        raise ValueError(f"policy key with prefix length {k.prefixlen}: expected "
                         f"{abi.POLICY_FIXED_PREFIX}..{abi.POLICY_FULL_PREFIX}")
    try:
        direction, verdict = Direction(k.direction), abi.Verdict(v.verdict)
    except ValueError as exc:
        raise ValueError(f"policy entry of endpoint {k.endpoint_id}: {exc}") from None
    return (PolicyKey(k.endpoint_id, direction, k.identity, k.protocol, k.port, port_prefix),
            PolicyEntry(verdict, v.proxy_port, (v.rule_id,) if v.rule_id else ()))


def as_kernel_holds(key: PolicyKey, entry: PolicyEntry) -> tuple[PolicyKey, PolicyEntry]:
    """What the kernel holds once `sync` wrote this entry: packed and read back (the port's bits
    past its prefix cleared, one rule id kept)."""
    return unpack_policy(*pack_policy(key, entry))


def pack_services(services: dict[tuple[str, int, int], ServiceEntry]) -> dict[str, dict[bytes, tuple[bytes, Any]]]:
    """The lb_services, lb_backends and lb_revnat entries of these services (lib/lb.h):
    raw key -> (raw value, Python key for reports)."""
    out: dict[str, dict[bytes, tuple[bytes, Any]]] = {"lb_services": {}, "lb_backends": {}, "lb_revnat": {}}
    for (ip, port, proto), entry in services.items():
        if not 1 <= entry.rev_nat_index <= 0xFFFF:
            raise ValueError(f"rev-NAT index {entry.rev_nat_index} of {entry.service} is outside 1..65535")
        addr = abi.ipv4_be32(ip)
        key = abi.CLbServiceKey(addr=addr, port=port, proto=proto, slot=0)
        out["lb_services"][bytes(key)] = (bytes(abi.CLbService(
            count=len(entry.backends), rev_nat_index=entry.rev_nat_index,
            flags=abi.LB_F_AFFINITY if entry.affinity else 0)), (ip, port, proto, 0))
        for slot, backend in enumerate(entry.backends, start=1):
            key = abi.CLbServiceKey(addr=addr, port=port, proto=proto, slot=slot)
            out["lb_services"][bytes(key)] = (bytes(abi.CLbService(backend_id=backend.backend_id)),
                                              (ip, port, proto, slot))
            out["lb_backends"][bytes(abi.MAPS["lb_backends"].key(backend.backend_id))] = (
                bytes(abi.CLbBackend(addr=abi.ipv4_be32(backend.ip), port=backend.port)), backend.backend_id)
        out["lb_revnat"][bytes(abi.MAPS["lb_revnat"].key(entry.rev_nat_index))] = (
            bytes(abi.CLbRevNat(addr=addr, port=port)), entry.rev_nat_index)
    return out


def pack_if_binding(ifindex: int, endpoint_id: int) -> tuple[bytes, bytes]:
    """Anti-spoofing: interface `ifindex` may send from endpoint `endpoint_id` (0: a world link)."""
    return bytes(abi.MAPS["if_bind"].key(ifindex)), bytes(abi.CIfBinding(endpoint_id=endpoint_id))


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
    """One flow event from the ring buffer (struct flow_event in dataplane/bpf/lib/maps.h)."""

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
    flags: int = 0  # abi.FLOW_EVENT_F_*
    other_rule_id: int = 0  # a new flow: the rule that allowed it in the direction not reported
    icmp_type: int = 0  # ICMP: the packet's type and code; 0 for other protocols
    icmp_code: int = 0

    @property
    def policy_port(self) -> int:
        """The port a policy lookup of this packet uses: the ICMP type for ICMP (lib/parse.h)."""
        return self.icmp_type if self.protocol == abi.PROTO_ICMP else self.dport

    @property
    def from_proxy(self) -> bool:
        """The L7 proxy's upstream connection: it skipped policy, the event decides nothing."""
        return bool(self.flags & abi.FLOW_EVENT_F_FROM_PROXY)

    @property
    def endpoint_id(self) -> int:
        """The endpoint whose policy the verdict is about."""
        return self.src_endpoint if self.direction == Direction.EGRESS else self.dst_endpoint

    @classmethod
    def decode(cls, raw: bytes) -> "FlowEvent":
        e = abi.CFlowEvent.from_buffer_copy(raw[:ctypes.sizeof(abi.CFlowEvent)])
        return cls(e.ts_ns, str(ipaddress.IPv4Address(e.saddr)), str(ipaddress.IPv4Address(e.daddr)), e.sport,
                   e.dport, e.proto, FlowVerdict(e.verdict), DropReason(e.reason), Direction(e.direction),
                   e.src_identity, e.dst_identity, e.src_endpoint, e.dst_endpoint, e.rule_id, e.proxy_port,
                   e.tcp_flags, Hook(e.hook), e.ifindex, e.pkt_len, e.flags, e.other_rule_id, e.icmp_type, e.icmp_code)


@dataclass(frozen=True)
class TraceEvent:
    """One step of a traced flow from the trace ring buffer (struct trace_event in
    dataplane/bpf/lib/maps.h; the points and their arguments in dataplane/bpf/lib/trace.h)."""

    ts_ns: int
    trace_id: int
    packet_id: int  # one value per program run: the events of one packet share it
    point: abi.TracePoint
    line: int  # __LINE__ of the call that emitted it (dataplane/bpf/...)
    hook: Hook
    protocol: int
    tcp_flags: int
    ifindex: int
    src: str
    dst: str
    sport: int
    dport: int
    args: tuple[int, int, int, int, int]

    @classmethod
    def decode(cls, raw: bytes) -> "TraceEvent":
        e = abi.CTraceEvent.from_buffer_copy(raw[:ctypes.sizeof(abi.CTraceEvent)])
        return cls(e.ts_ns, e.trace_id, e.packet_id, abi.TracePoint(e.point), e.line, Hook(e.hook), e.proto,
                   e.tcp_flags, e.ifindex, str(ipaddress.IPv4Address(e.saddr)), str(ipaddress.IPv4Address(e.daddr)),
                   e.sport, e.dport, tuple(e.arg))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {"ts_ns": self.ts_ns, "trace_id": self.trace_id, "packet_id": self.packet_id,
                "point": self.point.name, "line": self.line, "hook": self.hook.name, "protocol": self.protocol,
                "tcp_flags": self.tcp_flags, "ifindex": self.ifindex, "src": self.src, "dst": self.dst,
                "sport": self.sport, "dport": self.dport, "args": list(self.args)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TraceEvent":
        return cls(d["ts_ns"], d["trace_id"], d["packet_id"], abi.TracePoint[d["point"]], d["line"], Hook[d["hook"]],
                   d["protocol"], d["tcp_flags"], d["ifindex"], d["src"], d["dst"], d["sport"], d["dport"],
                   tuple(d["args"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TraceFlow:
    """A flow to trace (struct trace_key): its packets and their replies emit trace events.
    sport 0 = any source port."""

    src: str
    dst: str
    sport: int
    dport: int
    protocol: int

    def key(self) -> bytes:
        """The trace_flows key; ValueError naming the field that is not what it should be."""
        addrs = []
        for name, value in (("src", self.src), ("dst", self.dst)):
            try:
                addrs.append(abi.ipv4_be32(value))
            except (ValueError, TypeError):
                raise ValueError(f"trace flow {name}: expected an IPv4 address, got {value!r}") from None
        for name, value, top in (("sport", self.sport, 0xFFFF), ("dport", self.dport, 0xFFFF),
                                 ("protocol", self.protocol, 0xFF)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"trace flow {name}: expected an integer 0..{top}, got {value!r}")
        return bytes(abi.CTraceKey(saddr=addrs[0], daddr=addrs[1], sport=self.sport, dport=self.dport,
                                   proto=self.protocol))

    def __str__(self) -> str:
        proto = abi.PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        return f"{self.src}:{self.sport or '*'} -> {self.dst}:{self.dport} {proto}"


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


SKB_CTX_SIZE, SKB_OFF_MARK, SKB_OFF_INGRESS_IFINDEX = abi.SKB_CTX_SIZE, abi.SKB_OFF_MARK, abi.SKB_OFF_INGRESS_IFINDEX
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


def _prog_test_run(test_run_fn: Callable[..., int] | None, fd: int, prog: str, packet: bytes, repeat: int,
                   mark: int, ingress_ifindex: int) -> TestRunResult:
    """BPF_PROG_TEST_RUN of program fd `fd` on one packet (libbpf if present, else the syscall)."""
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 512)
    ctx_in = ctypes.create_string_buffer(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx_in, SKB_OFF_MARK, mark)
    struct.pack_into("<I", ctx_in, SKB_OFF_INGRESS_IFINDEX, ingress_ifindex)
    ctx_out = ctypes.create_string_buffer(SKB_CTX_SIZE)
    if test_run_fn is not None:
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(data_in),
                            data_out=ctypes.addressof(data_out), data_size_in=len(packet),
                            data_size_out=len(data_out), ctx_in=ctypes.addressof(ctx_in),
                            ctx_out=ctypes.addressof(ctx_out), ctx_size_in=SKB_CTX_SIZE,
                            ctx_size_out=SKB_CTX_SIZE, repeat=repeat)
        rc = test_run_fn(fd, ctypes.byref(opts))
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


# -- the loader -----------------------------------------------------------------------------------
class Datapath:
    """Both tc programs, compiled once, and their maps. Use as a context manager or close()."""

    def __init__(self, *, audit: bool = False, debug: bool = False, policy_map_size: int = abi.POLICY_MAP_SIZE,
                 ct_map_size: int = abi.CT_MAP_SIZE, tracing: bool = True) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - the one place l7lab imports bcc
        except ImportError as exc:
            raise SetupError("cannot import bcc: install the distribution's python3-bpfcc and create "
                             "the venv with --system-site-packages (scripts/setup.sh)") from exc
        self.audit = audit
        self.tracing = tracing
        self.defines = abi.c_defines(audit=audit, debug=debug, policy_map_size=policy_map_size,
                                     ct_map_size=ct_map_size, tracing=tracing)
        cflags = _cflags(self.defines)
        try:
            self._bpf = BPF(src_file=str(MAIN_SOURCE).encode(), cflags=cflags)
            self._fns = {name: self._bpf.load_func(name.encode(), BPF.SCHED_CLS) for name in PROGRAMS}
        except Exception as exc:  # BCC raises plain Exception on compile/verifier failure
            raise SetupError(f"BCC could not compile or load dataplane/bpf/datapath.c: {exc}") from exc
        layouts = {**abi.MAPS, **abi.FIXED_MAPS}
        self._tables = {name: self._bpf.get_table(name.encode()) for name in layouts}
        drift = [m for name, layout in layouts.items() for side, mine, theirs in
                 (("key", layout.key, self.map_types(name)[0]), ("value", layout.value, self.map_types(name)[1]))
                 for m in abicheck.map_type_mismatches(name, side, mine, theirs)]
        for ring, (struct_type, _) in abi.RING_BUFFERS.items():
            declared = [(f.name, f.c_type) for f in abicheck.declared_fields(struct_type)]
            compiled = self.ring_buffer_fields(ring)
            if compiled != declared:
                drift.append(f"ring buffer {ring}: fields {declared} in Python, {compiled} in C")
        if drift:
            raise SetupError("layout drift between dataplane/bpf/lib/maps.h and dataplane/abi.py: " + "; ".join(drift))
        # What sync() last wrote, per map: raw key -> (raw value, Python key for reports).
        self._written: dict[str, dict[bytes, tuple[bytes, Any]]] = {"policy": {}, "ipcache": {}, "endpoints": {},
                                                                     "if_bind": {}, "lb_backends": {},
                                                                     "lb_revnat": {}, "lb_services": {}}
        self._events: deque[FlowEvent] = deque(maxlen=EVENT_BACKLOG)
        self._traces: deque[TraceEvent] = deque(maxlen=TRACE_BACKLOG)
        self.events_lost = 0  # flow events read but dropped from a full backlog (the oldest)
        self.traces_lost = 0  # trace events likewise
        self._traced: dict[bytes, tuple[int, TraceFlow]] = {}  # trace_flows as written: key -> (trace id, flow)
        self._bpf[b"events"].open_ring_buffer(self._on_event)
        self._bpf[b"traces"].open_ring_buffer(self._on_trace)
        self._test_run_fn = _load_libbpf_test_run()
        self._closed = False

    # -- programs ---------------------------------------------------------------------------------
    def program_fd(self, name: str) -> int:
        """SCHED_CLS program fd for tc direct-action attach: 'from_container' or 'to_container'."""
        if name not in self._fns:
            raise KeyError(f"no program {name!r}; have {', '.join(PROGRAMS)}")
        return self._fns[name].fd

    def map_types(self, name: str) -> tuple[type, type]:
        """The key and value ctypes BCC derived from map `name` of the compiled program (per-CPU
        maps: one CPU's value)."""
        t = self._tables[name]
        return t.Key, getattr(t, "sLeaf", t.Leaf)

    def ring_buffer_fields(self, name: str = "events") -> list[tuple[str, str]]:
        """(field, C type) of the struct the program writes into ring buffer `name`, as BCC
        recorded it from the compiled source (typedef names kept: "__be32")."""
        return _ring_buffer_fields(self._bpf, name)

    def map_max_entries(self, name: str) -> int:
        """max_entries of map `name` as the kernel created it (a ring buffer: its size in bytes)."""
        table = self._tables[name] if name in self._tables else self._bpf.get_table(name.encode())
        return int(table.max_entries)

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
            for address in (ep.ip, *ep.aliases):
                k, v = pack_endpoint(replace(ep, ip=address))
                desired["endpoints"][k] = (v, address)
        if interfaces is not None:
            desired["if_bind"] = {k: (v, i) for i, e in interfaces.items() for k, v in [pack_if_binding(i, e)]}
        # Services: backends and rev-NAT before the service slots that name them (and removed after).
        desired.update(pack_services(state.services))
        stats = SyncStats()
        order = [m for m in ("policy", "ipcache", "endpoints", "if_bind", "lb_backends", "lb_revnat", "lb_services")
                 if m in desired]
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

    def read_policy(self) -> dict[PolicyKey, PolicyEntry]:
        """The policy map as the kernel holds it now, read back entry by entry (not what `sync`
        remembers writing): `l7lab policy get` compares it with the resolver's map state."""
        table = self._tables["policy"]
        out: dict[PolicyKey, PolicyEntry] = {}
        for k, v in table.items():
            key, entry = unpack_policy(bytes(k), bytes(v))
            out[key] = entry
        return out

    def flush_conntrack(self) -> None:
        """Forget every tracked flow (tests; a lab restart), and every datagram whose later
        fragments were expected (their flow is forgotten with it)."""
        self._tables["conntrack"].clear()
        self._tables["fragments"].clear()
        self._tables["lb_flows"].clear()

    def conntrack_size(self) -> int:
        return len(self._tables["conntrack"].items())

    def open_connections(self) -> set[tuple[str, str]]:
        """(source address, destination address) of every tracked flow still open: not expired
        and, for TCP, no FIN or RST seen. What keeps an expired FQDN address alive (Cilium's
        conntrack garbage collection marks such addresses in use)."""
        now = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()
        out: set[tuple[str, str]] = set()
        for k, v in self._tables["conntrack"].items():
            key, entry = abi.CCtKey.from_buffer_copy(bytes(k)), abi.CCtEntry.from_buffer_copy(bytes(v))
            if entry.expires_ns < now or entry.flags & abi.CT_F_CLOSING:
                continue
            out.add((str(ipaddress.IPv4Address(key.saddr)), str(ipaddress.IPv4Address(key.daddr))))
        return out

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
            k = abi.CMetricsKey.from_buffer_copy(bytes(key))
            verdict, reason, direction = k.verdict, k.reason, k.direction
            pkts = sum(v.packets for v in percpu)
            nbytes = sum(v.bytes for v in percpu)
            out[(FlowVerdict(verdict), DropReason(reason), Direction(direction))] = (pkts, nbytes)
        return out

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        if len(self._events) == self._events.maxlen:
            self.events_lost += 1
        self._events.append(FlowEvent.decode(ctypes.string_at(data, size)))
        return 0

    def _on_trace(self, _ctx: Any, data: Any, size: int) -> int:
        if len(self._traces) == self._traces.maxlen:
            self.traces_lost += 1
        self._traces.append(TraceEvent.decode(ctypes.string_at(data, size)))
        return 0

    def _poll_until(self, backlog: deque[Any], timeout_ms: int) -> list[Any]:
        """Read both ring buffers (one ring_buffer_poll serves both, each callback fills its own
        backlog) until `backlog` has something or timeout_ms passed; hand `backlog` over."""
        deadline = time.monotonic() + timeout_ms / 1000
        # consume, not poll(0): what a program wrote is read even before its wakeup is delivered
        self._bpf.ring_buffer_consume()
        while not backlog:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            self._bpf.ring_buffer_poll(left)
        out = list(backlog)
        backlog.clear()
        return out

    def poll_events(self, timeout_ms: int = 0) -> list[FlowEvent]:
        """Flow events produced since the last call; waits up to timeout_ms for the first one."""
        return self._poll_until(self._events, timeout_ms)

    # -- tracing (dataplane/bpf/lib/trace.h) ------------------------------------------------------
    def trace_start(self, trace_id: int, flows: list[TraceFlow]) -> None:
        """Trace `flows` (their packets and replies) under `trace_id` (1..2^32-1): one trace_flows
        entry per flow, then trace_switch[0] = the number of entries. All or nothing: a flow
        another trace holds, or more entries than TRACE_MAP_SIZE, raise SetupError with nothing
        written; a malformed flow or id raises ValueError."""
        if not self.tracing:
            raise SetupError("this datapath was compiled with TRACING=0: it has no trace points")
        if not isinstance(trace_id, int) or isinstance(trace_id, bool) or not 1 <= trace_id <= 0xFFFFFFFF:
            raise ValueError(f"trace id: expected an integer 1..{0xFFFFFFFF}, got {trace_id!r}")
        new: dict[bytes, TraceFlow] = {}
        for flow in flows:
            key = flow.key()
            held = self._traced.get(key)
            if held is not None and held[0] != trace_id:
                raise SetupError(f"flow {flow} is already traced by trace {held[0]}")
            if held is None:
                new[key] = flow
        size = abi.MAPS["trace_flows"].max_entries
        if len(self._traced) + len(new) > size:
            raise SetupError(f"tracing {len(new)} more flow(s) would exceed TRACE_MAP_SIZE ({size} flows traced "
                             f"at once; {len(self._traced)} are)")
        table = self._tables["trace_flows"]
        value = table.Leaf.from_buffer_copy(bytes(abi.CTraceValue(trace_id=trace_id)))
        written: list[bytes] = []
        try:
            for key, flow in new.items():
                table[table.Key.from_buffer_copy(key)] = value
                written.append(key)
                self._traced[key] = (trace_id, flow)
        except Exception:
            for key in written:  # nothing half applied
                self._traced.pop(key, None)
                try:
                    del table[table.Key.from_buffer_copy(key)]
                except KeyError:
                    pass
            raise
        self._write_trace_switch()

    def trace_stop(self, trace_id: int) -> None:
        """Stop trace `trace_id`: its entries go, trace_switch[0] says how many remain. Idempotent."""
        table = self._tables["trace_flows"]
        for key in [k for k, (tid, _) in self._traced.items() if tid == trace_id]:
            try:
                del table[table.Key.from_buffer_copy(key)]
            except KeyError:
                pass  # already gone: the goal is reached
            del self._traced[key]
        self._write_trace_switch()

    def traced_flows(self) -> dict[int, list[TraceFlow]]:
        """The flows being traced, by trace id."""
        out: dict[int, list[TraceFlow]] = {}
        for trace_id, flow in self._traced.values():
            out.setdefault(trace_id, []).append(flow)
        return out

    def _write_trace_switch(self) -> None:
        table = self._tables["trace_switch"]
        table[table.Key(0)] = table.Leaf(len(self._traced))

    def poll_traces(self, timeout_ms: int = 0) -> list[TraceEvent]:
        """Trace events (any trace) produced since the last call; waits up to timeout_ms for the
        first one."""
        return self._poll_until(self._traces, timeout_ms)

    # -- BPF_PROG_TEST_RUN ------------------------------------------------------------------------
    def test_run(self, prog: str, packet: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
        """Run a program on one packet (BPF_PROG_TEST_RUN): (retval, packet out, ns per run)."""
        r = self.test_run_full(prog, packet, repeat)
        return r.retval, r.data, r.duration_ns

    def test_run_full(self, prog: str, packet: bytes, repeat: int = 1, *, mark: int = 0,
                      ingress_ifindex: int = 0) -> TestRunResult:
        """As test_run, with skb->mark and skb->ingress_ifindex set on the way in and the mark read
        back. The packet runs in the caller's network namespace (socket lookups happen there)."""
        return _prog_test_run(self._test_run_fn, self.program_fd(prog), prog, packet, repeat, mark,
                              ingress_ifindex)

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Unload programs and maps (attached filters keep their own reference)."""
        if not self._closed:
            self._closed = True
            try:
                # Attached programs outlive this object: leave them nothing to trace.
                for trace_id in {tid for tid, _ in self._traced.values()}:
                    self.trace_stop(trace_id)
            finally:
                self._bpf.cleanup()

    def __enter__(self) -> "Datapath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ring_buffer_fields(bpf: Any, name: str) -> list[tuple[str, str]]:
    from bcc import lib  # noqa: PLC0415 - the loader is the one place l7lab imports bcc

    rows = [lib.bpf_perf_event_field(bpf.module, name.encode(), i).decode()
            for i in range(lib.bpf_perf_event_fields(bpf.module, name.encode()))]
    return [(field, c_type) for field, c_type in (row.split("#", 1) for row in rows)]


def probe_c_abi(constants: list[str], structs: list[type[ctypes.Structure]],
                defines: dict[str, int] | None = None) -> abicheck.ProbeResult:
    """Ask the compiler what the datapath's headers say: compile `abicheck.probe_source` with the
    datapath's include path and cflags, run it once (BPF_PROG_TEST_RUN, needs root) and return
    the value of each constant expression and, per struct, its size and fields (abicheck.read_probe)."""
    from bcc import BPF  # noqa: PLC0415 - the loader is the one place l7lab imports bcc

    source = abicheck.probe_source(constants, structs)
    # The probe includes parse.h for its constants, not for its functions: their accessors stay undefined.
    cflags = [*_cflags(defines if defines is not None else abi.c_defines()), "-Wno-undefined-internal"]
    bpf = BPF(text=source.encode(), cflags=cflags)
    try:
        fn = bpf.load_func(b"abi_probe", BPF.SCHED_CLS)
        _prog_test_run(_load_libbpf_test_run(), fn.fd, "abi_probe", bytes(64), 1, 0, 0)
        table = bpf.get_table(b"abi_values")
        values = [int(table[table.Key(i)].value) for i in range(len(table))]
        field_types = {s.c_name: _ring_buffer_fields(bpf, f"abi_t_{s.c_name}")  # type: ignore[attr-defined]
                       for s in structs}
        return abicheck.read_probe(constants, structs, values, field_types)
    finally:
        bpf.cleanup()



# -- kernel capability probes (the setup self-check, dataplane/selfcheck.py) ----------------------
class ProgramRefused(SetupError):
    """The kernel refused to load a probe program; `reason` is the verifier's own last word."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"the kernel refused program {name}: {reason}")
        self.reason = reason


def probe_map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> None:
    """Ask the kernel for one map of kind `map_type` (BPF_MAP_TYPE_*) and close it at once;
    OSError with the kernel's errno when it refuses. libbcc's bcc_create_map raises
    RLIMIT_MEMLOCK and retries, as BCC does for the lab's own maps on kernels before 5.11."""
    try:
        create = ctypes.CDLL("libbcc.so.0", use_errno=True).bcc_create_map
    except (OSError, AttributeError) as exc:
        raise SetupError(f"cannot use libbcc.so.0 (python3-bpfcc): {exc}") from exc
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    fd = create(map_type, b"l7lab_probe", key_size, value_size, max_entries, flags)
    if fd < 0:
        err = -fd if fd < -1 else ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(fd)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what C code writes on fd 2 in the body (BCC prints the verifier's log there)
    into the yielded list, instead of the terminal."""
    saved = os.dup(2)
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _verifier_reason(log: str) -> str:
    """The line of a verifier log that says why: the last one before the statistics."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith("processed ")
             and not ln.startswith("bpf: Failed to load program")]
    return lines[-1] if lines else ""


class ProbeBuild:
    """One BCC compile of a probe source whose tc programs are then loaded one at a time, each
    accepted or refused by the verifier on its own (the setup self-check). Context manager."""

    def __init__(self, source: str) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - the loader is the one place l7lab imports bcc
        except ImportError as exc:
            raise SetupError("cannot import bcc: install the distribution's python3-bpfcc and create "
                             "the venv with --system-site-packages (scripts/setup.sh)") from exc
        self._prog_type = BPF.SCHED_CLS
        try:
            self._bpf = BPF(text=source.encode(), cflags=["-Wno-unused-function"])
        except Exception as exc:  # BCC raises plain Exception on compile failure
            raise SetupError(f"BCC could not compile the probe programs: {exc}") from exc

    def load(self, name: str) -> int:
        """Load program `name` (SCHED_CLS) and return its fd; ProgramRefused if the kernel says no."""
        with _stderr_captured() as log:
            try:
                return int(self._bpf.load_func(name.encode(), self._prog_type).fd)
            except Exception as exc:  # BCC raises plain Exception when the kernel refuses
                failure = exc
        raise ProgramRefused(name, _verifier_reason(log[0]) or str(failure))

    def test_run(self, fd: int, name: str, packet: bytes, mark: int = 0) -> TestRunResult:
        """BPF_PROG_TEST_RUN of a loaded program on one packet, with skb->mark set on the way in."""
        return _prog_test_run(_load_libbpf_test_run(), fd, name, packet, 1, mark, 0)

    def close(self) -> None:
        self._bpf.cleanup()

    def __enter__(self) -> "ProbeBuild":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Datapath", "FlowEvent", "ProbeBuild", "ProgramRefused", "SyncStats", "TestRunResult", "TraceEvent",
           "TraceFlow", "probe_c_abi", "probe_map_create"]
