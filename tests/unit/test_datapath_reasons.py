"""bpf/lib/drop.h and dataplane/reasons.py describe the same enums.

Needs no kernel, but tests/conftest.py marks everything under tests/kernel as kernel tests;
it could move to tests/unit."""

from __future__ import annotations

import re

from dataplane.bpfsource import bpf_header
from dataplane.datapath import EVENT_SIZE, LAYOUTS
from dataplane.reasons import DROP_HEADER, DropReason, FlowVerdict, Hook, parse_drop_header


def test_bpf_drop_reasons_mirror_header() -> None:
    parsed = parse_drop_header()
    assert parsed["REASON"] == {r.name: r.value for r in DropReason}
    assert parsed["VERDICT"] == {v.name: v.value for v in FlowVerdict}


def test_bpf_hooks_mirror_header() -> None:
    text = bpf_header("common.h").read_text()
    hooks = {m[0]: int(m[1]) for m in re.findall(r"#define HOOK_([A-Z_]+)\s+(\d+)", text)}
    assert hooks == {h.name: h.value for h in Hook}


def test_bpf_event_size_matches_struct() -> None:
    # struct flow_event is documented as 56 bytes in bpf/lib/maps.h
    assert EVENT_SIZE == 56
    assert "56 bytes" in bpf_header("maps.h").read_text()
    assert set(LAYOUTS) == {"ipcache", "endpoints", "policy", "conntrack", "metrics", "if_bind", "fragments"}
    assert DROP_HEADER.exists()
