"""Services: which pods back each port of a scenario's Services, and which backend a flow meets.

Responsibility: turn the scenario's `services` and the pods' labels in force into the
`ServiceEntry`s of a MapState (what the loader writes into the lb_* maps), and answer, in
Python, the question the datapath answers in dataplane/bpf/lib/lb.h: to which backend does a
new flow to a ClusterIP go. `backend_hash` is the twin of lb_hash(); the oracle uses it to judge
a probe to a service against the backend it reaches, and the prober to pick a source port that
reaches the backend a probe names (`source_port_for`).

Backends (Kubernetes EndpointSlice semantics, reduced): the pods of the service's namespace
whose labels carry every key=value of the selector, in the scenario's pod order; a port whose
`targetPort` names a port leaves out the pods that do not declare that name. A relabel step
changes the backends of the next resolution. Pure: nothing here touches the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .abi import PROTOCOLS
from .mapstate import ServiceBackend, ServiceEntry
from .scenario import Scenario

MASK32 = 0xFFFFFFFF


def service_entries(scenario: Scenario, pod_labels: dict[str, dict[str, str]],
                    endpoint_ids: dict[str, int]) -> dict[tuple[str, int, int], ServiceEntry]:
    """The ServiceEntry of every port of every service, by (ClusterIP, port, protocol number).
    `pod_labels`: the pods' labels in force; `endpoint_ids`: pod key -> endpoint id."""
    out: dict[tuple[str, int, int], ServiceEntry] = {}
    index = 0
    for svc in scenario.services.values():
        members = [key for key, pod in scenario.pods.items()
                   if pod.namespace == svc.namespace and svc.selects(pod_labels.get(key, {}))]
        for sp in svc.ports:
            index += 1
            backends = []
            for key in members:
                pod = scenario.pods[key]
                port = sp.backend_port(pod)
                if port is not None:
                    backends.append(ServiceBackend(endpoint_ids[key] << 16 | port, key, pod.ip, port))
            proto = PROTOCOLS[sp.protocol]
            out[(svc.cluster_ip, sp.port, proto)] = ServiceEntry(
                svc.key, svc.cluster_ip, sp.port, proto, index, svc.session_affinity == "ClientIP",
                tuple(backends), sp.name)
    return out


def _mix(h: int, v: int) -> int:
    h = ((h ^ v) * 0x9E3779B1) & MASK32
    return h ^ (h >> 15)


def backend_hash(saddr: str, sport: int, daddr: str, dport: int, protocol: int, affinity: bool) -> int:
    """lb_hash() of dataplane/bpf/lib/lb.h, for the tuple a client sends to a ClusterIP."""
    h = 0x811C9DC5
    h = _mix(h, int(ipaddress.IPv4Address(saddr)))
    if not affinity:
        h = _mix(h, (sport << 16) | dport)
    h = _mix(h, int(ipaddress.IPv4Address(daddr)))
    return _mix(h, protocol)


def pick_backend(entry: ServiceEntry, saddr: str, sport: int) -> ServiceBackend | None:
    """The backend a new flow from (saddr, sport) to this service port is given; None when the
    service has no backend (the datapath drops: REASON_NO_SERVICE_BACKEND)."""
    if not entry.backends:
        return None
    h = backend_hash(saddr, sport, entry.ip, entry.port, entry.protocol, entry.affinity)
    return entry.backends[h % len(entry.backends)]


def source_port_for(entry: ServiceEntry, saddr: str, backend: str,
                    ports: Iterable[int] = range(32768, 61000)) -> int | None:
    """A source port from `ports` whose new flow from `saddr` lands on pod `backend`; None if
    there is none (with sessionAffinity ClientIP the client's address alone decides)."""
    for sport in ports:
        chosen = pick_backend(entry, saddr, sport)
        if chosen is not None and chosen.pod == backend:
            return sport
        if entry.affinity:
            return None
    return None


__all__ = ["backend_hash", "pick_backend", "service_entries", "source_port_for"]
