"""Packet parsing in the BPF datapath on test packets: every malformed header is dropped with its
reason by both programs (and counted once), truncated frames cannot even be injected, IP
options are skipped and never trusted, ARP passes."""

from __future__ import annotations

from collections import Counter

import pytest
from scapy.all import ARP, IP, TCP, Raw  # type: ignore[import-untyped]
from dataplane.datapath import Datapath
from dataplane.mapstate import PolicyKey
from dataplane.abi import IDENTITY_ANY, PROTO_ANY
from dataplane.abi import DropReason, FlowVerdict
from tests.support.prog_run import (A, B, EG, ING, MALFORMED, TC_ACT_OK, TC_ACT_SHOT, allow, base_state, eth,
                                    run)

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("prog", ["from_container", "to_container"])
def test_bpf_malformed_dropped_with_reason(dp: Datapath, name: str, prog: str) -> None:
    state = base_state()
    # Open everything so that only the parser can be what drops.
    state.policy[PolicyKey(1, EG, IDENTITY_ANY, PROTO_ANY)] = allow(1)
    state.policy[PolicyKey(2, ING, IDENTITY_ANY, PROTO_ANY)] = allow(2)
    dp.sync(state)
    pkt, reason = MALFORMED[name]
    before = dp.metrics()
    retval, _, events = run(dp, pkt, prog)
    assert retval == TC_ACT_SHOT
    assert [(e.verdict, e.reason) for e in events] == [(FlowVerdict.DROP, reason)]
    delta = Counter(dp.metrics()) - Counter(before)
    assert sum(delta.values()) == 1 and next(iter(delta))[:2] == (FlowVerdict.DROP, reason)


@pytest.mark.parametrize("pkt", [b"\x00" * 13,                                   # Ethernet cut
                                 bytes(eth() / Raw())[:12] + b"\x08\x00",          # IPv4, no header
                                 bytes(eth() / IP(src=A, dst=B) / TCP())[:14 + 12]])  # IPv4 header cut
def test_bpf_truncated_headers_cannot_be_injected(dp: Datapath, pkt: bytes) -> None:
    """BPF_PROG_TEST_RUN refuses a frame shorter than Ethernet, or an IPv4 frame shorter than an
    IPv4 header (EINVAL), so these parser checks are unreachable here; the stack delivers no
    such frame to tc either. The checks stay (the verifier demands them)."""
    with pytest.raises(OSError):
        dp.test_run("from_container", pkt)


def test_bpf_ip_options_are_skipped_not_trusted(dp: Datapath) -> None:
    dp.sync(base_state())
    opts = b"\x01" * 4 + b"\x94\x04\x00\x00"  # NOPs + router alert: ihl 7
    ok = bytes(eth() / IP(src=A, dst=B, options=opts) / TCP(sport=40010, dport=80))
    bad = bytes(eth() / IP(src=A, dst=B, options=opts) / TCP(sport=40011, dport=81))
    assert ok[14] & 0x0F == 7
    assert run(dp, ok)[0] == TC_ACT_OK
    retval, _, events = run(dp, bad)
    assert (retval, events[0].reason, events[0].dport) == (TC_ACT_SHOT, DropReason.POLICY_DENIED, 81)


def test_bpf_arp_passes(dp: Datapath) -> None:
    dp.sync(base_state())
    retval, _, events = run(dp, bytes(eth() / ARP(psrc=A, pdst=B)))
    assert (retval, events) == (TC_ACT_OK, [])
