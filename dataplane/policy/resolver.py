"""Resolution: policies + lab state -> `MapState` (per-endpoint entries, L7 rule sets).

Precedence (DENY > REDIRECT > ALLOW > none, entries pushed down by `mapstate.normalize_entries`)
is explained once, in docs/datapath.md ("Precedence"). The attribution of an entry lists the
rules that produced its winning verdict.

L7 merge (Cilium pkg/policy/l4.go, "wildcard L3/L4 rules"): for a remote identity X and a port
p that end up REDIRECTed, the proxy's rule set is the union of the L7 rules of every allow
covering (X or any identity, p); if any of those allows has no L7 rules (L4-only, or L3-only
which covers every port), the set is allow-all: every request passes, still via the proxy.

Enforcement per endpoint and direction (Cilium policy enforcement modes):
    default  enforced once any policy spec that selects the endpoint enforces that direction
    always   always enforced
    never    never enforced, and no entries are emitted
Cilium's allow-localhost default (`--allow-localhost=auto`): traffic from the local host
identity to local pods is allowed; modelled as an ingress ALLOW for (host, any protocol) on every
enforced endpoint, so an explicit deny of the host still wins.

ICMP (Cilium `icmps`): each field is an entry of protocol ICMP whose port is the type, so an
echo request (type 8) and an echo reply (type 0) are told apart. A rule without ports
(L3-only) covers every protocol, ICMP included; `toPorts` never covers ICMP (protocol ANY is
TCP, UDP and SCTP). IPv6 fields make no entry: the lab carries no IPv6.

Named ports resolve on the destination: on ingress against the endpoint's own declared ports;
on egress against the pods holding each selected identity, or, for a peer that is not a pod
(wildcard, CIDR, entity), against every pod's declared ports (Cilium's cluster-wide named
port map). A name that resolves nowhere allows nothing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

from l7.ruleset import L7Policy, L7RuleSet

from .. import limits
from ..errors import SourceError, SourceLocation
from ..abi import IDENTITY_ANY, IDENTITY_HOST, PROTO_ANY, PROTO_ICMP, PROTOCOLS, PROXY_PORT, Direction, Verdict
from ..mapstate import (EndpointState, MapState, PolicyEntry, PolicyKey, RuleAttribution, lookup_policy,
                        normalize_entries, port_range_blocks)
from .api import CIDRPeer, EndpointPeer, L7Rules, Policy, PolicySpec, PortSpec, Rule
from .identity import IdentityTable
from .selectors import LabelSelector

ALLOW_LOCALHOST = "allow-localhost (Cilium default: the local host reaches local pods)"
ALL_PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class EndpointInfo:
    """What the resolver needs of a pod."""

    key: str
    endpoint_id: int
    ip: str
    labels: dict[str, str]  # identity labels
    ports: tuple[tuple[int, str, str], ...]  # (port, protocol, name)
    audit: bool = False  # this endpoint is in audit mode (its own PolicyAuditMode)
    aliases: tuple[str, ...] = ()  # further addresses of the endpoint (the host's: the pods' gateway)


class Contribution(NamedTuple):
    """One (identity, protocol, port range) a rule allows, denies or redirects. A named tuple:
    a wide policy makes hundreds of thousands of them before the policy-map bound refuses it,
    and a frozen dataclass costs several times as much to build."""

    identity: int
    protocol: int  # PROTO_ANY or a protocol number
    lo: int  # 0 with hi 65535: every port
    hi: int
    verdict: Verdict
    l7: L7Rules | None
    rule_id: int

    def covers(self, protocol: int, port: int) -> bool:
        return self.protocol == PROTO_ANY or (self.protocol == protocol and self.lo <= port <= self.hi)


@dataclass(frozen=True)
class RuleRef:
    """What a rule id points to, for traces."""

    policy: Policy
    spec: PolicySpec | None
    rule: Rule | None


@dataclass
class Resolution:
    state: MapState
    identities: IdentityTable
    rule_refs: dict[int, RuleRef]
    # (endpoint id, direction) -> policy specs selecting the endpoint
    selected_by: dict[tuple[int, Direction], list[tuple[Policy, PolicySpec]]]
    # (endpoint id, direction) -> the fromRequires / toRequires in force there, with their rules
    requirements: dict[tuple[int, Direction], list[tuple[Policy, Rule]]] = field(default_factory=dict)


def resolve(endpoints: list[EndpointInfo], identities: IdentityTable, policies: list[Policy],
            mode: str = "default", audit: bool = False, host: EndpointInfo | None = None) -> Resolution:
    """`host`: the node as a candidate host endpoint (identity host, the node's labels, its
    endpoint id; host.py); it becomes an endpoint only when a host spec (nodeSelector) selects
    it, so that without host policies traffic to and from the node is judged as before."""
    state = MapState(ipcache=dict(identities.ipcache))
    rule_refs: dict[int, RuleRef] = {}
    rule_ids: dict[tuple[int, int, int], int] = {}
    localhost_id = 1
    rule_refs[localhost_id] = RuleRef(Policy("builtin", ALLOW_LOCALHOST, "", ()), None, None)
    state.rules[localhost_id] = RuleAttribution(localhost_id, ALLOW_LOCALHOST, 0, "ingress")
    for pi, policy in enumerate(policies):
        for si, spec in enumerate(policy.specs):
            for ri, rule in enumerate(spec.rules):
                rid = len(rule_refs) + 1
                rule_ids[(pi, si, ri)] = rid
                rule_refs[rid] = RuleRef(policy, spec, rule)
                state.rules[rid] = RuleAttribution(rid, policy.display, rule.index, rule.section)

    selected_by: dict[tuple[int, Direction], list[tuple[Policy, PolicySpec]]] = {}
    requirements: dict[tuple[int, Direction], list[tuple[Policy, Rule]]] = {}
    all_contributions: dict[tuple[int, Direction], list[Contribution]] = {}
    produced = 0  # contributions so far: each becomes at least one map entry
    all_pod_ports = [p for ep in endpoints for p in ep.ports]
    subjects = list(endpoints)
    if host is not None and any(spec.host and spec.subject.matches(host.labels) for p in policies for spec in p.specs):
        subjects.append(host)
    for ep in subjects:
        is_host = ep is host
        enforced = {Direction.INGRESS: mode == "always", Direction.EGRESS: mode == "always"}
        contributions: dict[Direction, list[Contribution]] = {Direction.INGRESS: [], Direction.EGRESS: []}
        isolating: dict[Direction, set[tuple[str, str, str]]] = {Direction.INGRESS: set(), Direction.EGRESS: set()}
        for d in Direction:
            selected_by[(ep.endpoint_id, d)] = []
        required = _requirements(ep, policies, is_host)
        for (d, _), stated in required.items():
            requirements.setdefault((ep.endpoint_id, d), []).extend(stated)
        for pi, policy in enumerate(policies):
            for si, spec in enumerate(policy.specs):
                if spec.host != is_host or not spec.subject.matches(ep.labels):
                    continue  # a host spec (nodeSelector) selects the node, never pods (host.py)
                for d, flag in ((Direction.INGRESS, spec.enforces_ingress), (Direction.EGRESS, spec.enforces_egress)):
                    has_rules = any(r.direction == d.name.lower() for r in spec.rules)
                    if flag or has_rules:
                        selected_by[(ep.endpoint_id, d)].append((policy, spec))
                    if flag:
                        isolating[d].add(policy.key)
                    if flag and mode == "default":
                        enforced[d] = True
                for ri, rule in enumerate(spec.rules):
                    d = Direction.INGRESS if rule.direction == "ingress" else Direction.EGRESS
                    requires = tuple(sel for _, r in required.get((d, rule.is_deny), ()) for sel in r.requires)
                    got = _rule_contributions(rule, rule_ids[(pi, si, ri)], ep, identities, endpoints, all_pod_ports,
                                              limits.MAX_POLICY_ENTRIES - produced, requires)
                    produced += len(got)
                    contributions[d].extend(got)
        if mode == "never":
            enforced = {Direction.INGRESS: False, Direction.EGRESS: False}
            contributions = {Direction.INGRESS: [], Direction.EGRESS: []}
            isolating = {Direction.INGRESS: set(), Direction.EGRESS: set()}
        if enforced[Direction.INGRESS] and not is_host:  # the node's own traffic to itself never meets the datapath
            contributions[Direction.INGRESS].append(
                Contribution(IDENTITY_HOST, PROTO_ANY, 0, 65535, Verdict.ALLOW, None, localhost_id))
        state.endpoints[ep.endpoint_id] = EndpointState(
            ep.endpoint_id, ep.key, ep.ip, IDENTITY_HOST if is_host else identities.pod_identity[ep.key],
            enforced[Direction.INGRESS], enforced[Direction.EGRESS], audit or ep.audit, tuple(sorted(ep.labels.items())),
            tuple(sorted(isolating[Direction.INGRESS])), tuple(sorted(isolating[Direction.EGRESS])),
            ep.aliases)
        for d, contribs in contributions.items():
            _emit(state, ep.endpoint_id, d, contribs)
            all_contributions[(ep.endpoint_id, d)] = contribs
            if len(state.policy) > limits.MAX_POLICY_ENTRIES and contribs:
                raise _too_many_entries(rule_refs[contribs[-1].rule_id].rule)
    state.policy = normalize_entries(state.policy)
    for (endpoint_id, d), contribs in all_contributions.items():
        l7 = build_l7_policy(state, endpoint_id, d, contribs)
        if l7:
            state.l7[(endpoint_id, int(d), PROXY_PORT)] = l7
    return Resolution(state, identities, rule_refs, selected_by, requirements)


def _protocols(spec: PortSpec) -> list[int]:
    return [PROTOCOLS[p] for p in (ALL_PROTOCOLS if spec.protocol == "ANY" else (spec.protocol,))]


def _too_many_entries(rule: Rule | None) -> SourceError:
    where = rule.location if rule is not None and rule.location is not None else SourceLocation("policies")
    return SourceError(where, f"the policies resolve to more than {limits.MAX_POLICY_ENTRIES} policy map entries "
                              "(endpoints x peers x ports x protocols), more than the lab's policy map holds; "
                              "the bound was passed at this rule")


def _rule_contributions(rule: Rule, rule_id: int, ep: EndpointInfo, identities: IdentityTable,
                        endpoints: list[EndpointInfo], all_pod_ports: list[tuple[int, str, str]],
                        room: int = limits.MAX_POLICY_ENTRIES,
                        requires: tuple[LabelSelector, ...] = ()) -> list[Contribution]:
    """What one rule allows or denies for one endpoint; more than `room` raises (see limits).
    `requires`: the requirements in force for the rule's kind (`_requirements`), ANDed into its
    endpoint peers."""
    remote: set[int] = set()
    for peer in rule.peers:
        if requires and isinstance(peer, EndpointPeer):
            selector = peer.selector
            for required in requires:
                selector = selector.and_(required)
            peer = EndpointPeer(selector)
        if identities.ip_block_selects_pods and isinstance(peer, CIDRPeer) and peer.ip_block:
            _check_ip_block(rule, peer, identities)
        remote |= identities.select(peer)
    if IDENTITY_ANY in remote:
        remote = {IDENTITY_ANY}  # the wildcard covers every other identity
    out: list[Contribution] = []
    for ident in sorted(remote):
        if len(out) > room:
            raise _too_many_entries(rule)
        if not rule.port_rules:
            verdict = Verdict.DENY if rule.is_deny else Verdict.ALLOW
            out.append(Contribution(ident, PROTO_ANY, 0, 65535, verdict, None, rule_id))
            continue
        for pr in rule.port_rules:
            verdict = Verdict.DENY if rule.is_deny else (Verdict.REDIRECT if pr.l7 else Verdict.ALLOW)
            for spec in pr.ports:
                if spec.is_icmp:
                    # An `icmps` field: protocol ICMP, the type in the port (Cilium's key). An
                    # IPv6 field (ICMPv6) gets no entry: the lab carries no IPv6, so it can
                    # never match (`icmpv6_notes` says so in explain and validate).
                    if spec.protocol == "ICMP":
                        out.append(Contribution(ident, PROTO_ICMP, spec.port, spec.port, verdict, None, rule_id))
                    continue
                if spec.name:
                    if rule.direction == "ingress":
                        candidates = list(ep.ports)
                    elif ident != IDENTITY_ANY and identities.pods_with_identity(ident):
                        holders = set(identities.pods_with_identity(ident))
                        candidates = [p for e in endpoints if e.key in holders for p in e.ports]
                    else:
                        candidates = all_pod_ports
                    resolved = sorted({(number, proto) for number, proto, name in candidates if name == spec.name
                                       and (spec.protocol in ("ANY", proto))})
                    for number, proto in resolved:
                        out.append(Contribution(ident, PROTOCOLS[proto], number, number, verdict, pr.l7, rule_id))
                    continue
                # Protocol ANY is TCP, UDP and SCTP, on port 0 (every port) too: never ICMP,
                # which only an L3-only rule (no ports) or an `icmps` rule allows (Cilium
                # pkg/policy/rule.go: ProtoAny expands to TCP, UDP, SCTP).
                lo, hi = (0, 65535) if spec.port == 0 else (spec.port, spec.end_port or spec.port)
                for proto in _protocols(spec):
                    out.append(Contribution(ident, proto, lo, hi, verdict, pr.l7, rule_id))
    if len(out) > room:
        raise _too_many_entries(rule)
    return out


def _requirements(ep: EndpointInfo, policies: list[Policy],
                  is_host: bool = False) -> dict[tuple[Direction, bool], list[tuple[Policy, Rule]]]:
    """The rules with fromRequires / toRequires among those of every spec selecting `ep`, by
    (direction, deny). As Cilium documents them (policy language, "Additional label
    requirements"; pkg/policy/rule.go: "requirements form conjunctions across all rules"), the
    requirements of the allow rules selecting an endpoint are folded into the
    fromEndpoints/toEndpoints of all its allow rules, those of its deny rules into all its deny
    rules; entities, CIDRs, FQDNs and every-peer rules are left as they are."""
    out: dict[tuple[Direction, bool], list[tuple[Policy, Rule]]] = {}
    for policy in policies:
        for spec in policy.specs:
            if spec.host != is_host or not any(r.requires for r in spec.rules) or not spec.subject.matches(ep.labels):
                continue
            for rule in spec.rules:
                if rule.requires:
                    d = Direction.INGRESS if rule.direction == "ingress" else Direction.EGRESS
                    out.setdefault((d, rule.is_deny), []).append((policy, rule))
    return out


def _check_ip_block(rule: Rule, peer: CIDRPeer, identities: IdentityTable) -> None:
    """An ipBlock that selects pods must cover all pods of an identity or none: the datapath
    allows identities, so a pod inside would let the pods outside that share its labels in too."""
    split = identities.ip_block_split(peer)
    if split is None:
        return
    inside, outside, number = split
    where = rule.location if rule.location is not None else SourceLocation("policies")
    raise SourceError(where, f"{rule.path}: with settings.ipBlockSelectsPods, ipBlock {peer.cidr} covers pod {inside} "
                             f"but not pod {outside}, which has the same labels (identity {number}); the lab enforces "
                             "policy by identity: give the pods distinct labels, or cover both")


def _emit(state: MapState, endpoint_id: int, direction: Direction, contributions: list[Contribution]) -> None:
    for c in contributions:
        if c.protocol == PROTO_ANY:
            blocks = [(0, 0)]
        else:
            blocks = port_range_blocks(c.lo, c.hi)
        for port, prefix in blocks:
            key = PolicyKey(endpoint_id, direction, c.identity, c.protocol, port, prefix)
            entry = PolicyEntry(c.verdict, PROXY_PORT if c.verdict == Verdict.REDIRECT else 0, (c.rule_id,))
            old = state.policy.get(key)
            if old is None or entry.verdict > old.verdict:
                state.policy[key] = entry
            elif entry.verdict == old.verdict:
                state.policy[key] = PolicyEntry(old.verdict, old.proxy_port,
                                                tuple(sorted(set(old.rule_ids) | {c.rule_id})))


def build_l7_policy(state: MapState, endpoint_id: int, direction: Direction,
                    contributions: list[Contribution]) -> L7Policy:
    """Merge the L7 rules of every redirected (identity, port) (see module docstring)."""
    l7 = L7Policy()
    allows = [c for c in contributions if c.verdict in (Verdict.ALLOW, Verdict.REDIRECT)]
    for protocol, port, last in _redirect_segments(contributions):
        covering = [c for c in allows if c.covers(protocol, port)]
        for ident in sorted({c.identity for c in covering}):
            verdict, _ = lookup_policy(state, endpoint_id, direction, ident, protocol, port)
            if verdict != Verdict.REDIRECT:
                continue
            rule_set = l7.rules.setdefault((ident, port), L7RuleSet()) if port == last else \
                l7.ranges.setdefault((ident, port, last), L7RuleSet())
            for c in covering:
                if c.identity not in (ident, IDENTITY_ANY):
                    continue
                if c.l7 is None:
                    rule_set.allow_all = True
                    if c.rule_id not in rule_set.allow_all_rule_ids:
                        rule_set.allow_all_rule_ids.append(c.rule_id)
                    continue
                for l7_protocol, rules in c.l7.by_protocol():  # not `protocol`: the L4 one is still in use
                    rule_set.add(l7_protocol, rules, c.rule_id)
    return l7


def _redirect_segments(contributions: list[Contribution]) -> list[tuple[int, int, int]]:
    """(protocol, first port, last port) of the redirected ports, cut wherever any contribution
    of another port range begins or ends: inside one segment every port meets the same
    contributions, hence the same verdict and the same merged L7 set, so a redirected range
    (`port` + `endPort` with L7 rules) is one set for all its ports rather than one per port.
    The cuts are shared by all protocols because the proxy's sets are keyed by port alone."""
    cuts = sorted({x for c in contributions if c.protocol != PROTO_ANY for x in (c.lo, c.hi + 1)})
    out: set[tuple[int, int, int]] = set()
    for c in contributions:
        if c.verdict != Verdict.REDIRECT:
            continue
        inner = cuts[bisect.bisect_right(cuts, c.lo):bisect.bisect_right(cuts, c.hi)]
        points = [c.lo] + inner + [c.hi + 1]
        out.update((c.protocol, a, b - 1) for a, b in zip(points, points[1:]))
    return sorted(out)
