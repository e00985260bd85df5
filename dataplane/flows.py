"""Flows of a lab: kernel events decoded into flow records, the one writer of flows.jsonl, and
the reader that follows a lab's record files.

A lab keeps its records in its directory (/run/l7lab/<lab>/):

    flows.jsonl      L3_L4 records (one per new-flow verdict and per drop at the tc hooks) and
                     the agent's PROXY events; written only through `FlowLog`, by the lab agent
                     (or by `l7lab run` for the lab it runs, before any agent exists)
    l7-events.jsonl  L7 records (one per HTTP request and per DNS question), written by the L7
                     proxy process (`proxy/events.py`)

Every line of both is a `dataplane.flowrecord` record as JSON. Each file is renamed to NAME.1
past a size cap (`dataplane/logfiles.py`); `RecordTail` follows both across the rename, can
start from their ends, and returns typed records merged by time.

Names and labels are looked up when a record is made, never cached from the lab's start: a pod
relabelled by `l7lab label` shows its new labels in every later record. Labels come from the
map state in force (`EndpointState.labels`, the identity's labels), which the proxy loads too,
so both kinds of records agree on them.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .abi import IDENTITY_ANY, PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTOCOL_NAMES, TCP_FLAG_NAMES, Direction, DropReason, Hook
from .flowrecord import (Endpoint, Flow, FlowType, Icmp, L4, PolicyAttribution, Record, TracePoint, TrafficDirection,
                         Verdict, record_from_json)
from .flowrender import json_line
from .hubble import POLICY_MATCH_NONE, policy_match_type
from .logfiles import FollowedFile, RotatingLog, json_lines, rotate_bytes
from .mapstate import MapState, lookup_policy

if TYPE_CHECKING:
    from .datapath import FlowEvent

KERNEL_FLOWS = "flows.jsonl"
PROXY_RECORDS = "l7-events.jsonl"
RECORD_FILES = (KERNEL_FLOWS, PROXY_RECORDS)
# The record types each file holds (the agent's PROXY events go to flows.jsonl), and what
# `observe --type` shows.
TYPES_IN_FILE = {KERNEL_FLOWS: ("L3_L4", "PROXY"), PROXY_RECORDS: ("L7",)}
OBSERVE_TYPES = {"all": ("L3_L4", "L7", "PROXY"), "l7": ("L7", "PROXY"), "flows": ("L3_L4",)}
TRACE_POINTS = {Hook.FROM_CONTAINER: TracePoint.FROM_ENDPOINT, Hook.TO_CONTAINER: TracePoint.TO_ENDPOINT}


def flows_rotate_bytes() -> int:
    """flows.jsonl's cap: L7LAB_FLOWS_ROTATE_BYTES, else every lab log's cap."""
    return int(os.environ.get("L7LAB_FLOWS_ROTATE_BYTES", rotate_bytes()))


# --------------------------------------------------------------------------- who is who


@dataclass(frozen=True)
class Directory:
    """Who an address is in a lab: its pods and world hosts, and "node" (the node's own stack,
    which is also where the L7 proxy's upstream connections come from)."""

    pods: dict[str, str] = field(default_factory=dict)  # ip -> "namespace/pod"
    hosts: dict[str, str] = field(default_factory=dict)  # ip -> world host name or "node"
    dns_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # ip -> a world host's DNS names

    @classmethod
    def of_lab(cls, lab: Any) -> "Directory":
        """From the lab's current record (`lab.record.endpoints`) and its scenario's node address."""
        pods: dict[str, str] = {}
        hosts: dict[str, str] = {}
        for key, ep in lab.record.endpoints.items():
            (pods if ep.kind == "pod" else hosts)[ep.ip] = key
        for address in lab.scenario.node_addresses():  # its own and the pods' gateway
            hosts[address] = "node"
        names = {host.address: host.dns_names for host in lab.scenario.world.values() if host.dns_names}
        return cls(pods, hosts, names)

    def endpoint(self, ip: str, port: int, identity: int, labels: dict[str, dict[str, str]],
                 endpoint_id: int = 0) -> Endpoint:
        """The endpoint at `ip`, with the labels `labels` (ip -> labels, from the map state) give it."""
        pod = self.pods.get(ip, "")
        namespace, _, name = pod.partition("/")
        return Endpoint(ip, port, identity, namespace if name else "", name, self.hosts.get(ip, ""),
                        dict(labels.get(ip, {})), endpoint_id, self.dns_names.get(ip, ()))


def endpoint_labels(state: MapState) -> dict[str, dict[str, str]]:
    """ip -> labels of every endpoint of a map state."""
    return {ep.ip: dict(ep.labels) for ep in state.endpoints.values()}


# --------------------------------------------------------------------------- kernel events


_by_side: tuple[weakref.ref[MapState], dict[tuple[int, Direction], MapState]] | None = None


def _entries_of(state: MapState) -> dict[tuple[int, Direction], MapState]:
    """The state's policy entries by (endpoint id, direction), each as a MapState of its own, so
    that a lookup walks one endpoint's entries, not the whole lab's. Built once per map state
    (a change of policy gives a new MapState; the one in force is kept here by a weak reference)."""
    global _by_side  # noqa: PLW0603 - a one-entry cache of the state in force
    if _by_side is not None and _by_side[0]() is state:
        return _by_side[1]
    index: dict[tuple[int, Direction], MapState] = {}
    for key, entry in state.policy.items():
        index.setdefault((key.endpoint_id, key.direction), MapState()).policy[key] = entry
    _by_side = (weakref.ref(state), index)
    return index


def decided_match_type(ev: FlowEvent, state: MapState) -> int:
    """What the map entry that decided names (a peer identity, a protocol, a port), as Cilium's
    policy verdicts number it; POLICY_MATCH_NONE when no entry decided (default deny, a
    direction without policy, or the proxy's upstream connection, which skips policy). The
    entry is the one `lookup_policy` finds for the event's endpoint, direction, peer and port
    that carries the event's rule (else the one of highest precedence), the same walk the
    datapath made."""
    if ev.from_proxy or not ev.endpoint_id or ev.reason not in (DropReason.NONE, DropReason.POLICY_EXPLICIT_DENY):
        return POLICY_MATCH_NONE  # no entry decided: default deny, or not a policy decision at all
    remote = ev.src_identity if ev.direction == Direction.INGRESS else ev.dst_identity
    entries = _entries_of(state).get((ev.endpoint_id, ev.direction))
    if not entries:
        return POLICY_MATCH_NONE
    _, found = lookup_policy(entries, ev.endpoint_id, ev.direction, remote, ev.protocol, ev.policy_port)
    if not found:
        return POLICY_MATCH_NONE
    key, _ = next(((k, e) for k, e in found if ev.rule_id in e.rule_ids),
                  max(found, key=lambda hit: hit[1].verdict))
    return policy_match_type(key.identity != IDENTITY_ANY, key.protocol != PROTO_ANY, key.port_prefix > 0)



def enforced_at_event(ev: FlowEvent, state: MapState) -> bool:
    """Whether the endpoint whose policy the event is about enforces policy in its direction
    (MapState's EndpointState); False for an event of no local endpoint."""
    ep = state.endpoints.get(ev.endpoint_id) if ev.endpoint_id else None
    return ep is not None and ep.enforced(ev.direction)


def _attribution(state: MapState, rule_id: int) -> PolicyAttribution:
    """The rule an event names (0: none), as a flow record carries it."""
    rule = state.rules.get(rule_id) if rule_id else None
    return PolicyAttribution((rule.rule_id,), (rule.policy,), (rule.text,)) if rule else PolicyAttribution()


def kernel_flow(ev: FlowEvent, state: MapState, directory: Directory, when: float,
                labels: dict[str, dict[str, str]] | None = None) -> Flow:
    """A datapath `FlowEvent` as a flow record. `state` (the MapState in force) gives the rule
    that decided and the endpoints' labels (pass `labels` from `endpoint_labels(state)` to
    reuse them across a batch); `directory` names the addresses; `when` is unix time."""
    labels = endpoint_labels(state) if labels is None else labels
    attribution = _attribution(state, ev.rule_id)
    other_attribution = _attribution(state, 0 if ev.from_proxy else ev.other_rule_id)
    protocol = PROTOCOL_NAMES.get(ev.protocol, str(ev.protocol))
    flags = tuple(name for bit, name in TCP_FLAG_NAMES if ev.tcp_flags & bit) if ev.protocol == PROTO_TCP else ()
    sport, dport, icmp = ev.sport, ev.dport, None
    if ev.protocol == PROTO_ICMP:
        # ICMP has no ports: the datapath's tuple carries an echo id (a request's dport, a
        # reply's sport, lib/parse.h), which the record keeps with the type and code.
        icmp, sport, dport = Icmp(ev.icmp_type, ev.icmp_code, ev.sport | ev.dport), 0, 0
    return Flow(
        time=round(when, 6), type=FlowType.L3_L4, verdict=Verdict(ev.verdict.name),
        source=directory.endpoint(ev.src, sport, ev.src_identity, labels, ev.src_endpoint),
        destination=directory.endpoint(ev.dst, dport, ev.dst_identity, labels, ev.dst_endpoint),
        l4=L4(protocol, flags, icmp),
        direction=TrafficDirection.EGRESS if ev.direction == Direction.EGRESS else TrafficDirection.INGRESS,
        trace_point=TRACE_POINTS.get(ev.hook, TracePoint.FROM_ENDPOINT), drop_reason=ev.reason.name,
        policy=attribution, proxy_port=ev.proxy_port, bytes=ev.length,
        policy_match_type=decided_match_type(ev, state), ifindex=ev.ifindex, from_proxy=ev.from_proxy,
        policy_enforced=enforced_at_event(ev, state), other_direction_policy=other_attribution)


def kernel_flows(events: Iterable[FlowEvent], state: MapState, directory: Directory) -> list[Flow]:
    """Flow records of a batch of events, in wall-clock time (kernel timestamps are
    CLOCK_MONOTONIC)."""
    offset = time.time() - time.monotonic_ns() / 1e9
    labels = endpoint_labels(state)
    return [kernel_flow(ev, state, directory, offset + ev.ts_ns / 1e9, labels) for ev in events]


# --------------------------------------------------------------------------- the one writer


class FlowLog:
    """The writer of a lab's flows.jsonl: one JSON line per record, one write per line, renamed
    to flows.jsonl.1 past its cap (`flows_rotate_bytes()` unless `max_bytes` says otherwise),
    so a long-lived lab keeps at most two files."""

    def __init__(self, lab_dir: Path, max_bytes: int | None = None) -> None:
        self.path = Path(lab_dir) / KERNEL_FLOWS
        self._log = RotatingLog(self.path, flows_rotate_bytes() if max_bytes is None else max_bytes)

    def write(self, records: Iterable[Record]) -> None:
        for record in records:
            self._log.write_line(json_line(record))

    def close(self) -> None:
        self._log.close()


# --------------------------------------------------------------------------- reading back


@dataclass
class RecordTail:
    """Reads complete new records from a lab's record files, remembering where it stopped in
    each and following each across its rotation (`NAME.1`); `start_at_last` / `start_at_time`
    skip to the end of the files without reading what comes before."""

    lab_dir: Path
    names: tuple[str, ...] = RECORD_FILES

    @classmethod
    def of_types(cls, lab_dir: Path, types: tuple[str, ...]) -> "RecordTail":
        """A tail of only the files that can hold records of `types`."""
        return cls(lab_dir, tuple(n for n in RECORD_FILES if set(TYPES_IN_FILE[n]) & set(types)))
    files: dict[str, FollowedFile] = field(default_factory=dict)

    def _file(self, name: str) -> FollowedFile:
        if name not in self.files:
            self.files[name] = FollowedFile(self.lab_dir / name)
        return self.files[name]

    def start_at_last(self, count: int) -> None:
        """The next read() starts with (at most) the last `count` records of each file."""
        for name in self.names:
            self._file(name).start_at_last(count)

    def start_at_time(self, since: float) -> None:
        """The next read() starts with the first record of each file at or after `since`."""
        for name in self.names:
            self._file(name).start_at_time(since)

    def read(self) -> list[Record]:
        """New records of every file since the last call, in time order."""
        out: list[Record] = []
        for name in self.names:
            out += self.records(name)
        out.sort(key=lambda r: r.time)
        return out

    def records(self, name: str) -> Iterator[Record]:
        """New complete records of one file (KERNEL_FLOWS or PROXY_RECORDS) since the last call;
        a torn line after a crash, or one that is not a record, is skipped, never a reason to
        stop observing."""
        for data in json_lines(self._file(name).read()):
            record = record_from_json(data)
            if record is not None:
                yield record
