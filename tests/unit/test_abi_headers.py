"""dataplane/abi.py and dataplane/bpf/lib/*.h declare the same constants and structs, and the checks of
dataplane/abicheck.py that say so fail when they should.

The unit tier reads the headers as text (no compiler): every number a header defines is either
declared in abi.py with the same value or listed as the C side's own; the enums of drop.h match
member for member; every struct of maps.h is declared. tests/kernel/test_abi_compiled.py compiles the
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
from dataplane.datapath import FlowEvent, pack_endpoint, pack_ipcache, pack_policy
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
