"""The compiler and dataplane/abi.py agree on every shared constant and every struct field.

A small program over the datapath's own headers and cflags (abicheck.probe_source, compiled and run
once by datapath.probe_c_abi) reports the value of each constant, and the size, offset and C
type of each field of each struct; the session's compiled datapath reports the key and value
types of each map and the fields of its flow events. Each test also feeds the same checker a
deliberately wrong declaration and expects it to complain, so a checker that cannot fail would
fail here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dataplane import abi, abicheck
from tests.conftest import require_kernel

pytestmark = pytest.mark.kernel

ProbeResult = abicheck.ProbeResult


@pytest.fixture(scope="module")
def compiled() -> Iterator[ProbeResult]:
    require_kernel()
    from dataplane.datapath import probe_c_abi  # noqa: PLC0415 - imports bcc

    yield probe_c_abi([*abi.C_CONSTANTS, *abi.c_defines()], list(abi.STRUCTS))


def test_every_constant_matches_the_compiler(compiled: ProbeResult) -> None:
    values, _ = compiled
    declared = {**abi.C_CONSTANTS, **abi.c_defines()}
    assert abicheck.constant_mismatches(declared, values) == []
    wrong = {**declared, "MARK_MAGIC_FROM_PROXY": 0xB00, "REASON_SOURCE_SPOOFED": 11, "IPPROTO_SCTP": 133}
    assert abicheck.constant_mismatches(wrong, values) == [
        "IPPROTO_SCTP: 133 in Python, 132 in C", "MARK_MAGIC_FROM_PROXY: 2816 in Python, 2560 in C",
        "REASON_SOURCE_SPOOFED: 11 in Python, 10 in C"]


@pytest.mark.parametrize("struct", abi.STRUCTS, ids=lambda s: s.c_name)
def test_every_struct_field_matches_the_compiler(compiled: ProbeResult, struct: type) -> None:
    size, fields = compiled[1][struct.c_name]
    assert [f.name for f in fields] == [name for name, _ in struct._fields_]
    assert abicheck.struct_mismatches(struct, fields, size) == []


def test_struct_check_catches_a_swap_of_same_size_fields(compiled: ProbeResult) -> None:
    size, fields = compiled[1]["flow_event"]
    rows = [(f.name, t, f.offset) for f, (_, t) in zip(abicheck.declared_fields(abi.CFlowEvent), abi.CFlowEvent._fields_)]
    names = [r[0] for r in rows]
    i, j = names.index("src_identity"), names.index("dst_identity")
    rows[i], rows[j] = (rows[j][0], rows[i][1], rows[i][2]), (rows[i][0], rows[j][1], rows[j][2])
    swapped = abi.c_struct("flow_event", size, rows)
    assert any("src_identity" in m for m in abicheck.struct_mismatches(swapped, fields, size))
    ct_size, ct_fields = compiled[1]["ct_key"]
    host_order = abi.c_struct("ct_key", 16, [("saddr", abi.BE32, 0), ("daddr", abi.BE32, 4), ("sport", abi.BE16, 8),
                                             ("dport", abi.U16, 10), ("proto", abi.U8, 12), ("pad", abi.U8 * 3, 13)])
    assert abicheck.struct_mismatches(host_order, ct_fields, ct_size) == [
        "struct ct_key.dport: type u16 in Python, __be16 in C"]


def test_every_map_of_the_loaded_datapath_has_the_declared_types(datapath) -> None:  # noqa: ANN001 - fixture
    for name, layout in {**abi.MAPS, **abi.FIXED_MAPS}.items():
        key, value = datapath.map_types(name)
        assert abicheck.map_type_mismatches(name, "key", layout.key, key) == []
        assert abicheck.map_type_mismatches(name, "value", layout.value, value) == []
        assert datapath.map_max_entries(name) == layout.max_entries
    _, value = datapath.map_types("policy")
    wrong = abi.c_struct("policy_value", 8, [("verdict", abi.U8, 0), ("pad", abi.U8, 1), ("proxy_port", abi.U16, 2),
                                              ("rule", abi.U32, 4)])
    assert abicheck.map_type_mismatches("policy", "value", wrong, value) != []


def test_the_flow_events_of_the_loaded_datapath_have_the_declared_fields(datapath) -> None:  # noqa: ANN001
    fields = datapath.ring_buffer_fields("events")
    assert fields == [(f.name, f.c_type) for f in abicheck.declared_fields(abi.CFlowEvent)]


def test_both_ring_buffers_carry_their_declared_struct(datapath) -> None:  # noqa: ANN001
    for name, (struct, pages) in abi.RING_BUFFERS.items():
        assert datapath.ring_buffer_fields(name) == [(f.name, f.c_type) for f in abicheck.declared_fields(struct)]
        assert datapath.map_max_entries(name) == abi.c_defines()[pages] * 4096  # a ring buffer's size in bytes
    # a trace event is not a flow event: the check tells them apart
    assert datapath.ring_buffer_fields("traces") != [(f.name, f.c_type) for f in abicheck.declared_fields(abi.CFlowEvent)]


def test_the_trace_enums_and_structs_are_compiled_as_declared(compiled: ProbeResult) -> None:
    values, layouts = compiled
    for prefix, members in (("TRACE_", abi.TracePoint), ("TRACE_SIDE_", abi.TraceSide),
                            ("TRACE_ID_FROM_", abi.IdentityOrigin), ("TRACE_SK_", abi.TraceSocket),
                            ("CT_", abi.CtResult)):
        assert {m.name: values[f"{prefix}{m.name}"] for m in members} == {m.name: m.value for m in members}
    for struct in (abi.CTraceKey, abi.CTraceValue, abi.CTraceEvent):
        size, fields = layouts[struct.c_name]
        assert abicheck.struct_mismatches(struct, fields, size) == []
    size, fields = layouts["trace_event"]
    swap = {"point": "line", "line": "point"}  # two u16 side by side: only the names tell them apart
    swapped = abi.c_struct("trace_event", 64, [(swap.get(n, n), t, getattr(abi.CTraceEvent, n).offset)
                                               for n, t in abi.CTraceEvent._fields_])
    assert any("point" in m for m in abicheck.struct_mismatches(swapped, fields, size))
