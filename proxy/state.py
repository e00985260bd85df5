"""The proxy's view of the lab's policy: load the state file, decide per connection and request.

The lab writes `MapState.to_json()` to /run/l7lab/<lab>/policy.json and sends SIGHUP; the proxy
loads it into an immutable `Snapshot` and swaps one reference, so each request is judged
entirely under the old or entirely under the new state.

Per connection (`connection`), the walk the oracle traces (`dataplane.mapstate.flow_lookups`):
  * source identity: ipcache longest match of the peer address (never anything the client says);
    destination identity: ipcache longest match of the original destination address;
  * the source endpoint's EGRESS L7 set applies if `lookup_policy(src_ep, EGRESS, dst_identity,
    protocol, port)` is REDIRECT, the destination endpoint's INGRESS set if `lookup_policy(dst_ep,
    INGRESS, src_identity, protocol, port)` is REDIRECT; the set is `MapState.l7_rules`;
  * fail closed: a connection for which no REDIRECT applies, or which either direction drops at
    L3/L4 (DENY, or no entry while enforced and not in audit mode), is refused every request.

Per request, the verdict is `l7.decide.decide` -- the function the oracle calls too -- with the
protocol's own judge (`l7.http.judge`, `l7.dns.judge`): every applicable set must allow.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane.mapstate import MapState, flow_lookups
from dataplane.abi import PROTO_TCP, PROTOCOL_NAMES, Verdict
from l7.decide import AppliedSet, L7Verdict, decide, protocol_for
from l7.http import HttpRequestView

# A request's verdict, as the proxy acts on it and records it.
RequestVerdict = L7Verdict


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
    protocol: str = ""  # the L7 protocol its requests are spoken in ("http", "dns"): its handler


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
        for look in flow_lookups(state, src_ep, dst_ep, cp.src_identity, cp.dst_identity, protocol, dst_port):
            ep, direction = look.endpoint, look.direction
            if look.drops and not ep.audit:
                cp.refusal = f"{direction.name.lower()} policy of {ep.name} drops this flow at L3/L4"
            elif look.verdict == Verdict.REDIRECT:
                cp.sets.append(state.applied_l7_set(ep, direction, look.remote_identity, dst_port))
        if not cp.sets and not cp.refusal:
            cp.refusal = "no L7 redirect applies to this connection"
        cp.protocol = protocol_for(cp.sets, PROTOCOL_NAMES.get(protocol, ""))
        return cp

    def judge_request(self, cp: ConnectionPolicy, protocol: str, request: Any) -> RequestVerdict:
        """One request of `protocol` on the connection `cp`: `l7.decide.decide`."""
        return decide(protocol, request, cp.sets, self.state.policy_of, cp.refusal)

    def judge(self, cp: ConnectionPolicy, method: str, path: str, headers: dict[str, str]) -> RequestVerdict:
        """An HTTP request (path normalized, headers as forwarded: `proxy.http.Request`)."""
        return self.judge_request(cp, "http", HttpRequestView(method, path, headers))

    def judge_dns(self, cp: ConnectionPolicy, name: str) -> RequestVerdict:
        """A DNS question for `name`."""
        return self.judge_request(cp, "dns", name)

