"""What the BPF datapath reports and how it is written: metrics count every packet by verdict,
reason and direction, events carry the flow's details, `sync` writes only the difference (adds
before deletes), and the program fds and the debug build load."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from dataplane.datapath import Datapath
from dataplane.mapstate import MapState, PolicyEntry, PolicyKey
from dataplane.abi import Direction, PROTO_TCP, Verdict
from dataplane.abi import DropReason, FlowVerdict
from tests.conftest import require_kernel
from tests.support.prog_run import (A, B, C, EG, ID_A, ID_B, ID_C, ING, MALFORMED, PROBES, TC_ACT_OK,
                                    TC_ACT_SHOT, WORLD_HOST, allow, base_state, expect_verdict, oracle,
                                    packet, run)

pytestmark = pytest.mark.kernel


def test_bpf_metrics_count_every_packet(dp: Datapath) -> None:
    dp.sync(base_state())
    before = Counter(dp.metrics())
    sent: Counter[tuple[FlowVerdict, DropReason, Direction]] = Counter()
    for i, (src, dst, proto, port) in enumerate(PROBES):
        verdict, reason, direction, _ = oracle(base_state(), src, dst, proto, port)
        run(dp, packet(src, dst, proto, port, sport=41000 + i))
        sent[(verdict, reason, direction)] += 1
    for name, (pkt, reason) in MALFORMED.items():
        run(dp, pkt)
        sent[(FlowVerdict.DROP, reason, EG)] += 1
    r = dp.test_run_full("from_container", packet(A, B, PROTO_TCP, 81, 42000), repeat=50)
    assert r.retval == TC_ACT_SHOT
    sent[(FlowVerdict.DROP, DropReason.POLICY_DENIED, EG)] += 50
    delta = Counter(dp.metrics()) - before
    assert delta == sent
    assert sum(delta.values()) == len(PROBES) + len(MALFORMED) + 50


def test_bpf_events_carry_flow_details(dp: Datapath) -> None:
    dp.sync(base_state())
    run(dp, packet(A, WORLD_HOST, PROTO_TCP, 443, 40040))
    retval, _, events = run(dp, packet(C, B, PROTO_TCP, 22, 40041))
    (ev,) = events
    assert retval == TC_ACT_SHOT
    assert (ev.src, ev.dst, ev.sport, ev.dport, ev.protocol) == (C, B, 40041, 22, PROTO_TCP)
    assert (ev.src_identity, ev.dst_identity, ev.src_endpoint, ev.dst_endpoint) == (ID_C, ID_B, 3, 2)
    assert (ev.verdict, ev.reason, ev.direction, ev.rule_id, ev.endpoint_id) == (
        FlowVerdict.DROP, DropReason.POLICY_EXPLICIT_DENY, ING, 25, 2)
    assert ev.tcp_flags == 0x02 and ev.length == len(packet(C, B, PROTO_TCP, 22, 40041))


def test_bpf_sync_writes_only_the_diff(dp: Datapath) -> None:
    dp.sync(MapState())
    state = base_state()
    first = dp.sync(state)
    assert first.added == {"policy": len(state.policy), "ipcache": len(state.ipcache), "endpoints": 3}
    assert dp.sync(state).writes == []                                   # nothing changed
    changed = base_state()
    key80 = PolicyKey(2, ING, ID_A, PROTO_TCP, 80, 16)
    changed.policy[key80] = PolicyEntry(Verdict.DENY, 0, (50,))           # one update
    new_key = PolicyKey(2, ING, ID_A, PROTO_TCP, 9000, 16)
    changed.policy[new_key] = allow(51)                                  # one add
    gone = PolicyKey(2, ING, ID_A, PROTO_TCP, 443, 16)
    del changed.policy[gone]                                             # one delete
    stats = dp.sync(changed)
    assert sorted(stats.writes, key=str) == sorted([("policy", "update", key80), ("policy", "update", new_key),
                                                    ("policy", "delete", gone)], key=str)
    assert stats.writes[-1] == ("policy", "delete", gone)                # deletions last
    assert (stats.added, stats.updated, stats.deleted) == ({"policy": 1}, {"policy": 1}, {"policy": 1})
    assert run(dp, packet(A, B, PROTO_TCP, 80))[0] == TC_ACT_SHOT        # takes effect, no reload
    for src, dst, proto, port in PROBES:                                 # and agrees with the oracle
        dp.flush_conntrack()
        verdict = oracle(changed, src, dst, proto, port)[0]
        expect_verdict(run(dp, packet(src, dst, proto, port))[0], verdict)


def test_bpf_sync_order_adds_before_deletes(dp: Datapath) -> None:
    """Moving B to a new identity: the new keys and the new identity are written before the old
    keys go, so a flow allowed before and after never meets a missing entry."""
    dp.sync(MapState())
    old = base_state()
    dp.sync(old)
    new = base_state()
    new.endpoints[2] = replace(new.endpoints[2], identity=300)
    new.ipcache[f"{B}/32"] = 300
    new.policy = {replace(k, identity=300) if k.identity == ID_B else k: v for k, v in old.policy.items()}
    stats = dp.sync(new)
    ops = [op for _, op, _ in stats.writes]
    assert ops == sorted(ops, key=lambda o: o == "delete")
    assert [m for m, op, _ in stats.writes if op == "update"][0] == "policy"
    assert run(dp, packet(A, B, PROTO_TCP, 80))[0] == TC_ACT_OK


def test_bpf_program_fds(dp: Datapath) -> None:
    assert dp.program_fd("from_container") > 0 and dp.program_fd("to_container") > 0
    with pytest.raises(KeyError):
        dp.program_fd("nope")


def test_bpf_debug_build_loads() -> None:
    """-DDEBUG=1 adds bpf_trace_printk on drops; it must still pass the verifier."""
    require_kernel()
    with Datapath(debug=True) as d:
        assert d.program_fd("from_container") > 0
