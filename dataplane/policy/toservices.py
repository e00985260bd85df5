"""toServices: a CiliumNetworkPolicy egress peer naming Kubernetes services, turned into the
endpoint selectors of the services' backend pods before identities and policy are resolved.

Cilium (Documentation/security/policy/language.rst, "Services based") applies `toServices`
only to services without a selector, allowing the addresses of their Endpoints like CIDR
rules; for services backed by pods it points to endpoint-based rules. Every service of a lab
has pods behind it, so the lab applies the rule to those pods: a `toServices` peer selects the
pods the service's selector picks in its namespace (they follow relabels as any endpoint
selector does). A service without a selector, or no service of that name, adds no peer: the
rule allows nothing through it. docs/policy.md says where this differs from Cilium.
"""

from __future__ import annotations

from dataclasses import replace

from ..scenario import Scenario, Service
from .api import EndpointPeer, Peer, Policy, ServicePeer
from .selectors import NAMESPACE_LABEL, LabelSelector


def expand_service_peers(policies: list[Policy], scenario: Scenario) -> list[Policy]:
    """The policies with every `toServices` peer replaced by the backends of the services it
    names: for each such service, an endpoint selector of its `selector` labels within its
    namespace. Policies without such a peer are returned as they are."""
    out = []
    for policy in policies:
        if not any(isinstance(peer, ServicePeer) for spec in policy.specs for rule in spec.rules for peer in rule.peers):
            out.append(policy)
            continue
        specs = tuple(replace(spec, rules=tuple(replace(rule, peers=tuple(
            expanded for peer in rule.peers for expanded in _expand(peer, scenario))) for rule in spec.rules))
            for spec in policy.specs)
        out.append(replace(policy, specs=specs))
    return out


def services_of(peer: ServicePeer, scenario: Scenario) -> list[Service]:
    """The services a toServices peer names."""
    return [svc for svc in scenario.services.values() if svc.namespace == peer.namespace and
            (svc.name == peer.name if peer.name else peer.selector is not None and peer.selector.matches(svc.labels))]


def _expand(peer: Peer, scenario: Scenario) -> list[Peer]:
    if not isinstance(peer, ServicePeer):
        return [peer]
    return [EndpointPeer(LabelSelector(tuple(sorted({**svc.selector, NAMESPACE_LABEL: svc.namespace}.items()))))
            for svc in services_of(peer, scenario) if svc.selector]


__all__ = ["expand_service_peers", "services_of"]
