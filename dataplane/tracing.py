"""Taking a trace: send one probe with the datapath's trace points on for its flow only, and
assemble what happened into a `dataplane.trace.Trace`.

Responsibility: choose a trace id and a free source port in the client pod (so that the flow is
named before its first packet), compute the flows to trace (the client's flow, and the L7
proxy's upstream leg: node address -> destination, any source port), start the trace, send the
probe, wait for what is expected (the probe's end; for a flow the kernel redirected, the proxy's
L7 record of this client port, by a deadline), collect the events, stop the trace in `finally`
(trace map entries never outlive their trace), and assemble the timeline.

Two ways in:

    trace_in_lab(lab, engine, probe)     a lab this process built (as `run` has it): the
                                         datapath is here
    trace_running_lab(lab_name, probe)   a lab served by its agent (`l7lab up`), in
                                         dataplane/agent/tracer.py: the agent holds the datapath
                                         and the policy engine; its ops "trace-start" and
                                         "trace-stop" (dataplane/agent/service.py) set the flows
                                         and return the events, the oracle's decision and the
                                         lab's names. This module never imports the agent, whose
                                         service uses the parts below.

The probe itself is always sent by this process, from inside the client pod's namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from . import timescale, topology
from .abi import PROTOCOLS
from .errors import SetupError
from .flowrecord import Flow
from .flows import PROXY_RECORDS, RecordTail
from .probes import Observation, run_probe
from .services import pin_probe, service_backend_address
from .scenario import Probe
from .trace import BpfSources, LabNames, Trace, assemble

if TYPE_CHECKING:
    from .datapath import Datapath, TraceEvent, TraceFlow
    from .lab import Lab, LabRecord
    from .mapstate import MapState
    from .policy.engine import Decision, PolicyEngine

L7_RECORD_DEADLINE = 5.0  # after the probe's end, how long the proxy may take to write its record
SETTLE_MS = 100  # after what was expected arrived: one more drain for events still in the ring buffer
MAX_TRACE_FLOWS = 4  # what one trace may ask of the agent


# --------------------------------------------------------------------------- the parts


def new_trace_id() -> int:
    return secrets.randbelow(0xFFFFFFFE) + 1


def free_source_port(netns: str, protocol: str) -> int:
    """A port free in namespace `netns` now (the kernel's choice, released at once); for ICMP
    an echo id, which a ping carries where TCP and UDP carry ports."""
    if protocol == "ICMP":
        return int.from_bytes(os.urandom(2), "big") or 1
    kind = socket.SOCK_DGRAM if protocol == "UDP" else socket.SOCK_STREAM
    sock = topology.socket_in(netns, kind=kind)
    try:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def traced_flows(probe: Probe, client_ip: str, sport: int, node_ip: str,
                 backend: tuple[str, int] | None = None) -> list[dict[str, Any]]:
    """The flows of a trace as JSON (src, dst, sport, dport, protocol): the client's flow to
    the destination, and the L7 proxy's upstream (node -> destination, any source port) in case
    the flow is redirected (a TCP connection, a DNS question alike). To a service, `backend`
    (address, port) is where the datapath translates it: the client's flow and the proxy's
    upstream are traced under that address too."""
    protocol = PROTOCOLS[probe.protocol]
    dest = probe.destination
    if probe.icmp is not None:
        # A ping: the datapath's tuple of an echo request is (0, echo id), its reply's the
        # reverse (lib/parse.h); `sport` is the echo id here. No proxy leg: ICMP is never redirected.
        return [{"src": client_ip, "dst": dest.ip, "sport": 0, "dport": sport, "protocol": protocol}]
    flows = [{"src": client_ip, "dst": dest.ip, "sport": sport, "dport": dest.port, "protocol": protocol},
             {"src": node_ip, "dst": dest.ip, "sport": 0, "dport": dest.port, "protocol": protocol}]
    if backend is not None:
        flows += [{"src": client_ip, "dst": backend[0], "sport": sport, "dport": backend[1], "protocol": protocol},
                  {"src": node_ip, "dst": backend[0], "sport": 0, "dport": backend[1], "protocol": protocol}]
    return flows


def check_flows(flows: Any) -> list[dict[str, Any]]:
    """The flows of a trace request, checked (they reach BPF maps): IPv4 addresses, ports in
    range, a known protocol, at most MAX_TRACE_FLOWS."""
    if not isinstance(flows, list) or not 1 <= len(flows) <= MAX_TRACE_FLOWS:
        raise ValueError(f"'flows' must be a list of 1 to {MAX_TRACE_FLOWS} flows")
    out = []
    for f in flows:
        if not isinstance(f, dict):
            raise ValueError("each flow must be an object with src, dst, sport, dport, protocol")
        ipaddress.IPv4Address(f["src"])
        ipaddress.IPv4Address(f["dst"])
        for port in ("sport", "dport"):
            if not isinstance(f[port], int) or not 0 <= f[port] <= 0xFFFF:
                raise ValueError(f"flow {port} must be a port number 0..65535, got {f[port]!r}")
        if f["protocol"] not in PROTOCOLS.values():
            raise ValueError(f"flow protocol must be one of {sorted(PROTOCOLS.values())}, got {f['protocol']!r}")
        out.append({k: f[k] for k in ("src", "dst", "sport", "dport", "protocol")})
    return out


def trace_flow_objects(flows: list[dict[str, Any]]) -> list[TraceFlow]:
    from .datapath import TraceFlow  # noqa: PLC0415 - the loader module, imported where a datapath is

    return [TraceFlow(f["src"], f["dst"], f["sport"], f["dport"], f["protocol"]) for f in flows]


def oracle_json(decision: Decision) -> dict[str, Any]:
    """The oracle's decision as JSON, with its L7 verdict (what `Decision.to_json` leaves out)."""
    out = decision.to_json()
    v = decision.l7
    out["l7"] = None if v is None else {
        "allowed": v.allowed, "why": v.why, "rule_ids": list(v.rule_ids), "policies": list(v.policies),
        "sets": [{"where": s.applied.where, "allowed": s.verdict.allowed if s.verdict else False,
                  "why": s.verdict.why if s.verdict else "no L7 rule set"} for s in v.steps]}
    return out


def lab_names(record: LabRecord, state: MapState, describe: Any, node_ip: str) -> LabNames:
    """Who is who: the record's interfaces and addresses, the map state's endpoints and rules,
    identities as `describe(identity)` (the engine's `IdentityTable.describe`) gives them."""
    names = LabNames(node_ip=node_ip)
    for key, ep in record.endpoints.items():
        names.interfaces[ep.ifindex] = (ep.ifname, key)
        names.addresses[ep.ip] = key
    names.addresses[node_ip] = "node"
    for endpoint_id, ep in state.endpoints.items():
        names.endpoints[endpoint_id] = ep.name
        names.identities.setdefault(ep.identity, describe(ep.identity))
    for identity in set(state.ipcache.values()):
        names.identities.setdefault(identity, describe(identity))
    for rule_id, rule in state.rules.items():
        names.rules[rule_id] = rule.text
    return names


def names_json(names: LabNames) -> dict[str, Any]:
    return {"interfaces": {str(k): list(v) for k, v in names.interfaces.items()}, "addresses": names.addresses,
            "identities": {str(k): v for k, v in names.identities.items()},
            "endpoints": {str(k): v for k, v in names.endpoints.items()},
            "rules": {str(k): v for k, v in names.rules.items()}, "node_ip": names.node_ip}


def names_from_json(d: dict[str, Any]) -> LabNames:
    return LabNames({int(k): (v[0], v[1]) for k, v in d["interfaces"].items()}, dict(d["addresses"]),
                    {int(k): v for k, v in d["identities"].items()}, {int(k): v for k, v in d["endpoints"].items()},
                    {int(k): v for k, v in d["rules"].items()}, d["node_ip"])


def probe_request(probe: Probe) -> dict[str, Any]:
    """The probe as the agent rebuilds it (`scenario.make_probe` on the lab's scenario)."""
    dest = probe.destination
    http = probe.http
    name = dest.dns_name or dest.name
    return {"source": probe.source, "to": f"{name}:{dest.port}" if dest.port else name,  # a ping's has no port
            "protocol": probe.protocol,
            "http": None if http is None else {"method": http.method, "path": http.path, "headers": dict(http.headers),
                                               "body": http.body},
            "dns": None if probe.dns is None else {"name": probe.dns.name, "type": probe.dns.type},
            "backend": dest.backend or None}


def probe_from_request(scenario: Any, data: dict[str, Any]) -> Probe:
    from .scenario import DnsQuery, HttpRequest, make_probe  # noqa: PLC0415

    http = data.get("http")
    dns = data.get("dns")
    return make_probe(scenario, str(data["source"]), str(data["to"]), str(data.get("protocol", "TCP")),
                      HttpRequest(http["method"], http["path"], dict(http.get("headers") or {}), http.get("body", ""))
                      if http else None, dns=DnsQuery(dns["name"], dns.get("type", "A")) if dns else None,
                      backend=str(data["backend"]) if data.get("backend") else None)


def _redirected(events: list[TraceEvent], client: tuple[str, int]) -> bool:
    from .abi import FlowVerdict, TracePoint  # noqa: PLC0415

    return any(e.point == TracePoint.DECISION and (e.src, e.sport) == client and e.args[0] & 0xFF == FlowVerdict.REDIRECT
               for e in events)


def client_records(tail: RecordTail, client: tuple[str, int], into: list[Flow]) -> None:
    for record in tail.records(PROXY_RECORDS):
        if isinstance(record, Flow) and (record.source.ip, record.source.port) == client:
            into.append(record)


def probe_text(probe: Probe) -> str:
    return f"{probe.source} -> {probe.destination} {probe.protocol} {probe.request_text}"


# --------------------------------------------------------------------------- in this process


async def trace_in_lab(lab: Lab, engine: PolicyEngine, probe: Probe) -> Trace:
    """Trace `probe` in `lab`, a lab this process built and enforces with `engine`."""
    from .lab import lab_dir  # noqa: PLC0415
    from .policy import Flow as OracleFlow  # noqa: PLC0415

    datapath: Datapath | None = lab.datapath
    if datapath is None:
        raise SetupError(f"lab {lab.name} enforces no policy: there is nothing to trace")
    endpoint = lab.record.endpoints.get(probe.source)
    if endpoint is None:  # a pod, or a world host (ingress from outside the cluster)
        raise SetupError(f"no pod or world host {probe.source!r} in lab {lab.name}")
    # To a service: the backend the oracle judges, reached by the source port (services.py).
    probe, pinned = pin_probe(probe, engine.map_state(), endpoint.ip)
    backend = service_backend_address(probe, engine.map_state(), lab.scenario)
    oracle = oracle_json(engine.verdict(OracleFlow.from_probe(probe)))
    names = lab_names(lab.record, engine.map_state(), engine.identities.describe, lab.scenario.node_ip)
    sport = pinned or free_source_port(endpoint.netns, probe.protocol)
    client = (endpoint.ip, sport)
    trace_id = new_trace_id()
    tail = RecordTail(lab_dir(lab.name), (PROXY_RECORDS,))
    tail.start_at_last(0)
    events: list[TraceEvent] = []
    records: list[Flow] = []

    def collect(timeout_ms: int = 0) -> None:
        events.extend(e for e in datapath.poll_traces(timeout_ms) if e.trace_id == trace_id)
        client_records(tail, client, records)

    datapath.trace_start(trace_id, trace_flow_objects(traced_flows(probe, endpoint.ip, sport, lab.scenario.node_ip,
                                                                   backend)))
    try:
        observed = await run_probe(probe, endpoint.netns, sport)
        collect(0)
        deadline = time.monotonic() + timescale.scaled(L7_RECORD_DEADLINE)
        while _redirected(events, client) and not records and time.monotonic() < deadline:
            collect(SETTLE_MS)
            await asyncio.sleep(0)
        collect(SETTLE_MS)
    finally:
        datapath.trace_stop(trace_id)
    # pyroute2's synchronous socket runs its own event loop: not on this one
    routing = await asyncio.to_thread(topology.proxy_routing, lab.record.node)
    return assemble(probe=probe_text(probe), client=client, events=events, l7_records=records, routing=routing,
                    oracle=oracle, names=names, observed=observed, sources=BpfSources(), trace_id=trace_id)
