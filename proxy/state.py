"""The proxy's view of the lab's policy: load the state file, decide per connection and request.

The lab writes `MapState.to_json()` to /run/l7lab/<lab>/policy.json and sends SIGHUP; the proxy
loads it into an immutable `Snapshot` and swaps one reference, so each request is judged
entirely under the old or entirely under the new state.

Decision (mirrors `dataplane.policy.engine._Judge`, the oracle, call for call):
  * source identity: ipcache longest match of the peer address (never anything the client says);
    destination identity: ipcache longest match of the original destination address;
  * the source endpoint's EGRESS L7 set applies if `lookup_policy(src_ep, EGRESS, dst_identity,
    TCP, port)` is REDIRECT, the destination endpoint's INGRESS set if `lookup_policy(dst_ep,
    INGRESS, src_identity, TCP, port)` is REDIRECT; a request must pass every set that applies;
  * the set is `state.l7[(ep, direction, PROXY_PORT)].lookup(remote identity, port)`; no set
    means "refused by the proxy"; a DNS-only set lets an HTTP request through only if allow-all;
    otherwise `L7RuleSet.match_http(method, path, headers)` decides;
  * DNS (UDP): `connection(..., PROTO_UDP)` and `judge_dns(name)`: `L7RuleSet.match_dns`;
  * fail closed: a connection for which no REDIRECT applies, or which either direction drops at
    L3/L4 (DENY, or no entry while enforced and not in audit mode), gets 403 for every request.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataplane.mapstate import (PROTO_TCP, PROXY_PORT, Direction, EndpointState, MapState, Verdict,
                                lookup_policy)
from dataplane.policy.l7 import L7RuleSet


@dataclass(frozen=True)
class AppliedSet:
    """One L7 rule set a request must pass."""

    endpoint: EndpointState
    direction: Direction
    remote_identity: int
    rules: L7RuleSet | None  # None: REDIRECT without an L7 set: every request refused

    @property
    def where(self) -> str:
        return f"L7 {self.direction.name.lower()} of {self.endpoint.name}"


@dataclass
class ConnectionPolicy:
    """What applies to one (client, original destination) pair under one snapshot."""

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: int
    dst_identity: int
    src_name: str = ""
    dst_name: str = ""
    sets: list[AppliedSet] = field(default_factory=list)
    refusal: str = ""  # non-empty: deny every request with this reason (fail closed)


@dataclass
class RequestVerdict:
    allowed: bool
    why: str
    rule_ids: tuple[int, ...] = ()  # the rules that allowed it
    policies: tuple[str, ...] = ()  # allowed: the policies of rule_ids; denied: the policies it failed


class Snapshot:
    """An immutable, indexed MapState (never mutated after construction)."""

    def __init__(self, state: MapState, source: str = "") -> None:
        self.state = state
        self.source = source
        self.by_ip = {ep.ip: ep for ep in state.endpoints.values()}
        # ipcache as (network, identity) sorted longest prefix first: first hit is the longest match.
        nets = [(ipaddress.ip_network(p, strict=False), i) for p, i in state.ipcache.items()]
        self._ipcache = sorted(nets, key=lambda ni: -ni[0].prefixlen)

    @classmethod
    def load(cls, path: str | Path) -> "Snapshot":
        data = json.loads(Path(path).read_text())
        return cls(MapState.from_json(data), str(path))

    @classmethod
    def empty(cls) -> "Snapshot":
        return cls(MapState(), "(empty: deny everything)")

    def identity_of(self, ip: str) -> int:
        """Same answer as MapState.identity_of (world if nothing matches), faster."""
        addr = ipaddress.ip_address(ip)
        for net, identity in self._ipcache:
            if addr in net:
                return identity
        return self.state.identity_of(ip)  # no prefix matched: the contract's default (world)

    def connection(self, src_ip: str, dst_ip: str, dst_port: int, protocol: int = PROTO_TCP) -> ConnectionPolicy:
        """What applies to a flow: TCP for HTTP connections, UDP for DNS queries."""
        state = self.state
        cp = ConnectionPolicy(src_ip, dst_ip, dst_port, self.identity_of(src_ip), self.identity_of(dst_ip))
        src_ep, dst_ep = self.by_ip.get(src_ip), self.by_ip.get(dst_ip)
        cp.src_name = src_ep.name if src_ep else ""
        cp.dst_name = dst_ep.name if dst_ep else ""
        for ep, direction, remote in ((src_ep, Direction.EGRESS, cp.dst_identity),
                                      (dst_ep, Direction.INGRESS, cp.src_identity)):
            if ep is None:
                continue
            verdict, _ = lookup_policy(state, ep.endpoint_id, direction, remote, protocol, dst_port)
            enforced = ep.ingress_enforced if direction == Direction.INGRESS else ep.egress_enforced
            drops = verdict == Verdict.DENY or (verdict == Verdict.NONE and enforced)
            if drops and not ep.audit:
                cp.refusal = f"{direction.name.lower()} policy of {ep.name} drops this flow at L3/L4"
            elif verdict == Verdict.REDIRECT:
                l7 = state.l7.get((ep.endpoint_id, int(direction), PROXY_PORT))
                rules = l7.lookup(remote, dst_port) if l7 is not None else None
                cp.sets.append(AppliedSet(ep, direction, remote, rules))
        if not cp.sets and not cp.refusal:
            cp.refusal = "no L7 redirect applies to this connection"
        return cp

    def judge(self, cp: ConnectionPolicy, method: str, path: str, headers: dict[str, str]) -> RequestVerdict:
        """An HTTP request: `L7RuleSet.match_http` in every applicable set."""
        def match(rs: L7RuleSet) -> tuple[bool, str, tuple[int, ...], list]:
            if rs.dns and not rs.http:
                return rs.allow_all, "DNS-only rule set" + (" (allow-all)" if rs.allow_all else ""), (), rs.http
            return (*rs.match_http(method, path, headers), rs.http)
        return self._every_set(cp, match)

    def judge_dns(self, cp: ConnectionPolicy, name: str) -> RequestVerdict:
        """A DNS question for `name`: `L7RuleSet.match_dns` (matchName / matchPattern, or an
        allow without L7 rules) in every applicable set."""
        return self._every_set(cp, lambda rs: (*rs.match_dns(name), rs.dns))

    def _every_set(self, cp: ConnectionPolicy,
                   match: Callable[[L7RuleSet], tuple[bool, str, tuple[int, ...], list]]) -> RequestVerdict:
        """Every applicable set must allow; the first that refuses decides (as the oracle).
        `match(rules)` -> (allowed, why, rule ids that allowed, the (rule, id) pairs it tried)."""
        if cp.refusal:
            return RequestVerdict(False, cp.refusal)
        ids: list[int] = []
        whys = []
        for applied in cp.sets:
            rs = applied.rules
            if rs is None:
                return RequestVerdict(False, f"{applied.where}: no L7 rule set for this peer and port")
            ok, why, got, tried = match(rs)
            whys.append(f"{applied.where}: {why}")
            if not ok:
                failed = sorted({self.policy_of(i) for _, i in tried})
                return RequestVerdict(False, f"{applied.where}: {why}", (), tuple(failed))
            ids.extend(i for i in got if i not in ids)
        return RequestVerdict(True, "; ".join(whys), tuple(ids), tuple(sorted({self.policy_of(i) for i in ids})))

    def policy_of(self, rule_id: int) -> str:
        ref = self.state.rules.get(rule_id)
        return ref.policy if ref is not None else f"rule {rule_id}"
