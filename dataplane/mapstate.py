"""Map state: the contract between the resolver (which computes it) and the loader (which writes
it into BPF maps), and the one lookup algorithm both the kernel and the oracle run over it.

Everything here is plain data. The resolver produces a `MapState` for a whole lab; the loader
diffs two `MapState`s into map updates; `lookup_policy` is the Python twin of the lookup the BPF
program performs, so that the oracle answers exactly what the kernel answers.

Identities follow Cilium's numbering (pkg/identity/numericidentity.go): reserved identities
below 256, label-set identities from 256 up, CIDR identities from 2^24 up. They, the protocol
numbers, the proxy port and the `Direction`/`Verdict` enums are the datapath's ABI, declared in
abi.py.

Policy lookup: `lookup_policy` mirrors dataplane/bpf/lib/policy.h and `normalize_entries` pushes precedence
down; both are explained once, in docs/datapath.md ("Precedence").
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from l7.decide import AppliedSet
from l7.ruleset import L7Policy, L7RuleSet

from .abi import IDENTITY_ANY, IDENTITY_WORLD, PROTO_ANY, PROXY_PORT, Direction, Verdict


@dataclass(frozen=True, order=True)
class PolicyKey:
    endpoint_id: int
    direction: Direction
    identity: int  # IDENTITY_ANY for any
    protocol: int  # PROTO_ANY for any (then port == 0 and port_prefix == 0)
    port: int = 0  # first port of the aligned block
    port_prefix: int = 0  # 0..16 bits of the port that must match; 16 = exact port

    def covers_port(self, port: int) -> bool:
        if self.port_prefix == 0:
            return True
        shift = 16 - self.port_prefix
        return (port >> shift) == (self.port >> shift)


@dataclass(frozen=True)
class PolicyEntry:
    verdict: Verdict
    proxy_port: int = 0  # set for REDIRECT
    rule_ids: tuple[int, ...] = ()  # attribution ids into MapState.rules


@dataclass(frozen=True)
class RuleAttribution:
    """Which policy rule produced an entry: shown in flows and by `explain`."""

    rule_id: int
    policy: str  # "Kind namespace/name" or "Kind name" for cluster-wide kinds
    rule_index: int  # index of the rule inside the policy (ingress[i] / egress[i] / ...)
    section: str  # "ingress", "egress", "ingressDeny", "egressDeny"

    @property
    def text(self) -> str:
        """How flow records and traces name the rule: "Kind ns/name ingress[0]"."""
        return f"{self.policy} {self.section}[{self.rule_index}]"


PolicyName = tuple[str, str, str]  # (kind, namespace, name); namespace "" for a cluster-wide kind


def policy_display(kind: str, namespace: str, name: str) -> str:
    """How verdicts name a policy: "Kind namespace/name", or "Kind name" for a cluster-wide one."""
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


@dataclass(frozen=True)
class EndpointState:
    endpoint_id: int  # 1..65535, stable for a pod within a lab
    name: str  # "namespace/pod"
    ip: str
    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    audit: bool = False
    # The identity's labels, sorted: not written to any BPF map, carried so that flow records
    # (the agent's and the proxy's, which loads this state) name them as they are now.
    labels: tuple[tuple[str, str], ...] = ()
    # The policies whose selection of this endpoint makes each direction enforced, as
    # (kind, namespace, name), sorted: the ones a default deny there is due to. Not written to
    # any BPF map; carried so that the metrics and the service map name them alike.
    ingress_isolated_by: tuple[PolicyName, ...] = ()
    egress_isolated_by: tuple[PolicyName, ...] = ()
    # Further addresses of the same endpoint, written to the endpoints map like `ip`: the host
    # endpoint's second address (the pods' gateway). Pods have none.
    aliases: tuple[str, ...] = ()

    def enforced(self, direction: Direction) -> bool:
        """Whether "no entry" drops in `direction` (default deny)."""
        return self.ingress_enforced if direction == Direction.INGRESS else self.egress_enforced

    def isolated_by(self, direction: Direction) -> tuple[PolicyName, ...]:
        return self.ingress_isolated_by if direction == Direction.INGRESS else self.egress_isolated_by


@dataclass(frozen=True)
class ServiceBackend:
    """One backend of a service port: a pod and the port its traffic is translated to."""

    backend_id: int  # the pod's endpoint id << 16 | port: stable while the pod lives
    pod: str  # "namespace/name"
    ip: str
    port: int


@dataclass(frozen=True)
class ServiceEntry:
    """One port of a service as the datapath translates it (dataplane/bpf/lib/lb.h): connections
    to (ip, port, protocol) go to one of `backends`, in this order (slot i + 1 is backends[i])."""

    service: str  # "namespace/name"
    ip: str  # the ClusterIP
    port: int
    protocol: int
    rev_nat_index: int  # 1..65535, stable for (service, port) within a lab
    affinity: bool  # sessionAffinity ClientIP
    backends: tuple[ServiceBackend, ...] = ()
    port_name: str = ""


@dataclass
class MapState:
    """Everything the datapath needs for one lab, as the resolver computed it."""

    ipcache: dict[str, int] = field(default_factory=dict)  # "a.b.c.d/len" -> identity
    endpoints: dict[int, EndpointState] = field(default_factory=dict)  # by endpoint id
    policy: dict[PolicyKey, PolicyEntry] = field(default_factory=dict)
    rules: dict[int, RuleAttribution] = field(default_factory=dict)
    # L7 rule sets by (endpoint id, direction, proxy port); opaque to the loader, read by the proxy.
    l7: dict[tuple[int, int, int], L7Policy] = field(default_factory=dict)
    # Services by (ClusterIP, port, protocol number); computed from the scenario's services and
    # the pods' labels now (dataplane/services.py), written to the lb_* maps by the loader.
    services: dict[tuple[str, int, int], ServiceEntry] = field(default_factory=dict)

    def policy_of(self, rule_id: int) -> str:
        """The policy a rule belongs to, as verdicts name it (the oracle's and the proxy's alike)."""
        ref = self.rules.get(rule_id)
        return ref.policy if ref is not None else f"rule {rule_id}"

    def isolating_policies(self, pod: str, direction: Direction) -> list[PolicyName]:
        """The policies that make pod `pod` ("namespace/name") enforce `direction`: the ones a
        default deny there (a drop no rule explains) is due to. [] for what is no endpoint.
        The one answer the metrics (`l7lab_policy_drops_total`) and the service map give."""
        for ep in self.endpoints.values():
            if ep.name == pod:
                return list(ep.isolated_by(direction))
        return []

    def identity_of(self, ip: str) -> int:
        """Longest-prefix match of `ip` in the ipcache, as the datapath does; world if none."""
        addr = ipaddress.ip_address(ip)
        best_len, best = -1, IDENTITY_WORLD
        for prefix, identity in self.ipcache.items():
            net = ipaddress.ip_network(prefix, strict=False)
            if addr in net and net.prefixlen > best_len:
                best_len, best = net.prefixlen, identity
        return best

    def l7_rules(self, endpoint_id: int, direction: Direction, remote_identity: int, port: int) -> L7RuleSet | None:
        """The L7 rule set a REDIRECT of this endpoint, direction, peer and port sends requests
        through (the peer's own set, else the any-peer set); None if there is none."""
        l7 = self.l7.get((endpoint_id, int(direction), PROXY_PORT))
        return l7.lookup(remote_identity, port) if l7 is not None else None

    def applied_l7_set(self, endpoint: EndpointState, direction: Direction, remote_identity: int,
                       port: int) -> AppliedSet:
        """The L7 set a REDIRECT of `endpoint`'s `direction` applies, named as the oracle and the
        proxy both name it (its rules None when the redirect has no L7 set for this peer and port)."""
        return AppliedSet.of(direction.name, endpoint.name,
                             self.l7_rules(endpoint.endpoint_id, direction, remote_identity, port))

    # ------------------------------------------------------------------ JSON (the proxy's state file)
    # The L7 proxy is a separate process; the lab writes this encoding to
    # /run/l7lab/<lab>/policy.json and signals the proxy (SIGHUP) to reload it.

    STATE_FORMAT = 1

    def to_json(self) -> dict:
        """Plain-JSON form of the whole state (L7 values must have `to_json`, as L7Policy does)."""
        return {
            "format": self.STATE_FORMAT,
            "ipcache": dict(self.ipcache),
            "endpoints": [{"endpoint_id": e.endpoint_id, "name": e.name, "ip": e.ip, "identity": e.identity,
                           "ingress_enforced": e.ingress_enforced, "egress_enforced": e.egress_enforced,
                           "audit": e.audit, "labels": dict(e.labels),
                           "ingress_isolated_by": [list(p) for p in e.ingress_isolated_by],
                           "egress_isolated_by": [list(p) for p in e.egress_isolated_by],
                           "aliases": list(e.aliases)}
                          for e in self.endpoints.values()],
            "policy": [{"endpoint_id": k.endpoint_id, "direction": int(k.direction), "identity": k.identity,
                        "protocol": k.protocol, "port": k.port, "port_prefix": k.port_prefix,
                        "verdict": int(v.verdict), "proxy_port": v.proxy_port, "rule_ids": list(v.rule_ids)}
                       for k, v in sorted(self.policy.items())],
            "rules": [{"rule_id": r.rule_id, "policy": r.policy, "rule_index": r.rule_index, "section": r.section}
                      for r in self.rules.values()],
            "l7": self.l7_json(),
        }

    def l7_json(self) -> list[dict]:
        """The L7 part of `to_json`, alone."""
        return [{"endpoint_id": ep, "direction": d, "proxy_port": port, "policy": value.to_json()}
                for (ep, d, port), value in sorted(self.l7.items(), key=lambda kv: kv[0])]

    def brings_l7_rules(self, old: "MapState") -> bool:
        """Whether this state has L7 rules that `old` did not have as they are: what a running
        proxy must confirm before the kernel redirects by them."""
        return bool(self.l7) and self.l7_json() != old.l7_json()

    @classmethod
    def from_json(cls, data: dict) -> "MapState":
        """Inverse of `to_json`; raises ValueError on an unknown format."""
        if data.get("format") != cls.STATE_FORMAT:
            raise ValueError(f"unsupported map state format {data.get('format')!r} (expected {cls.STATE_FORMAT})")
        state = cls()
        state.ipcache = {str(k): int(v) for k, v in data.get("ipcache", {}).items()}
        for e in data.get("endpoints", ()):
            state.endpoints[int(e["endpoint_id"])] = EndpointState(
                int(e["endpoint_id"]), e["name"], e["ip"], int(e["identity"]), bool(e["ingress_enforced"]),
                bool(e["egress_enforced"]), bool(e.get("audit", False)),
                tuple(sorted((str(k), str(v)) for k, v in e.get("labels", {}).items())),
                _policy_names(e.get("ingress_isolated_by", ())), _policy_names(e.get("egress_isolated_by", ())),
                tuple(str(a) for a in e.get("aliases", ())))
        for p in data.get("policy", ()):
            key = PolicyKey(int(p["endpoint_id"]), Direction(p["direction"]), int(p["identity"]), int(p["protocol"]),
                            int(p.get("port", 0)), int(p.get("port_prefix", 0)))
            state.policy[key] = PolicyEntry(Verdict(p["verdict"]), int(p.get("proxy_port", 0)),
                                            tuple(int(i) for i in p.get("rule_ids", ())))
        for r in data.get("rules", ()):
            state.rules[int(r["rule_id"])] = RuleAttribution(int(r["rule_id"]), r["policy"], int(r["rule_index"]),
                                                             r["section"])
        for entry in data.get("l7", ()):
            key7 = (int(entry["endpoint_id"]), int(entry["direction"]), int(entry["proxy_port"]))
            state.l7[key7] = L7Policy.from_json(entry["policy"])
        return state


def _policy_names(items: object) -> tuple[PolicyName, ...]:
    return tuple((str(kind), str(namespace), str(name)) for kind, namespace, name in items)  # type: ignore[attr-defined]


def port_range_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """Cover [lo, hi] with aligned blocks: list of (first port, prefix length over 16 bits).
    (0, 65535) is every port (one block of prefix 0); (0, 0) is port 0 alone, which an ICMP
    entry for type 0 (echo reply) names."""
    if lo == 0 and hi == 65535:
        return [(0, 0)]
    blocks = []
    cur = lo
    while cur <= hi:
        size = cur & -cur if cur else 1 << 16
        while cur + size - 1 > hi:
            size >>= 1
        bits = size.bit_length() - 1
        blocks.append((cur, 16 - bits))
        cur += size
    return blocks


def _longest(state: MapState, endpoint_id: int, direction: Direction, identity: int,
             protocol: int, port: int) -> tuple[PolicyKey, PolicyEntry] | None:
    best: tuple[PolicyKey, PolicyEntry] | None = None
    for key, entry in state.policy.items():
        if (key.endpoint_id, key.direction, key.identity, key.protocol) != (endpoint_id, direction, identity, protocol):
            continue
        if key.covers_port(port) and (best is None or key.port_prefix > best[0].port_prefix):
            best = (key, entry)
    return best


def lookup_policy(state: MapState, endpoint_id: int, direction: Direction, identity: int,
                  protocol: int, port: int) -> tuple[Verdict, list[tuple[PolicyKey, PolicyEntry]]]:
    """The datapath's four lookups and precedence; returns the verdict and the entries found."""
    found = []
    for ident, proto in ((identity, protocol), (identity, PROTO_ANY),
                         (IDENTITY_ANY, protocol), (IDENTITY_ANY, PROTO_ANY)):
        hit = _longest(state, endpoint_id, direction, ident, proto, 0 if proto == PROTO_ANY else port)
        if hit is not None and hit not in found:
            found.append(hit)
    verdict = max((entry.verdict for _, entry in found), default=Verdict.NONE)
    return Verdict(verdict), found


@dataclass(frozen=True)
class DirectionLookup:
    """One direction of a flow as the datapath judges it: an endpoint's egress (the remote is
    the destination) or ingress (the remote is the source), and what `lookup_policy` found."""

    endpoint: EndpointState
    direction: Direction
    remote_identity: int
    verdict: Verdict
    found: list[tuple[PolicyKey, PolicyEntry]]

    @property
    def enforced(self) -> bool:
        return self.endpoint.enforced(self.direction)

    @property
    def drops(self) -> bool:
        """Dropped at L3/L4, unless the endpoint is in audit mode: a DENY, or no entry where
        the direction is enforced."""
        return self.verdict == Verdict.DENY or (self.verdict == Verdict.NONE and self.enforced)


def flow_lookups(state: MapState, source: EndpointState | None, destination: EndpointState | None,
                 source_identity: int, destination_identity: int, protocol: int,
                 port: int) -> list[DirectionLookup]:
    """The lookups a flow meets, in the datapath's order: the source endpoint's egress, then the
    destination endpoint's ingress (a side that is not a lab endpoint has none). The oracle
    traces them and the proxy takes from them which L7 sets apply: one walk for both."""
    out = []
    for ep, direction, remote in ((source, Direction.EGRESS, destination_identity),
                                  (destination, Direction.INGRESS, source_identity)):
        if ep is not None:
            verdict, found = lookup_policy(state, ep.endpoint_id, direction, remote, protocol, port)
            out.append(DirectionLookup(ep, direction, remote, verdict, found))
    return out


def normalize_entries(policy: dict[PolicyKey, PolicyEntry]) -> dict[PolicyKey, PolicyEntry]:
    """Push precedence down onto narrower entries (docs/datapath.md, "Precedence").

    An entry takes the verdict of the broader entry of highest precedence that covers it (same
    endpoint, direction, identity and protocol; a shorter or equal port prefix covering its
    port), the first such entry in `policy`'s order on a tie. The covering entries are found
    through an index by port block, at most 17 lookups per entry (one per prefix length), so
    that a large policy costs time in proportion to its size, not to its square.
    """
    order = {key: i for i, key in enumerate(policy)}
    blocks: dict[tuple, list[PolicyKey]] = {}
    for key in policy:
        group = (key.endpoint_id, key.direction, key.identity, key.protocol)
        blocks.setdefault((group, key.port_prefix, key.port >> (16 - key.port_prefix)), []).append(key)
    out: dict[PolicyKey, PolicyEntry] = {}
    for key, entry in policy.items():
        group = (key.endpoint_id, key.direction, key.identity, key.protocol)
        cover: PolicyKey | None = None
        for prefix in range(key.port_prefix + 1):
            for other_key in blocks.get((group, prefix, key.port >> (16 - prefix)), ()):
                if other_key is key or not other_key.covers_port(key.port):
                    continue
                verdict = policy[other_key].verdict
                if verdict <= entry.verdict:
                    continue
                if cover is None or verdict > policy[cover].verdict or (
                        verdict == policy[cover].verdict and order[other_key] < order[cover]):
                    cover = other_key
        if cover is None:
            out[key] = entry
        else:
            other = policy[cover]
            out[key] = PolicyEntry(other.verdict, other.proxy_port,
                                   tuple(sorted(set(entry.rule_ids) | set(other.rule_ids))))
    return out
