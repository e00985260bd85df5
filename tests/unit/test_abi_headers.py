"""dataplane/abi.py and dataplane/bpf/lib/*.h declare the same constants and structs, and the checks of
dataplane/abicheck.py that say so fail when they should.

The unit tier reads the headers as text (no compiler): every number a header defines is either
declared in abi.py with the same value or listed as the C side's own; the enums of drop.h and
trace.h match member for member; every struct of maps.h is declared; every trace point is
emitted, each by TRACE( calls that name it on their own line (the line a trace event carries). tests/kernel/test_abi_compiled.py compiles the
headers and compares values, field types, offsets and sizes with what the compiler produced.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from dataplane import abi, abicheck
from dataplane.abi import DropReason, FlowVerdict, Hook
from dataplane.abicheck import CField
from dataplane.bpfsource import BPF_DIR
from dataplane.datapath import FlowEvent, TraceEvent, TraceFlow, pack_endpoint, pack_ipcache, pack_policy
from dataplane.mapstate import EndpointState, PolicyEntry, PolicyKey

SOURCES = sorted([*(BPF_DIR / "lib").glob("*.h"), *BPF_DIR.glob("*.c")])
REPO = Path(abi.__file__).resolve().parent.parent


def _text(name: str) -> str:
    return (BPF_DIR / "lib" / name).read_text()


def test_every_number_a_header_defines_is_declared_in_abi() -> None:
    assert SOURCES, f"no C sources under {BPF_DIR}"
    seen: dict[str, int] = {}
    for path in SOURCES:
        for name, value in abicheck.header_constants(path.read_text()).items():
            seen[name] = value
            if name in abi.C_PRIVATE_NAMES:
                continue
            assert name in abi.C_CONSTANTS, f"{path.name} defines {name} = {value}, dataplane/abi.py does not"
            assert abi.C_CONSTANTS[name] == value, f"{name}: {value} in {path.name}, {abi.C_CONSTANTS[name]} in abi.py"
    # and the other way round: what abi.py says the headers define, they define (IPPROTO_* and
    # the __sk_buff layout come from the kernel's headers, checked by the kernel tier)
    ours = {n for n in abi.C_CONSTANTS if re.fullmatch(r"[A-Z0-9_]+", n) and not n.startswith("IPPROTO_")}
    assert ours - set(seen) == set()


def test_drop_header_enums_mirror_abi() -> None:
    found = abicheck.header_constants(_text("drop.h"))
    assert {n[len("REASON_"):]: v for n, v in found.items() if n.startswith("REASON_")} == \
        {r.name: r.value for r in DropReason}
    assert {n[len("VERDICT_"):]: v for n, v in found.items() if n.startswith("VERDICT_")} == \
        {v.name: v.value for v in FlowVerdict}
    hooks = abicheck.header_constants(_text("common.h"))
    assert {n[len("HOOK_"):]: v for n, v in hooks.items() if n.startswith("HOOK_")} == {h.name: h.value for h in Hook}


def test_tunables_come_only_from_abi() -> None:
    """The headers give the tunables no value of their own and refuse to compile without them."""
    common = _text("common.h")
    defined = {name for path in SOURCES for name in abicheck.header_constants(path.read_text())}
    for name in abi.c_defines():
        assert name not in defined, f"{name} has a value in a header: it belongs to abi.c_defines()"
        assert f"!defined({name})" in common, f"common.h does not insist on -D{name}"
    datapath_c = (BPF_DIR / "datapath.c").read_text()
    for name, layout in abi.MAPS.items():
        assert re.search(rf"\b{name}\b[^;]*\b{layout.size_define}\)", datapath_c), \
            f"map {name} is not sized by {layout.size_define}"


def test_every_struct_of_maps_h_is_declared() -> None:
    assert set(abicheck.header_structs(_text("maps.h"))) == {s.c_name for s in abi.STRUCTS}


def test_declared_offsets_are_checked_on_import() -> None:
    with pytest.raises(TypeError, match="at 1"):
        abi.c_struct("bad", 4, [("a", abi.U8, 0), ("b", abi.U16, 1)])  # C would put b at 2
    with pytest.raises(TypeError, match="8 bytes"):
        abi.c_struct("short", 8, [("a", abi.U32, 0)])


def test_struct_check_finds_swapped_retyped_and_moved_fields() -> None:
    compiled = abicheck.declared_fields(abi.CCtKey)  # what a compiler reports for the real struct
    assert abicheck.struct_mismatches(abi.CCtKey, compiled, 16) == []
    swapped = abi.c_struct("ct_key", 16, [("saddr", abi.BE32, 0), ("daddr", abi.BE32, 4), ("dport", abi.BE16, 8),
                                          ("sport", abi.BE16, 10), ("proto", abi.U8, 12), ("pad", abi.U8 * 3, 13)])
    assert any("fields" in m for m in abicheck.struct_mismatches(swapped, compiled, 16))
    host_order = abi.c_struct("ct_key", 16, [("saddr", abi.BE32, 0), ("daddr", abi.BE32, 4), ("sport", abi.U16, 8),
                                             ("dport", abi.BE16, 10), ("proto", abi.U8, 12), ("pad", abi.U8 * 3, 13)])
    assert abicheck.struct_mismatches(host_order, compiled, 16) == ["struct ct_key.sport: type u16 in Python, __be16 in C"]
    moved = [CField(f.name, f.c_type, f.offset + (1 if f.name == "proto" else 0), f.size) for f in compiled]
    assert abicheck.struct_mismatches(abi.CCtKey, moved, 16) == [
        "struct ct_key.proto: offset 12 size 1 in Python, offset 13 size 1 in C"]
    assert abicheck.struct_mismatches(abi.CCtKey, compiled, 20) == ["struct ct_key: Python has 16 bytes, C has 20"]


def test_map_type_check_compares_field_by_field() -> None:
    class BccEndpointInfo(ctypes.Structure):  # the shape BCC derives from a map: packed, host order
        _pack_ = 1
        _fields_ = [("identity", ctypes.c_uint), ("endpoint_id", ctypes.c_ushort), ("flags", ctypes.c_ubyte),
                    ("pad", ctypes.c_ubyte)]

    class BccSwapped(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("identity", ctypes.c_uint), ("endpoint_id", ctypes.c_ushort), ("pad", ctypes.c_ubyte),
                    ("flags", ctypes.c_ubyte)]

    assert abicheck.map_type_mismatches("endpoints", "value", abi.CEndpointInfo, BccEndpointInfo) == []
    assert abicheck.map_type_mismatches("endpoints", "value", abi.CEndpointInfo, BccSwapped) != []
    assert abicheck.map_type_mismatches("endpoints", "key", abi.BE32, ctypes.c_uint) == []
    assert abicheck.map_type_mismatches("endpoints", "key", abi.BE32, ctypes.c_ushort) != []


def test_constant_check_finds_changed_and_missing_values() -> None:
    compiled = dict(abi.C_CONSTANTS)
    assert abicheck.constant_mismatches(abi.C_CONSTANTS, compiled) == []
    compiled["MARK_MAGIC_DECIDED"] = 0xD00
    del compiled["REASON_FRAGMENT"]
    assert abicheck.constant_mismatches(abi.C_CONSTANTS, compiled) == [
        "MARK_MAGIC_DECIDED: 3584 in Python, 3328 in C", "REASON_FRAGMENT: 9 in Python, not evaluated on the C side"]


def test_probe_program_asks_for_every_constant_and_field() -> None:
    structs = [abi.CIfBinding, abi.CMetricsKey]
    source = abicheck.probe_source(["MARK_MAGIC_MASK", "IPPROTO_TCP"], structs)
    assert "(u64)(MARK_MAGIC_MASK)" in source and "__builtin_offsetof(struct metrics_key, direction)" in source
    assert "abi_t_if_binding.ringbuf_output" in source
    values = [0xF00, 6, 4, 0, 2, 2, 2, 4, 0, 1, 1, 1, 2, 1, 3, 1]
    types = {"if_binding": [("endpoint_id", "u16"), ("pad", "u16")],
             "metrics_key": [("verdict", "u8"), ("reason", "u8"), ("direction", "u8"), ("pad", "u8")]}
    consts, layouts = abicheck.read_probe(["MARK_MAGIC_MASK", "IPPROTO_TCP"], structs, values, types)
    assert consts == {"MARK_MAGIC_MASK": 0xF00, "IPPROTO_TCP": 6}
    assert layouts["if_binding"] == (4, [CField("endpoint_id", "u16", 0, 2), CField("pad", "u16", 2, 2)])
    assert abicheck.struct_mismatches(abi.CMetricsKey, layouts["metrics_key"][1], layouts["metrics_key"][0]) == []


def test_packing_goes_through_the_declared_structs() -> None:
    k, v = pack_policy(PolicyKey(7, abi.Direction.EGRESS, 300, abi.PROTO_TCP, 8080, 16),
                       PolicyEntry(abi.Verdict.REDIRECT, abi.PROXY_PORT, (9,)))
    assert k == (80).to_bytes(4, "little") + (300).to_bytes(4, "little") + (7).to_bytes(2, "little") + \
        bytes([1, 6]) + (8080).to_bytes(2, "big") + bytes(2)
    assert v == bytes([2, 0]) + abi.PROXY_PORT.to_bytes(2, "little") + (9).to_bytes(4, "little")
    assert pack_ipcache("10.0.0.0/8", 2) == (bytes([8, 0, 0, 0, 10, 0, 0, 0]), bytes([2, 0, 0, 0, 0, 0, 0, 0]))
    ek, ev = pack_endpoint(EndpointState(3, "a/b", "10.1.2.3", 256, True, False, True))
    assert (ek, ev) == (bytes([10, 1, 2, 3]), bytes([0, 1, 0, 0, 3, 0, 5, 0]))


def test_flow_event_decodes_through_the_declared_struct() -> None:
    raw = abi.CFlowEvent(ts_ns=5, saddr=abi.ipv4_be32("10.0.0.1"), daddr=abi.ipv4_be32("203.0.113.7"), sport=1234,
                         dport=80, proto=6, verdict=1, reason=2, direction=1, src_identity=256, dst_identity=2,
                         src_endpoint=1, rule_id=4, tcp_flags=abi.TCPF_SYN, hook=0, ifindex=9, pkt_len=60)
    ev = FlowEvent.decode(bytes(raw))
    assert (ev.src, ev.dst, ev.sport, ev.dport, ev.verdict, ev.reason, ev.direction, ev.length) == (
        "10.0.0.1", "203.0.113.7", 1234, 80, FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY,
        abi.Direction.EGRESS, 60)
    assert bytes(raw)[8:12] == bytes([10, 0, 0, 1])  # network order, as the datapath writes it


def test_from_proxy_mark_round_trip() -> None:
    for identity in (1, 256, 0xFFFF, 0x10000, (1 << 24) + 5):
        mark = abi.from_proxy_mark(identity)
        assert mark & abi.MARK_MAGIC_MASK == abi.MARK_MAGIC_FROM_PROXY
        assert abi.identity_of_mark(mark) == identity & 0xFFFFFF
    assert abi.identity_of_mark(abi.MARK_MAGIC_TO_PROXY | (15001 << 16)) is None


_ABI_NAME = re.compile(r"^(?:(MARK_MAGIC_\w+|EP_F_\w+|CT_F_\w+|FLOW_EVENT_F_\w+|IDENTITY_\w+|PROTO_\w+|PROXY_PORT|POLICY_\w+_PREFIX|"
                       r"TCPF_\w+|TO_PROXY_\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)"
                       r"|(PROTOCOLS|PROTOCOL_NAMES|TCP_FLAG_NAMES|RESERVED_IDENTITIES)\s*(?::[^=]*)?=\s*[{(\[])",
                       re.MULTILINE)


def test_no_other_module_writes_an_abi_value_again() -> None:
    """The value of a shared constant is written in abi.py only; everything else imports it."""
    again = [f"{path.relative_to(REPO)}: {m.group(0)}" for top in ("dataplane", "proxy", "l7")
             for path in sorted((REPO / top).rglob("*.py")) if path.name != "abi.py"
             for m in _ABI_NAME.finditer(path.read_text())]
    assert again == []


# -- per-flow tracing (lib/trace.h) -----------------------------------------------------------
def test_trace_header_enums_mirror_abi() -> None:
    trace_h = _text("trace.h")
    points = abicheck.header_enum(trace_h, "trace_point")
    assert {n[len("TRACE_"):]: v for n, v in points.items()} == {p.name: p.value for p in abi.TracePoint}
    found = abicheck.header_constants(trace_h)
    for prefix, members in (("TRACE_SIDE_", abi.TraceSide), ("TRACE_ID_FROM_", abi.IdentityOrigin),
                            ("TRACE_SK_", abi.TraceSocket)):
        assert {n[len(prefix):]: v for n, v in found.items() if n.startswith(prefix)} == \
            {m.name: m.value for m in members}, prefix
    results = {n: v for n, v in abicheck.header_constants(_text("conntrack.h")).items()
               if n.startswith("CT_") and not n.startswith("CT_F_") and not n.startswith("CT_LIFETIME")}
    assert results == {f"CT_{r.name}": r.value for r in abi.CtResult}
    # and the checker reads an enum block, not the names around it
    assert abicheck.header_enum("enum x {\n\tA = 1,\n\tB = 2,   /* b */\n};\n#define C 3\n", "x") == {"A": 1, "B": 2}
    assert abicheck.header_enum(trace_h, "no_such_enum") == {}


def test_the_trace_maps_and_ring_buffers_are_sized_as_declared() -> None:
    datapath_c = (BPF_DIR / "datapath.c").read_text()
    for name, layout in abi.FIXED_MAPS.items():
        assert re.search(rf"\b{name}\b[^;]*,\s*{layout.max_entries}\);", datapath_c), \
            f"map {name} is not declared with {layout.max_entries} entries"
    for name, (struct, pages) in abi.RING_BUFFERS.items():
        assert re.search(rf"BPF_RINGBUF_OUTPUT\({name},\s*{pages}\);", datapath_c), f"{name} is not sized by {pages}"
        assert re.search(rf"{name}\.ringbuf_output\(\w+, sizeof\(\*\w+\), 0\)", datapath_c)
        assert f"struct {struct.c_name} *" in datapath_c, f"{name} does not carry struct {struct.c_name}"
    assert abi.MAPS["trace_flows"].max_entries == abi.TRACE_MAP_SIZE


def _trace_calls() -> list[tuple[str, int, str | None]]:
    return [(path.name, line, token) for path in SOURCES for line, token in abicheck.trace_calls(path.read_text())]


def test_every_trace_call_names_its_point_on_its_own_line() -> None:
    calls = _trace_calls()
    assert calls, "no TRACE( call in the datapath's sources"
    points = {f"TRACE_{p.name}" for p in abi.TracePoint}
    bad = [(name, line, token) for name, line, token in calls if token not in points]
    assert bad == [], "TRACE( calls that do not name a TracePoint (TRACE_<POINT>) on their line"
    # and the checker sees through what a reader would not call a trace point
    assert abicheck.trace_calls("/* TRACE(t, TRACE_HOOK, 0) */\n#define TRACE(t, p) x\nTRACE(t,\n") == [(3, None)]


def test_every_trace_point_is_emitted_and_each_line_names_one_place() -> None:
    calls = _trace_calls()
    emitted = {token for _, _, token in calls}
    assert {f"TRACE_{p.name}" for p in abi.TracePoint} - emitted == set()
    # A trace event carries its point and line, not its file: (point, line) must pick one source.
    places: dict[tuple[str | None, int], list[str]] = {}
    for name, line, token in calls:
        places.setdefault((token, line), []).append(name)
    assert {k: v for k, v in places.items() if len(v) > 1} == {}
    assert all(line <= 0xFFFF for _, line, _ in calls)  # struct trace_event.line is a u16


def test_trace_flow_keys_and_events_go_through_the_declared_structs() -> None:
    key = TraceFlow("10.0.0.1", "10.0.0.2", 0, 8080, abi.PROTO_TCP).key()
    assert key == bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 0]) + (8080).to_bytes(2, "big") + bytes([6, 0, 0, 0])
    for bad, field in ((TraceFlow("10.0.0.256", "10.0.0.2", 0, 80, 6), "src"),
                       (TraceFlow("10.0.0.1", "fd00::1", 0, 80, 6), "dst"),
                       (TraceFlow("10.0.0.1", "10.0.0.2", -1, 80, 6), "sport"),
                       (TraceFlow("10.0.0.1", "10.0.0.2", 0, 65536, 6), "dport"),
                       (TraceFlow("10.0.0.1", "10.0.0.2", 0, 80, 256), "protocol")):
        with pytest.raises(ValueError, match=f"trace flow {field}: expected"):
            bad.key()
    raw = abi.CTraceEvent(ts_ns=9, trace_id=5, packet_id=77, point=int(abi.TracePoint.PROXY_ASSIGN), line=65,
                          hook=0, proto=6, tcp_flags=abi.TCPF_SYN, ifindex=4, saddr=abi.ipv4_be32("10.0.0.1"),
                          daddr=abi.ipv4_be32("10.0.0.2"), sport=40000, dport=8080)
    raw.arg[:] = [0, 2, abi.MARK_MAGIC_TO_PROXY | abi.PROXY_PORT << 16, abi.PROXY_PORT, 0]
    ev = TraceEvent.decode(bytes(raw))
    assert (ev.point, ev.line, ev.hook, ev.src, ev.dst, ev.sport, ev.dport, ev.args[1]) == (
        abi.TracePoint.PROXY_ASSIGN, 65, Hook.FROM_CONTAINER, "10.0.0.1", "10.0.0.2", 40000, 8080,
        abi.TraceSocket.LISTENER)
    assert TraceEvent.from_json(ev.to_json()) == ev
