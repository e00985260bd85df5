"""The oracle: lab state + policies -> MapState, and the verdict for a flow with its reasons.

`PolicyEngine` holds the current state of a lab (labels, applied policies), re-resolves on every
step (all-or-nothing: a step that fails leaves the engine unchanged), and answers `verdict(flow)`
by running `mapstate.lookup_policy` over the MapState it produced -- the same lookup the BPF
program runs -- so the oracle and the kernel cannot diverge on L3/L4. A REDIRECT then evaluates
the merged L7 rule set the proxy would use.

Flow evaluation:
  pod -> pod       source egress, then destination ingress; both must allow; a deny anywhere wins
  pod -> world     source egress only
  world/host -> pod destination ingress only (host: allowed by allow-localhost when enforced)
  pod/world -> node source egress, then the host endpoint's ingress when a host policy
                   (nodeSelector) selects the node
  node -> pod/world the host endpoint's egress when a host policy selects the node, then the
                   pod's ingress; a REDIRECT drops (the node's packets leave at tc egress)
  NONE (no entry)  dropped when the direction is enforced, passes when it is not
  REDIRECT         HTTP: a request that matches the L7 set is allowed, else denied (403);
                   DNS: a query that matches is allowed, else refused
  audit            a would-be L3/L4 drop of an endpoint in audit mode passes (reported AUDIT);
                   L7 decisions are not audited (the proxy answers 403 regardless)
  destination      allowed traffic to a port the destination does not declare is refused;
                   an allowed ICMP echo request is answered by the destination's kernel
  ICMP             judged as protocol ICMP with the type as the port (8: echo request), as the
                   datapath looks it up; its echo reply passes by conntrack
  loopback         a pod to its own address: allowed, no policy applies (it never leaves the pod)
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from l7.decide import L7Verdict, decide, protocol_for
from l7.dns import fqdn_matches
from l7.http import HttpError, view_request
from l7.protocol import protocol as l7_protocol

from ..errors import ErrorList, SourceError, SourceLocation
from ..abi import IDENTITY_HOST, PROTO_ANY, PROTO_ICMP, PROTOCOL_NAMES, PROTOCOLS, PROXY_PORT, Direction, Verdict
from ..icmp import ECHO_REQUEST, type_name
from ..mapstate import DirectionLookup, MapState, ServiceEntry, flow_lookups
from ..scenario import HttpRequest, Probe, Scenario, Step
from .api import CIDRPeer, FQDNPeer, Policy
from .host import HOST_ENDPOINT_ID, HOST_ENDPOINT_NAME, host_policy_refusal
from .identity import IdentityAllocator, IdentityTable
from .notices import icmpv6_note, peer_notes, requirement_notes
from .parse import parse_documents
from .resolver import EndpointInfo, Resolution, resolve
from .selectors import pod_identity_labels
from .tlsports import tls_http_refusals
from ..services import probe_backend, service_entries
from .toservices import expand_service_peers


@dataclass(frozen=True)
class Flow:
    """A connection attempt (or datagram / DNS query) to judge.

    source: a pod key ("ns/name"), a world host name, or "host" (the lab node).
    """

    source: str
    destination_ip: str
    protocol: str = "TCP"  # TCP | UDP | SCTP | ICMP
    port: int = 80  # ICMP: the type (8, echo request), which is what policy looks up
    http: HttpRequest | None = None
    dns_name: str = ""  # the name queried, for a DNS query to a DNS-redirected port
    destination_name: str = ""  # for Host defaulting and display
    backend: str = ""  # to a service: the backend pod the flow is to reach (services.probe_backend)

    @classmethod
    def from_probe(cls, probe: Probe) -> "Flow":
        dest = probe.destination
        http = None
        if probe.protocol == "TCP":
            # The request the prober sends, Host header included, so that host rules see it.
            http = probe.http or HttpRequest()
            if not any(k.lower() == "host" for k in http.headers):
                http = replace(http, headers={"Host": probe.host_header, **http.headers})
        port = ECHO_REQUEST if probe.icmp is not None else dest.port
        return cls(probe.source, dest.ip, probe.protocol, port, http, probe.dns.name if probe.dns else "",
                   dest.dns_name or dest.name.split("/")[-1], dest.backend)


@dataclass
class Decision:
    outcome: str  # allowed | dropped | denied | refused
    flow: Flow
    trace: list[str] = field(default_factory=list)
    source_identity: int = 0
    destination_identity: int = 0
    egress: str = "n/a"  # verdict name, "not enforced", or "n/a"
    ingress: str = "n/a"
    rule_ids: list[int] = field(default_factory=list)
    audited: bool = False
    l7: L7Verdict | None = None  # the L7 verdict, when the flow reached the proxy's rules
    # To a service: "ns/svc VIP:port/PROTO -> pod ns/b IP:port", the translation the datapath
    # makes before policy (the rest of the decision is about the backend).
    translation: str = ""

    @property
    def expectation(self) -> str:
        """The outcome as a scenario probe names it: `audited` for an allowed flow the kernel
        reports as AUDIT, a would-be L3/L4 drop that audit mode let pass. A flow that also went
        through the proxy is reported as REDIRECT (the kernel ranks it above AUDIT): `allowed`."""
        if self.outcome == "allowed" and self.audited and self.l7 is None:
            return "audited"
        return self.outcome

    def to_json(self) -> dict[str, Any]:
        f = self.flow
        return {
            "outcome": self.outcome,
            "flow": {"source": f.source, "destination_ip": f.destination_ip, "protocol": f.protocol, "port": f.port,
                     "http": {"method": f.http.method, "path": f.http.path, "headers": dict(f.http.headers)} if f.http else None,
                     "dns_name": f.dns_name or None},
            "source_identity": self.source_identity,
            "destination_identity": self.destination_identity,
            "egress": self.egress,
            "ingress": self.ingress,
            "rule_ids": list(self.rule_ids),
            "audited": self.audited,
            "translation": self.translation or None,
            "trace": list(self.trace),
        }


@dataclass(frozen=True)
class EngineState:
    """What a policy engine holds at one moment: the applied policies, the labels, and their
    resolution. Never changed in place: a change makes a new one, so an old one is a complete
    snapshot to go back to."""

    policies: dict[tuple[str, str, str], Policy]
    pod_labels: dict[str, dict[str, str]]
    namespace_labels: dict[str, dict[str, str]]
    resolution: Resolution
    # Pod key -> in audit mode: from the scenario (settings.audit, a pod's or its namespace's
    # `audit`), then changed by audit steps (`l7lab audit on|off`).
    audit: dict[str, bool] = field(default_factory=dict)
    # Address -> the names DNS answers gave it (every endpoint's FQDN cache, dataplane/fqdn):
    # what toFQDNs selectors select.
    fqdn_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Address -> which lookup taught it ("api.example.com looked up by shop/checkout"), for explain.
    fqdn_sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Proposal:
    """A step resolved against the engine's state (`before`), not in force until committed.
    Its map state is what the datapath and the proxy are given before the engine commits it."""

    step: Step
    before: EngineState
    after: EngineState

    @property
    def map_state(self) -> MapState:
        return self.after.resolution.state

    @property
    def policies(self) -> dict[tuple[str, str, str], Policy]:
        return self.after.policies


class PolicyEngine:
    """Policies and labels of one lab; resolves them and judges flows.

    A change is proposed (`propose`: checked and resolved, nothing in force), then committed
    (`commit`); a caller that cannot enforce a proposal simply does not commit it. `snapshot`
    and `restore` take the engine back to an earlier state (a change undone after its commit)."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.allocator = IdentityAllocator()
        policies: dict[tuple[str, str, str], Policy] = {}
        for policy in parse_documents([s.document for s in scenario.policies]):
            policies[policy.key] = policy
        pods = {k: dict(p.labels) for k, p in scenario.pods.items()}
        namespaces = {n: dict(ns.labels) for n, ns in scenario.namespaces.items()}
        audit = {k: scenario.settings.audit or p.audit or scenario.namespaces[p.namespace].audit
                 for k, p in scenario.pods.items()}
        self._state = EngineState(policies, pods, namespaces, self._resolve(policies, pods, namespaces, audit, {}),
                                  audit)

    # ------------------------------------------------------------------ the state in force

    @property
    def policies(self) -> dict[tuple[str, str, str], Policy]:
        return self._state.policies

    @property
    def pod_labels(self) -> dict[str, dict[str, str]]:
        return self._state.pod_labels

    @property
    def namespace_labels(self) -> dict[str, dict[str, str]]:
        return self._state.namespace_labels

    @property
    def resolution(self) -> Resolution:
        return self._state.resolution

    @property
    def audit(self) -> dict[str, bool]:
        """Pod key -> whether the endpoint is in audit mode now."""
        return self._state.audit

    # ------------------------------------------------------------------ state changes

    def propose(self, step: Step) -> Proposal:
        """Apply, delete, relabel or switch audit mode (probes change nothing), resolved but not in force:
        SourceError, or ErrorList with every error found, if any part of the step is wrong."""
        before = self._state
        policies = dict(before.policies)
        pods = {k: dict(v) for k, v in before.pod_labels.items()}
        namespaces = {k: dict(v) for k, v in before.namespace_labels.items()}
        errors: list[SourceError] = []
        if step.apply:
            try:
                for policy in parse_documents([s.document for s in step.apply]):
                    policies[policy.key] = policy  # same kind/namespace/name replaces the old version
            except ErrorList as exc:
                errors.extend(exc.errors)
            except SourceError as exc:
                errors.append(exc)
        for j, ref in enumerate(step.delete):
            key = (ref.kind, ref.namespace, ref.name)
            if key not in policies:
                known = ", ".join(p.display for p in policies.values()) or "none"
                what = f"{ref.kind} {ref.namespace + '/' if ref.namespace else ''}{ref.name}"
                errors.append(SourceError(SourceLocation(self.scenario.path, 0, f"steps[{step.index}].delete[{j}]"),
                                          f"cannot delete {what}: no such policy is applied (applied: {known})"))
            else:
                del policies[key]
        for r in step.relabel:
            target = pods[r.name] if r.target == "pod" else namespaces[r.name]
            target.update(r.set)
            for key in r.remove:
                target.pop(key, None)
        audit = dict(before.audit)
        for a in step.audit:  # in order: a later change of the same endpoint wins
            for key, pod in self.scenario.pods.items():
                if a.target == "all" or (a.target == "pod" and key == a.name) or \
                        (a.target == "namespace" and pod.namespace == a.name):
                    audit[key] = a.on
        ErrorList.raise_if_any(errors)
        after = EngineState(policies, pods, namespaces,
                            self._resolve(policies, pods, namespaces, audit, before.fqdn_names), audit,
                            before.fqdn_names, before.fqdn_sources)
        return Proposal(step, before, after)

    def propose_fqdn(self, fqdn_names: dict[str, tuple[str, ...]], sources: dict[str, str] | None = None) -> Proposal:
        """The state in force with what DNS answers taught replaced by `fqdn_names` (address ->
        names; `sources`: address -> the lookup that taught it), resolved but not in force."""
        before = self._state
        after = replace(before, fqdn_names=dict(fqdn_names), fqdn_sources=dict(sources or {}),
                        resolution=self._resolve(before.policies, before.pod_labels, before.namespace_labels,
                                                 before.audit, fqdn_names))
        return Proposal(Step(0, "names learned from DNS"), before, after)

    def with_fqdn_names(self, fqdn_names: dict[str, tuple[str, ...]],
                        sources: dict[str, str] | None = None) -> "PolicyEngine":
        """A copy of this engine judging as if DNS had taught `fqdn_names` (the oracle's model
        of lookups); this engine is left as it is."""
        state = self._state
        if fqdn_names == state.fqdn_names and (sources is None or sources == state.fqdn_sources):
            return self
        other = copy.copy(self)
        other._state = self.propose_fqdn(fqdn_names, sources).after
        return other

    def commit(self, proposal: Proposal) -> None:
        """Put a proposal in force. It must have been proposed against the state in force:
        a proposal made before another commit would silently undo that one."""
        if proposal.before is not self._state:
            raise ValueError(f"stale proposal for step {proposal.step.index}: the engine changed since it was proposed")
        self._state = proposal.after

    def apply_step(self, step: Step) -> None:
        """Propose and commit at once (all-or-nothing): what a dry run and a scenario step do."""
        self.commit(self.propose(step))

    def snapshot(self) -> EngineState:
        """The state in force, to `restore` later."""
        return self._state

    def restore(self, snapshot: EngineState) -> None:
        """Go back to a state this engine held (a committed change undone)."""
        self._state = snapshot

    def _resolve(self, policies: dict, pod_labels: dict, namespace_labels: dict, audit: dict[str, bool],
                 fqdn_names: dict[str, tuple[str, ...]]) -> Resolution:
        sc = self.scenario
        refusal = host_policy_refusal(policies.values(), sc.node.name, sc.node.labels)
        if refusal is not None:
            raise refusal
        # HTTP rules where world hosts serve TLS: the proxy could not read them (tlsports.py).
        ErrorList.raise_if_any(tls_http_refusals(policies.values(), sc))
        labels = {k: pod_identity_labels(pod_labels[k], p.namespace, namespace_labels.get(p.namespace, {}),
                                         sc.settings.cluster_name)
                  for k, p in sc.pods.items()}
        # toServices peers become the selectors of the services' backends (services.py).
        expanded = expand_service_peers(list(policies.values()), sc)
        table = IdentityTable.build(self.allocator, labels, {k: p.ip for k, p in sc.pods.items()},
                                    sc.node_addresses(), sorted(fqdn_names.items()),
                                    expanded,
                                    {h.address: (h.entity, h.name) for h in sc.world.values() if h.entity},
                                    sc.settings.ip_block_selects_pods)
        endpoints = [EndpointInfo(k, i + 1, p.ip, labels[k], tuple((pt.port, pt.protocol, pt.name) for pt in p.ports),
                                  audit.get(k, False))
                     for i, (k, p) in enumerate(sc.pods.items())]
        # The node as a candidate host endpoint: an endpoint only once a host spec selects it.
        node_ip, *aliases = sc.node_addresses()
        # Lab-wide audit mode (Cilium's --policy-audit-mode) covers it; audit steps switch pods only.
        host = EndpointInfo(HOST_ENDPOINT_NAME, HOST_ENDPOINT_ID, node_ip, dict(sc.node.labels),
                            tuple((pt.port, pt.protocol, pt.name) for pt in sc.node.ports), sc.settings.audit,
                            tuple(aliases))
        # settings.audit is already in `audit` (every pod starts on); not passed again, so that
        # an audit step can switch it off for a pod of a lab that came up in audit mode.
        resolution = resolve(endpoints, table, expanded, sc.settings.policy_enforcement, host=host)
        # The services' backends follow the pods' labels in force (a relabel moves them).
        resolution.state.services = service_entries(sc, pod_labels, {e.key: e.endpoint_id for e in endpoints})
        return resolution

    # ------------------------------------------------------------------ queries

    def map_state(self) -> MapState:
        return self.resolution.state

    @property
    def identities(self) -> IdentityTable:
        return self.resolution.identities

    def endpoint_id(self, pod_key: str) -> int:
        return list(self.scenario.pods).index(pod_key) + 1

    def verdict(self, flow: Flow) -> Decision:
        protocol = PROTOCOLS.get(flow.protocol.upper(), -1)
        entry = self.map_state().services.get((flow.destination_ip, flow.port, protocol))
        if entry is None:
            return _Judge(self, flow).run()
        return self._service_verdict(flow, entry)

    def _service_verdict(self, flow: Flow, entry: ServiceEntry) -> Decision:
        """A flow to a ClusterIP, judged as the datapath judges it: translated to the backend the
        flow reaches (lib/lb.h), then policy of the backend pod at its target port (as Cilium)."""
        sc = self.scenario
        key = sc.pod_key(flow.source)
        client = sc.pods[key].ip if key else sc.world[flow.source].address if flow.source in sc.world else ""
        service = f"service {entry.service} {entry.ip}:{entry.port}/{flow.protocol.upper()}"
        backend = probe_backend(entry, client, flow.backend)
        if backend is None:
            d = Decision("dropped", flow, trace=[f"flow: {flow.source} -> {service}",
                                                 f"{service} has no backend (no pod matches its selector): "
                                                 f"DROP (no service backend)"])
            d.translation = f"{service} -> no backend"
            return d
        how = ("sessionAffinity ClientIP: the client's address picks it" if entry.affinity
               else "the probe's source port is chosen to reach it" if flow.backend
               else "the first backend; a probe names another with backend:")
        d = _Judge(self, replace(flow, destination_ip=backend.ip, port=backend.port)).run()
        d.translation = f"{service} -> pod {backend.pod} {backend.ip}:{backend.port}"
        d.trace.insert(0, f"{d.translation} (translated before policy; {how}; backends: "
                          f"{', '.join(b.pod for b in entry.backends)})")
        if d.outcome == "refused" and flow.protocol.upper() != "TCP":
            # The backend's ICMP port unreachable quotes the datagram as the backend received
            # it; the datapath does not translate ICMP errors back (lib/lb.h), so the client's
            # socket, connected to the ClusterIP, never matches it and hears nothing.
            d.trace.append("the ICMP port unreachable names the backend, not the ClusterIP (ICMP errors are not "
                           "translated back): the client sees no answer: dropped")
            d.outcome = "dropped"
        return d


_PROTO_NAMES = {PROTO_ANY: "any", **PROTOCOL_NAMES}


def _port_text(port: int, prefix: int) -> str:
    if prefix == 0:
        return "any"
    if prefix == 16:
        return str(port)
    return f"{port}-{port + (1 << (16 - prefix)) - 1}"


class _Judge:
    """One flow's evaluation, writing the trace as it goes."""

    def __init__(self, engine: PolicyEngine, flow: Flow) -> None:
        self.engine = engine
        self.flow = flow
        self.state = engine.map_state()
        self.ids = engine.identities
        self.decision = Decision("allowed", flow)
        self.trace = self.decision.trace

    def run(self) -> Decision:
        sc, flow, d = self.engine.scenario, self.flow, self.decision
        protocol = PROTOCOLS.get(flow.protocol.upper())
        if protocol is None:
            raise ValueError(f"unknown protocol {flow.protocol!r}")
        src_pod = sc.pod_key(flow.source) if flow.source != "host" else None
        if flow.source == "host":
            src_identity, src_desc = IDENTITY_HOST, "host (the lab node)"
        elif src_pod is not None:
            src_identity, src_desc = self.ids.pod_identity[src_pod], f"pod {src_pod}"
        elif flow.source in sc.world:
            src_identity = self.state.identity_of(sc.world[flow.source].address)
            src_desc = f"world host {flow.source} ({sc.world[flow.source].address})"
        else:
            raise ValueError(f"unknown flow source {flow.source!r}: expected a pod, a world host or 'host'")
        dst_pod = next((k for k, p in sc.pods.items() if p.ip == flow.destination_ip), None)
        to_node = flow.destination_ip in sc.node_addresses()
        # The remote address of each direction, for the notes on CIDR peers (`notices.peer_notes`).
        self.remote_ip = {Direction.EGRESS: flow.destination_ip,
                          Direction.INGRESS: sc.pods[src_pod].ip if src_pod is not None else
                          sc.world[flow.source].address if flow.source in sc.world else None}
        dst_identity = self.state.identity_of(flow.destination_ip)
        d.source_identity, d.destination_identity = src_identity, dst_identity
        what = (f"ICMP type {flow.port} ({type_name(flow.port)})" if protocol == PROTO_ICMP else f"{flow.protocol}/{flow.port}") + \
            (f" {flow.http}" if flow.http else "") + \
            (f" DNS query {flow.dns_name}" if flow.dns_name else "")
        self.trace.append(f"flow: {src_desc} -> {flow.destination_ip} {what}")
        self.trace.append(f"source identity {self.ids.describe(src_identity)}")
        dst_desc = f"pod {dst_pod}" if dst_pod else f"node {sc.node.name} (host)" if to_node else next(
            (f"world host {h.name}" for h in sc.world.values() if h.address == flow.destination_ip), "outside the lab")
        self.trace.append(f"destination {dst_desc}, identity {self.ids.describe(dst_identity)} (ipcache longest match)")
        self.fqdn_note(flow.destination_ip)

        if src_pod is not None and dst_pod == src_pod:
            # A pod's traffic to its own address loops back inside its namespace and never
            # reaches the datapath; no policy applies (upstream netpol e2e: Reachability.AllowLoopback,
            # "loopback logic follows no policy"; Cilium likewise never sees it).
            self.trace.append("loopback: a pod's traffic to its own address never leaves its namespace; "
                              "no policy applies")
            self.listening(dst_pod)
            return d
        # The lookups the datapath makes (the proxy takes its L7 sets from the same walk).
        src_ep = self.state.endpoints[self.engine.endpoint_id(src_pod)] if src_pod is not None else None
        if flow.source == "host":
            src_ep = self.state.endpoints.get(HOST_ENDPOINT_ID)  # the host's egress, when a host policy selects it
        dst_ep = self.state.endpoints[self.engine.endpoint_id(dst_pod)] if dst_pod is not None else None
        if to_node:
            # The host endpoint exists once a host policy selects the node (host.py); the
            # datapath finds it by the node's addresses.
            dst_ep = self.state.endpoints.get(HOST_ENDPOINT_ID)
            if dst_ep is None:
                self.trace.append("ingress: no host policy selects the node; what reaches it is not judged "
                                  "against a policy of its own")
        lookups = {look.direction: look for look in
                   flow_lookups(self.state, src_ep, dst_ep, src_identity, dst_identity, protocol, flow.port)}
        redirects: list[tuple[int, Direction, int]] = []  # (endpoint id, direction, remote identity)
        if Direction.EGRESS in lookups:
            if not self.direction(lookups[Direction.EGRESS], redirects):
                return d
        elif flow.source == "host":
            self.trace.append("egress: no host policy selects the node; what it sends is not judged against "
                              "a policy of its own")
        else:
            self.trace.append("egress: source is not a lab endpoint; no egress policy applies")
        if Direction.INGRESS in lookups:
            if not self.direction(lookups[Direction.INGRESS], redirects):
                return d
        elif not to_node:
            self.trace.append("ingress: destination is not a lab endpoint; no ingress policy applies")
        if redirects and flow.source == "host":
            # The node's own packets leave it at tc egress (to_container), where nothing can be
            # handed to the proxy: the datapath drops them (PROXY_NOT_AT_EGRESS), fail closed.
            self.trace.append("the node's own traffic leaves at tc egress, where it cannot be redirected to the "
                              "L7 proxy: DROP (PROXY_NOT_AT_EGRESS)")
            d.outcome = "dropped"
            return d
        if redirects and not self.l7(redirects):
            return d
        self.listening(dst_pod)
        return d

    def direction(self, look: DirectionLookup, redirects: list) -> bool:
        d = self.decision
        ep, direction, remote = look.endpoint, look.direction, look.remote_identity
        endpoint_id = ep.endpoint_id
        name = direction.name.lower()
        selecting = self.engine.resolution.selected_by.get((endpoint_id, direction), [])
        if selecting:
            self.trace.append(f"{name} of {ep.name} (endpoint {endpoint_id}): selected by "
                              + ", ".join(sorted({p.display + (f' {s.path}' if len(p.specs) > 1 else '') for p, s in selecting})))
        else:
            self.trace.append(f"{name} of {ep.name} (endpoint {endpoint_id}): no policy selects it in this direction")
        self.trace.extend(f"  {note}" for note in peer_notes(selecting, name, self.remote_ip.get(direction), self.ids))
        self.trace.extend(f"  {note}" for note in requirement_notes(
            self.engine.resolution.requirements.get((endpoint_id, direction), ()), ep.name))
        if self.flow.protocol == "ICMP":
            notes = {note for policy, spec in selecting for rule in spec.rules
                     if rule.direction == name and (note := icmpv6_note(policy, rule)) is not None}
            self.trace.extend(f"  note: {note}" for note in sorted(notes))
        enforced, verdict, found = look.enforced, look.verdict, look.found
        for key, entry in found:
            rules = "; ".join(self.rule_text(r) for r in entry.rule_ids)
            self.trace.append(f"  entry identity={self.ids.describe(key.identity)} proto={_PROTO_NAMES.get(key.protocol, key.protocol)} "
                              f"port={_port_text(key.port, key.port_prefix)} -> {entry.verdict.name}  [{rules}]")
        if verdict == Verdict.NONE:
            if not enforced:
                self.trace.append(f"  no entry matched; {name} is not enforced on {ep.name}: pass")
                setattr(d, name, "not enforced")
                return True
            self.trace.append(f"  no entry matched and {name} is enforced on {ep.name} (default deny): DROP")
            self.trace.extend(self.cidr_notes(selecting, direction, remote))
            return self.drop(ep.audit, name, "NONE (default deny)")
        winners = [e for _, e in found if e.verdict == verdict]
        for e in winners:
            d.rule_ids.extend(r for r in e.rule_ids if r not in d.rule_ids)
        setattr(d, name, verdict.name)
        if verdict == Verdict.DENY:
            self.trace.append("  explicit deny wins over every allow: DROP")
            return self.drop(ep.audit, name, "DENY")
        if verdict == Verdict.REDIRECT:
            self.trace.append(f"  REDIRECT to the L7 proxy (port {PROXY_PORT})")
            redirects.append((endpoint_id, direction, remote))
        else:
            self.trace.append("  ALLOW")
        return True

    def fqdn_note(self, address: str) -> None:
        """Which lookup taught the destination's address to toFQDNs selectors; or, for a world
        host whose name a toFQDNs selector matches, that no lookup has (yet)."""
        state = self.engine.snapshot()
        names = state.fqdn_names.get(address)
        if names and address in state.fqdn_sources:
            self.trace.append(f"  {address} is {', '.join(names)} to toFQDNs selectors: learned from the DNS answer "
                              f"to {state.fqdn_sources[address]}")
            return
        host = next((h for h in self.engine.scenario.world.values() if h.address == address), None)
        if host is None or not host.dns_names:
            return
        selectors = {p.describe() for policy in state.policies.values() for spec in policy.specs
                     for rule in spec.rules for p in rule.peers if isinstance(p, FQDNPeer)
                     and any(fqdn_matches(n, p.match_name, p.match_pattern) for n in (*host.dns_names, *host.aliases))}
        if selectors:
            self.trace.append(f"  no lookup relayed by the DNS proxy has taught {address} ({', '.join(host.dns_names)}): "
                              f"{', '.join(sorted(selectors))} select only addresses that DNS answers taught, "
                              f"so not this one (look the name up through a DNS rule first)")

    def remote_address(self, direction: Direction) -> str:
        """The address of the other side of the flow, seen from `direction`'s endpoint."""
        if direction == Direction.EGRESS:
            return self.flow.destination_ip
        sc, source = self.engine.scenario, self.flow.source
        if source == "host":
            return sc.node_ip
        if source in sc.world:
            return sc.world[source].address
        return sc.pods[sc.pod_key(source) or source].ip

    def cidr_notes(self, selecting: list, direction: Direction, remote: int) -> list[str]:
        """Why a CIDR rule whose prefix holds the remote address did not allow it: the address
        is a cluster endpoint's (a pod, the node, an entity host), which carries its own
        identity, never a CIDR one; Cilium's CIDR rules never select cluster endpoints."""
        address = ipaddress.ip_address(self.remote_address(direction))
        notes = []
        for policy, spec in selecting:
            for rule in spec.rules:
                if rule.is_deny or rule.direction != direction.name.lower():
                    continue
                for peer in rule.peers:
                    if not isinstance(peer, CIDRPeer) or address not in ipaddress.ip_network(peer.cidr) or \
                            any(address in ipaddress.ip_network(e) for e in peer.excepts):
                        continue
                    if remote not in self.ids.select(peer):  # the address's own identity is not a CIDR one
                        notes.append(f"  note: {address} lies inside CIDR {peer.cidr} of {policy.display} {rule.path}, "
                                     f"but it is a cluster endpoint's address with identity {self.ids.describe(remote)}: "
                                     f"CIDR rules never select cluster endpoints (as in Cilium)")
        return notes

    def drop(self, audit: bool, name: str, verdict: str) -> bool:
        d = self.decision
        setattr(d, name, verdict)
        if audit:
            d.audited = True
            self.trace.append("  AUDIT: the endpoint is in audit mode; the would-be drop passes")
            return True
        d.outcome = "dropped"
        return False

    def l7(self, redirects: list[tuple[int, Direction, int]]) -> bool:
        """The request through the L7 sets of every REDIRECT, by `l7.decide.decide`: the same
        decision the proxy makes (proxy.state), written out set by set."""
        d, flow = self.decision, self.flow
        sets = [self.state.applied_l7_set(self.state.endpoints[endpoint_id], direction, remote, flow.port)
                for endpoint_id, direction, remote in redirects]
        if flow.protocol.upper() not in ("TCP", "UDP"):
            # SCTP under a protocol-ANY redirect (DNS rules on a port of protocol ANY): no proxy
            # side receives it, so the datapath finds no proxy socket for the packet and drops
            # it, fail closed (REASON_PROXY_SOCKET_MISSING, lib/proxy.h), whatever the rules say.
            self.trace.append(f"the L7 proxy has no {flow.protocol} side: the datapath finds no proxy socket "
                              f"for it and drops it (fail closed)")
            d.outcome = "dropped"
            return False
        protocol = protocol_for(sets, flow.protocol)
        notes: list[str] = []
        if protocol == "dns":
            if not flow.dns_name:
                # The DNS side of the proxy (UDP and TCP) speaks DNS only: it cannot answer what it
                # cannot parse. Over TCP the first two bytes of anything else (an HTTP request's
                # "GE") announce a message longer than any query: the connection is closed,
                # nothing answered.
                self.trace.append(f"{sets[0].where}: not a DNS query: the DNS proxy drops it"
                                  + (" (over TCP: it closes the connection unanswered)"
                                     if flow.protocol.upper() == "TCP" else ""))
                d.outcome = "dropped"
                return False
            request: object = flow.dns_name
        else:
            req = flow.http or HttpRequest()
            try:
                # The rules see the request as the proxy forwards it: normalized.
                request, notes = view_request(req.method, req.path, req.headers, flow.destination_name)
            except HttpError as exc:
                self.trace.append(f"{sets[0].where}: the proxy rejects {req.method} {req.path}: "
                                  f"{exc.reason} ({exc.status})")
                d.outcome = "denied"
                return False
        proto = l7_protocol(protocol)
        verdict = d.l7 = decide(protocol, request, sets, self.state.policy_of)
        for step in verdict.steps:
            where = step.applied.where
            if step.verdict is None:
                self.trace.append(f"{where}: no L7 rule set for this peer and port: request refused by the proxy")
                continue
            self.trace.extend(f"{where}: {note}" for note in notes)
            ids = step.verdict.rule_ids
            self.trace.append(f"{where}: {proto.describe(request)} {step.verdict.why}"
                              + (f" [{'; '.join(self.rule_text(r) for r in ids)}]" if ids else ""))
            d.rule_ids.extend(r for r in ids if r not in d.rule_ids)
        if not verdict.allowed:
            if verdict.steps and verdict.steps[-1].verdict is not None and proto.refusal_note:
                self.trace.append(f"  {proto.refusal_note}")
            d.outcome = proto.refused_as
            return False
        return True

    def listening(self, dst_pod: str | None) -> None:
        sc, flow = self.engine.scenario, self.flow
        ports = sc.pods[dst_pod].ports if dst_pod else sc.node.ports if flow.destination_ip in sc.node_addresses() \
            else next((h.ports for h in sc.world.values() if h.address == flow.destination_ip), None)
        if ports is None:
            return
        if flow.protocol == "ICMP":
            self.trace.append("allowed: the destination's kernel answers the echo request; the echo reply passes "
                              "by conntrack" + (" (audit: would have been dropped)" if self.decision.audited else ""))
            return
        if not any(p.port == flow.port and p.protocol == flow.protocol for p in ports):
            self.trace.append(f"policy allows it, but nothing listens on {flow.port}/{flow.protocol}: refused")
            self.decision.outcome = "refused"
        else:
            self.trace.append("allowed" + (" (audit: would have been dropped)" if self.decision.audited else ""))

    def rule_text(self, rule_id: int) -> str:
        ref = self.engine.resolution.rule_refs.get(rule_id)
        if ref is None:
            return f"rule {rule_id}"
        if ref.rule is None:
            return ref.policy.name
        return f"{ref.policy.display} {ref.rule.path}"


def explain_text(decision: Decision) -> str:
    """Plain-text rendering of a decision for `l7lab explain` (rich can print it as is)."""
    lines = [f"verdict: {decision.outcome.upper()}"]
    lines += [f"  {line}" for line in decision.trace]
    return "\n".join(lines)


__all__ = ["Decision", "EngineState", "Flow", "PolicyEngine", "Proposal", "explain_text"]
