"""Flow verdicts, drop reasons and hooks of the BPF datapath: the Python mirror of bpf/lib/drop.h
(and of the HOOK_* constants in bpf/lib/common.h).

Shared by the loader (decoding events and metrics), flow views and Prometheus labels. Pure
Python, no bcc. tests/unit/test_datapath_reasons.py parses the C header and checks that both
sides agree, so a reason added on one side and not the other fails the tests.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

from .bpfsource import bpf_header

DROP_HEADER = bpf_header("drop.h")


class FlowVerdict(enum.IntEnum):
    """What the datapath did with a packet (enum flow_verdict)."""

    FORWARD = 0
    DROP = 1
    REDIRECT = 2
    AUDIT = 3  # would have been dropped; passed because of audit mode


class DropReason(enum.IntEnum):
    """Why a packet was dropped (enum drop_reason); NONE for packets that were not."""

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


class Hook(enum.IntEnum):
    """Which program produced an event (HOOK_* in bpf/lib/common.h)."""

    FROM_CONTAINER = 0  # tc ingress on the node side: leaving a pod / world host
    TO_CONTAINER = 1  # tc egress on the node side: entering a pod


_ENTRY = re.compile(r"^\s*(VERDICT|REASON)_([A-Z0-9_]+)\s*=\s*(\d+)\s*,", re.MULTILINE)


def parse_drop_header(path: Path = DROP_HEADER) -> dict[str, dict[str, int]]:
    """{"VERDICT": {name: value}, "REASON": {name: value}} as written in bpf/lib/drop.h."""
    out: dict[str, dict[str, int]] = {"VERDICT": {}, "REASON": {}}
    for prefix, name, value in _ENTRY.findall(path.read_text()):
        out[prefix][name] = int(value)
    return out
