"""Comparing the declarations of dataplane/abi.py with the C side (dataplane/bpf/lib/*.h).

Responsibility: the checker functions (each returns the list of differences, empty when both
sides agree), the probe program that makes the compiler tell what it sees, and the reading of
the headers as text. The model is Cilium's pkg/datapath/alignchecker. Used by the loader at
start-up (map types), by tests/kernel/test_abi_compiled.py (the compiler's answer, through
datapath.probe_c_abi) and by tests/unit/test_abi_headers.py (the headers' text).

Pure Python, no bcc.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .abi import c_type_name


@dataclass(frozen=True)
class CField:
    """One field of a struct as the compiler laid it out."""

    name: str
    c_type: str  # as the compiler spells it: "u16", "__be32", "u8[3]"
    offset: int
    size: int


def declared_fields(struct: type[ctypes.Structure]) -> list[CField]:
    """The fields of a declared struct in the form the compiler's are read in."""
    return [CField(name, c_type_name(ctype), getattr(struct, name).offset, ctypes.sizeof(ctype))
            for name, ctype in struct._fields_]


def _normal_c_type(spelling: str) -> str:
    return re.sub(r"\s+", "", spelling)


def struct_mismatches(struct: type[ctypes.Structure], compiled: list[CField], compiled_size: int) -> list[str]:
    """Every difference between a declared struct and the compiled one: field names in order,
    C types (so byte order too), offsets, sizes, and the total size. Empty when they agree."""
    name = struct.c_name  # type: ignore[attr-defined]
    out: list[str] = []
    if ctypes.sizeof(struct) != compiled_size:
        out.append(f"struct {name}: Python has {ctypes.sizeof(struct)} bytes, C has {compiled_size}")
    mine = declared_fields(struct)
    if [f.name for f in mine] != [f.name for f in compiled]:
        out.append(f"struct {name}: fields {[f.name for f in mine]} in Python, {[f.name for f in compiled]} in C")
    by_name = {f.name: f for f in compiled}
    for f in mine:
        c = by_name.get(f.name)
        if c is None:
            continue
        if _normal_c_type(c.c_type) != f.c_type:
            out.append(f"struct {name}.{f.name}: type {f.c_type} in Python, {c.c_type} in C")
        if (f.offset, f.size) != (c.offset, c.size):
            out.append(f"struct {name}.{f.name}: offset {f.offset} size {f.size} in Python, "
                       f"offset {c.offset} size {c.size} in C")
    return out


def ctypes_fields(ctype: type) -> list[tuple[str, int, int, str]]:
    """(name, offset, size, kind) of each field of a ctypes type, such as the key and value
    types BCC derives from a compiled map; a plain integer type is one unnamed field. `kind` is
    "u8".."u64" or "u8[n]": byte order is lost in BCC's types, so both sides are compared
    without it (struct_mismatches checks byte order against the compiler's own spelling)."""
    def kind(t: type) -> str:
        length = getattr(t, "_length_", None)
        if length is not None:
            return f"{kind(t._type_)}[{length}]"  # type: ignore[attr-defined]
        return f"u{8 * ctypes.sizeof(t)}"
    fields = getattr(ctype, "_fields_", None)
    if fields is None:
        return [("", 0, ctypes.sizeof(ctype), kind(ctype))]
    # BCC adds explicit "__pad_N" members where the compiler left holes; declared structs have none.
    return [(n, getattr(ctype, n).offset, ctypes.sizeof(t), kind(t)) for n, t, *_ in fields
            if not n.startswith("__pad_")]


def map_type_mismatches(name: str, side: str, declared: type, compiled: type) -> list[str]:
    """Differences between the declared key (or value) type of map `name` and the type BCC
    derived from the compiled map."""
    mine, theirs = ctypes_fields(declared), ctypes_fields(compiled)
    out = []
    if ctypes.sizeof(declared) != ctypes.sizeof(compiled):
        out.append(f"map {name} {side}: {ctypes.sizeof(declared)} bytes in Python, {ctypes.sizeof(compiled)} in C")
    if mine != theirs:
        out.append(f"map {name} {side}: fields (name, offset, size, kind) {mine} in Python, {theirs} in C")
    return out


def constant_mismatches(declared: Mapping[str, int], compiled: Mapping[str, int]) -> list[str]:
    """Every constant whose value differs, or that one side lacks."""
    out = []
    for expr in sorted(set(declared) | set(compiled)):
        if expr not in compiled:
            out.append(f"{expr}: {declared[expr]} in Python, not evaluated on the C side")
        elif expr not in declared:
            out.append(f"{expr}: {compiled[expr]} in C, not declared in Python")
        elif int(declared[expr]) != int(compiled[expr]):
            out.append(f"{expr}: {int(declared[expr])} in Python, {int(compiled[expr])} in C")
    return out


PROBE_HEADERS = ("lib/common.h", "lib/drop.h", "lib/maps.h", "lib/parse.h", "lib/trace.h", "lib/conntrack.h")


def probe_source(constants: Iterable[str], structs: Iterable[type[ctypes.Structure]],
                 headers: Iterable[str] = PROBE_HEADERS) -> str:
    """A small BPF program over the datapath's own headers that makes the compiler tell what it
    sees. Slot i of the array `abi_values` gets the value of constants[i], then, per struct, its
    sizeof and the offsetof and sizeof of each field (in declaration order). Each struct also
    gets a ring buffer it is (never) written to: BCC records the field names and C types of what
    is passed to ringbuf_output, which is how the check reads the compiler's field types."""
    exprs = list(constants)
    structs = list(structs)
    for s in structs:
        c = f"struct {s.c_name}"  # type: ignore[attr-defined]
        exprs.append(f"sizeof({c})")
        for name, _ in s._fields_:
            exprs += [f"__builtin_offsetof({c}, {name})", f"sizeof((({c} *)0)->{name})"]
    lines = [f'#include "{h}"' for h in headers]
    lines.append(f"BPF_ARRAY(abi_values, u64, {len(exprs)});")
    lines += [f"BPF_RINGBUF_OUTPUT(abi_t_{s.c_name}, 1);" for s in structs]  # type: ignore[attr-defined]
    lines += ["int abi_probe(struct __sk_buff *skb)", "{", "\tu32 k;", "\tu64 *slot;"]
    for i, e in enumerate(exprs):
        lines.append(f"\tk = {i}; slot = abi_values.lookup(&k); if (slot) *slot = (u64)({e});")
    lines.append("\tif (skb->len == 0) {   /* never: these calls exist for their types */")
    for s in structs:
        n = s.c_name  # type: ignore[attr-defined]
        lines.append(f"\t\t{{ struct {n} v = {{}}; abi_t_{n}.ringbuf_output(&v, sizeof(v), 0); }}")
    lines += ["\t}", "\treturn 0;", "}"]
    return "\n".join(lines) + "\n"


ProbeResult = tuple[dict[str, int], dict[str, tuple[int, list[CField]]]]
"""Constants by C expression, and per struct name its size and fields."""


def read_probe(constants: list[str], structs: list[type[ctypes.Structure]], values: list[int],
               field_types: Mapping[str, list[tuple[str, str]]]) -> ProbeResult:
    """Turn what the probe of `probe_source(constants, structs)` produced into constants by
    expression and, per struct name, (size, fields). `field_types` is, per struct, the (name, C
    type) list BCC recorded for its ring buffer."""
    it = iter(values)
    consts = {e: next(it) for e in constants}
    layouts: dict[str, tuple[int, list[CField]]] = {}
    for s in structs:
        size = next(it)
        places = [(next(it), next(it)) for _ in s._fields_]
        types = list(field_types.get(s.c_name, []))  # type: ignore[attr-defined]
        fields = [CField(name, c_type, off, sz) for (name, c_type), (off, sz) in zip(types, places)]
        layouts[s.c_name] = (size, fields)  # type: ignore[attr-defined]
    return consts, layouts


# -- reading the headers (the unit tier's check, no compiler needed) ----------------------------
_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Z][A-Z0-9_]*)\s+\(?(-?(?:0x[0-9a-fA-F]+|\d+))\)?\s*(?:/\*.*)?$",
                     re.MULTILINE)
_ENUM_ENTRY = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*(\d+)\s*,", re.MULTILINE)
_STRUCT = re.compile(r"^struct\s+([a-z_][a-z0-9_]*)\s*\{", re.MULTILINE)


def header_constants(text: str) -> dict[str, int]:
    """`#define NAME number` and `NAME = number,` enum entries of a header, by name."""
    found = {name: int(value, 0) for name, value in _DEFINE.findall(text)}
    found.update({name: int(value) for name, value in _ENUM_ENTRY.findall(text)})
    return found


def header_enum(text: str, name: str) -> dict[str, int]:
    """The members of `enum name { ... };` of a header, by name (empty if it has no such enum)."""
    m = re.search(rf"^enum\s+{re.escape(name)}\s*\{{(.*?)^\}};", text, re.MULTILINE | re.DOTALL)
    return {member: int(value) for member, value in _ENUM_ENTRY.findall(m.group(1))} if m else {}


# A trace point's emission: `TRACE(ctx, TRACE_<POINT>, a0, a1, a2, a3, a4)` (lib/trace.h), not the
# macro's own definition.
_TRACE_CALL = re.compile(r"(?<![\w#])TRACE\(\s*[^,]+,\s*(\w+)\s*,")


def trace_calls(text: str) -> list[tuple[int, str | None]]:
    """(line number, TRACE_<POINT> token or None) of every TRACE( call of a source, the token
    read on the call's own line (None when the line does not name its point there)."""
    out: list[tuple[int, str | None]] = []
    # comments out, line breaks kept: what remains of each line is its code
    code_text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL)
    for number, line in enumerate(code_text.splitlines(), 1):
        code = line.split("//", 1)[0]
        if code.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"(?<![\w#])TRACE\(", code):
            call = _TRACE_CALL.match(code, m.start())
            out.append((number, call.group(1) if call else None))
    return out


def header_structs(text: str) -> list[str]:
    """Names of the structs a header defines (at the start of a line)."""
    return _STRUCT.findall(text)
