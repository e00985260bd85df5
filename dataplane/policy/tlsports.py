"""HTTP rules on ports where world hosts serve TLS: refused, because the L7 proxy does not
inspect TLS.

A world host may serve HTTPS on a port (`ports: [{port: 443, tls: true}]`, dataplane/labca.py).
An HTTP rule on that port would hand the pod's TLS connection to the L7 proxy, which would read
a TLS ClientHello where it expects an HTTP request head and answer 400: the policy would not do
what it says. So `validate`, `run` and `apply` refuse it, all-or-nothing, naming the policy
file, the field path of the rule's `rules.http` and the world host and port. (Cilium inspects
TLS only with TLS interception, `terminatingTLS`/`originatingTLS`, which the lab does not have.)

The rule, kept simple: an egress allow rule is refused when one of its `toPorts` entries has
`rules.http` on a TCP (or ANY) port P, and one of its peers could select a world host that
declares `tls: true` on P. A peer could select a world host when it is:

- no L3 peer at all (a rule of `toPorts` only), or the entity `all`;
- the entity `world` (a host without an `entity`), or the host's own entity (`kube-apiserver`,
  `remote-node`; `cluster` for those two as well);
- a `toFQDNs` selector matching one of the host's DNS names or aliases;
- a `toCIDR`/`toCIDRSet` (or an `ipBlock`) covering the host's address, outside its excepts;
- an endpoint selector naming the reserved label the host's address carries (`reserved:world`).

Which pods the policy selects does not matter: the check is about the rule, whatever it
applies to. Ports: a number, a range (`endPort`) covering P, or a named port that some pod
declares as P (named ports resolve against every pod's ports, resolver.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from l7.dns import fqdn_matches

from ..errors import SourceError, SourceLocation
from ..scenario import Scenario, WorldHost
from .api import AllPeer, CIDRPeer, EndpointPeer, EntityPeer, FQDNPeer, Peer, Policy, PortSpec, Rule
from .identity import CLUSTER_RESERVED

WHY = "the L7 proxy does not inspect TLS; use a port rule without rules.http"


def _peer_reaches(peer: Peer, host: WorldHost) -> bool:
    """Whether `peer` could select world host `host` (see the module docstring)."""
    if isinstance(peer, AllPeer):
        return True
    if isinstance(peer, EntityPeer):
        if peer.entity == "all":
            return True
        if not host.entity:
            return peer.entity == "world"
        return peer.entity == host.entity or (peer.entity == "cluster" and host.entity in CLUSTER_RESERVED)
    if isinstance(peer, FQDNPeer):
        return any(fqdn_matches(name.lower().rstrip("."), peer.match_name, peer.match_pattern)
                   for name in (*host.dns_names, *host.aliases))
    if isinstance(peer, CIDRPeer):
        if peer.ipv6:
            return False
        address = ipaddress.ip_address(host.address)
        return address in ipaddress.ip_network(peer.cidr) and \
            not any(address in ipaddress.ip_network(e) for e in peer.excepts)
    if isinstance(peer, EndpointPeer):
        return peer.selector.names_reserved() and \
            peer.selector.matches({f"reserved:{host.entity or 'world'}": ""})
    return False  # toServices: the backends are pods


def _covers(spec: PortSpec, port: int, scenario: Scenario) -> bool:
    """Whether a port spec of an HTTP rule covers TCP port `port`."""
    if spec.protocol not in ("TCP", "ANY"):
        return False
    if spec.name:
        return any(p.name == spec.name and p.port == port and p.protocol == "TCP"
                   for pod in scenario.pods.values() for p in pod.ports)
    if spec.end_port:
        return spec.port <= port <= spec.end_port
    return spec.port in (port, 0)


def _tls_ports(scenario: Scenario) -> list[tuple[WorldHost, int]]:
    return [(host, p.port) for host in scenario.world.values() for p in host.ports if p.tls]


def _rule_errors(policy: Policy, rule: Rule, tls_ports: list[tuple[WorldHost, int]],
                 scenario: Scenario) -> list[SourceError]:
    out: list[SourceError] = []
    for j, port_rule in enumerate(rule.port_rules):
        if port_rule.l7 is None or not port_rule.l7.http:
            continue
        for host, port in tls_ports:
            if not any(_covers(s, port, scenario) for s in port_rule.ports):
                continue
            if not any(_peer_reaches(peer, host) for peer in rule.peers):
                continue
            where = rule.location or policy.location
            field = f"{where.path}.toPorts[{j}].rules.http" if where.path else f"{rule.path}.toPorts[{j}].rules.http"
            out.append(SourceError(
                SourceLocation(where.file, where.line, field),
                f"{policy.display}: HTTP rules cannot apply to port {port}: world host {host.name} serves TLS "
                f"there and {WHY}"))
            break  # one error per toPorts entry: the first TLS host it reaches
    return out


def tls_http_refusals(policies: Iterable[Policy], scenario: Scenario) -> list[SourceError]:
    """One error per `toPorts` entry of an egress allow rule whose HTTP rules would meet a world
    host's TLS port; [] when the scenario has no TLS port or no such rule."""
    tls_ports = _tls_ports(scenario)
    if not tls_ports:
        return []
    out: list[SourceError] = []
    for policy in policies:
        for spec in policy.specs:
            if spec.host:
                continue  # host policies take no HTTP rules at all (host.py)
            for rule in spec.rules:
                if rule.direction == "egress" and not rule.is_deny:
                    out += _rule_errors(policy, rule, tls_ports, scenario)
    return out
