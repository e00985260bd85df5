"""The proxy's flow records: one L7 `dataplane.flowrecord.Flow` per HTTP request and per DNS
question, appended as a JSON line to the events file and kept in memory (bounded) for tests and
for whoever embeds the proxy.

`l7_flow` builds the record the same way for both protocols: the two endpoints as the policy
snapshot in force names them when the record is made (pod, namespace, endpoint id, the identity's labels;
a relabel reaches the proxy as a new snapshot, so later records carry the new labels), the
proxy's verdict (forwarded | denied | error) and why, the rules behind it, the latency, and the
HTTP or DNS part (`l7.http.HttpFlow`, `l7.dns.DnsFlow`).

The file is bounded: past L7LAB_LOG_ROTATE_BYTES (default 64 MiB) it becomes NAME.1 and a new
one begins (`dataplane.logfiles.RotatingLog`), so a busy lab keeps at most two files.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from dataplane.flowrecord import (Endpoint, Flow, FlowType, L4, L7, PolicyAttribution, TracePoint,
                                  TrafficDirection, Verdict)
from dataplane.flowrender import json_line
from dataplane.logfiles import RotatingLog
from l7.dns import DnsFlow
from l7.http import HttpFlow

if TYPE_CHECKING:
    from .state import ConnectionPolicy, Snapshot


def _endpoint(snapshot: Snapshot, ip: str, port: int, identity: int | None) -> Endpoint:
    ep = snapshot.by_ip.get(ip)
    if ep is None:
        return Endpoint(ip, port, identity or 0)
    namespace, _, pod = ep.name.partition("/")
    return Endpoint(ip, port, identity if identity is not None else ep.identity, namespace, pod, "", dict(ep.labels),
                    ep.endpoint_id)


def redirect_direction(cp: ConnectionPolicy | None) -> TrafficDirection:
    """The direction of the first L7 rule set that applies to a connection (`cp`, a
    `proxy.state.ConnectionPolicy`, or None): the source's egress before the destination's
    ingress, the redirect that brought the request here; UNKNOWN when none applies."""
    if cp is None or not cp.sets:
        return TrafficDirection.UNKNOWN
    direction = cp.sets[0].direction
    return TrafficDirection(direction) if direction in ("ingress", "egress") else TrafficDirection.UNKNOWN


def l7_flow(snapshot: Snapshot, verdict: Verdict, client: tuple[str, int], dst: tuple[str, int], *,
            src_identity: int | None, dst_identity: int | None, direction: TrafficDirection, summary: str,
            latency_ms: float, rule_ids: tuple[int, ...] = (), policies: tuple[str, ...] = (),
            http: HttpFlow | None = None, dns: DnsFlow | None = None, latency_ns: int = 0, transport: str = "") -> Flow:
    """An L7 record. `snapshot` is the proxy's policy snapshot in force now (a
    `proxy.state.Snapshot`: its `by_ip` endpoints and `state.rules`); `rule_ids` the rules that
    allowed the request, `policies` the policies that allowed it or whose rules it failed;
    `latency_ns` the latency at full resolution (else derived from `latency_ms`); `transport`
    the L4 protocol it came on ("TCP" | "UDP"; default: UDP for DNS, TCP for HTTP)."""
    rules = tuple(r.text for r in map(snapshot.state.rules.get, rule_ids)
                  if r is not None)
    return Flow(
        time=round(time.time(), 6), type=FlowType.L7, verdict=verdict,
        source=_endpoint(snapshot, client[0], client[1], src_identity),
        destination=_endpoint(snapshot, dst[0], dst[1], dst_identity),
        l4=L4(transport or ("UDP" if dns is not None else "TCP")), direction=direction, trace_point=TracePoint.PROXY,
        summary=summary, policy=PolicyAttribution(tuple(rule_ids), tuple(policies), rules),
        l7=L7(latency_ms, http, dns, latency_ns))


class EventLog:
    """Appends records to a rotated file (one JSON line each, one write per line) and keeps the
    last `keep` in memory. `max_bytes` overrides the size cap (default: L7LAB_LOG_ROTATE_BYTES)."""

    def __init__(self, path: str | None = None, keep: int = 10000, max_bytes: int | None = None) -> None:
        self.records: deque[Flow] = deque(maxlen=keep)
        self._file: RotatingLog | None = RotatingLog(path, max_bytes) if path else None

    def emit(self, record: Flow) -> None:
        self.records.append(record)
        if self._file is not None:
            try:
                self._file.write_line(json_line(record))
            except OSError:
                pass  # observability must never break enforcement

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
