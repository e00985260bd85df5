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
import itertools
import secrets
from collections.abc import Iterable
from dataclasses import replace

from .abi import PROTOCOLS
from .mapstate import MapState, ServiceBackend, ServiceEntry
from .scenario import Probe, Scenario

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


def probe_backend(entry: ServiceEntry, saddr: str, wanted: str = "") -> ServiceBackend | None:
    """The backend a probe from `saddr` to this service port reaches: the one it names
    (`wanted`, a pod key), else the service's first backend; with sessionAffinity ClientIP the
    one the client's address hashes to. None when the service has no backend. ValueError when
    the probe names a pod it cannot reach through the service."""
    if not entry.backends:
        return None
    names = ", ".join(b.pod for b in entry.backends)
    if entry.affinity:
        chosen = pick_backend(entry, saddr, 0)
        assert chosen is not None
        if wanted and wanted != chosen.pod:
            raise ValueError(f"service {entry.service} has sessionAffinity ClientIP: {saddr} always reaches "
                             f"{chosen.pod}, never {wanted} (backends: {names})")
        return chosen
    if not wanted:
        return entry.backends[0]
    chosen = next((b for b in entry.backends if b.pod == wanted), None)
    if chosen is None:
        raise ValueError(f"{wanted} is no backend of service {entry.service} port {entry.port} now "
                         f"(backends: {names})")
    return chosen


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


def probe_source_port(entry: ServiceEntry, saddr: str, backend: str) -> int | None:
    """A source port for a probe that is to reach `backend`, starting the search at a random
    point so that successive probes do not reuse one port (a closed connection lingers in
    TIME_WAIT); None with sessionAffinity ClientIP, where any port reaches the same backend."""
    if entry.affinity:
        return None
    start = 32768 + secrets.randbelow(61000 - 32768)
    return source_port_for(entry, saddr, backend, itertools.chain(range(start, 61000), range(32768, start)))


def pin_probe(probe: Probe, state: MapState, client_ip: str) -> tuple[Probe, int | None]:
    """A probe to a service made to reach the backend `probe_backend` gives it: the probe with
    that backend named, and the source port to send from (None: any). A service without a
    backend leaves the probe as it is (the datapath drops it)."""
    dest = probe.destination
    entry = state.services.get((dest.ip, dest.port, PROTOCOLS[probe.protocol]))
    if dest.kind != "service" or entry is None:
        return probe, None
    backend = probe_backend(entry, client_ip, dest.backend)
    if backend is None:
        return probe, None
    return replace(probe, destination=replace(dest, backend=backend.pod)), probe_source_port(entry, client_ip, backend.pod)


def service_backend_address(probe: Probe, state: MapState, scenario: Scenario) -> tuple[str, int] | None:
    """(address, port) a probe pinned to a backend (`pin_probe`) is translated to; None for any
    other probe."""
    dest = probe.destination
    entry = state.services.get((dest.ip, dest.port, PROTOCOLS[probe.protocol]))
    if dest.kind != "service" or not dest.backend or entry is None:
        return None
    backend = next((b for b in entry.backends if b.pod == dest.backend), None)
    return (backend.ip, backend.port) if backend is not None else None


__all__ = ["backend_hash", "pick_backend", "probe_backend", "probe_source_port", "pin_probe", "service_backend_address",
           "service_entries", "source_port_for"]
