"""The one internal rule model both policy dialects parse into.

Kubernetes `networking.k8s.io/v1` NetworkPolicy, Cilium `cilium.io/v2` CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy are all turned (by `parse.py`) into `Policy` objects made of
`PolicySpec`s (one per Cilium `spec`/`specs[i]`, one per NetworkPolicy) which carry `Rule`s.
Every peer is expressed as a `Peer` over Cilium-style identity labels, so that there is one
resolver (`resolver.py`). The types here are plain frozen data; behaviour lives elsewhere.

Label keys are kept in Cilium's form without the source prefix: `app`,
`io.kubernetes.pod.namespace`, `io.cilium.k8s.namespace.labels.team`; reserved identities carry
`reserved:<name>` keys (see `selectors.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from l7.dns import DnsRule
from l7.http import HttpRule

from ..errors import SourceLocation
from ..icmp import type_name
from .selectors import LabelSelector

KIND_K8S = "NetworkPolicy"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"

Section = Literal["ingress", "egress", "ingressDeny", "egressDeny"]

# Cilium entities (pkg/policy/api/entity.go). `all` is the wildcard; `cluster` is every
# identity inside the cluster; `world` is the world identity plus every CIDR/FQDN identity.
ENTITIES = ("host", "world", "cluster", "all", "remote-node", "health", "init", "unmanaged",
            "kube-apiserver", "ingress")


# ---------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class AllPeer:
    """Any remote identity (k8s `from` omitted, Cilium `all` entity, L4-only Cilium rule)."""

    def describe(self) -> str:
        return "any peer"


@dataclass(frozen=True)
class EndpointPeer:
    """Identities whose labels match the selector (already namespace-scoped when needed)."""

    selector: LabelSelector

    def describe(self) -> str:
        return f"endpoints {self.selector}"


@dataclass(frozen=True)
class ServicePeer:
    """A `toServices` item: a service by name (`k8sService`) or every service whose labels the
    selector matches (`k8sServiceSelector`), in `namespace`. The lab applies it to the service's
    backend pods (dataplane/services.py expand_service_peers turns it into an EndpointPeer
    before resolution)."""

    namespace: str
    name: str = ""
    selector: LabelSelector | None = None

    def describe(self) -> str:
        what = f"service {self.namespace}/{self.name}" if self.name else f"services {self.selector} of {self.namespace}"
        return f"backends of {what}"


@dataclass(frozen=True)
class EntityPeer:
    entity: str

    def describe(self) -> str:
        return f"entity {self.entity}"


@dataclass(frozen=True)
class CIDRPeer:
    """A CIDR (prefix string, normalised) with excepted sub-prefixes of the same family.

    An IPv6 CIDR is accepted (Cilium's own manifests pair `0.0.0.0/0` with `::/0`) but selects
    nothing: the lab is IPv4 only. `ip_block` marks a Kubernetes `ipBlock`, the one CIDR peer
    that `settings.ipBlockSelectsPods` lets select pods."""

    cidr: str
    excepts: tuple[str, ...] = ()
    ip_block: bool = False

    @property
    def ipv6(self) -> bool:
        return ":" in self.cidr

    def describe(self) -> str:
        what = "ipBlock" if self.ip_block else "CIDR"
        return f"{what} {self.cidr}" + (f" except {', '.join(self.excepts)}" if self.excepts else "")


@dataclass(frozen=True)
class FQDNPeer:
    """A `toFQDNs` selector: exactly one of match_name / match_pattern (lower case)."""

    match_name: str = ""
    match_pattern: str = ""

    @property
    def label(self) -> str:
        return f"fqdn:{self.match_name or self.match_pattern}"

    def describe(self) -> str:
        return f"FQDN {'matchName ' + self.match_name if self.match_name else 'matchPattern ' + self.match_pattern}"


Peer = AllPeer | EndpointPeer | EntityPeer | CIDRPeer | FQDNPeer | ServicePeer


# ---------------------------------------------------------------------------- ports and L7


@dataclass(frozen=True)
class PortSpec:
    """One port, port range or named port. `port` 0 (and no name) means every port.

    protocol is 'TCP' | 'UDP' | 'SCTP' | 'ANY', or 'ICMP' | 'ICMPv6' for a Cilium `icmps`
    field: then `port` is the ICMP type, as Cilium keys an ICMP rule (ICMPField.PortProtocol).
    """

    protocol: str = "ANY"
    port: int = 0
    end_port: int = 0  # 0 = single port
    name: str = ""  # named port, resolved against the destination pod's declared ports

    @property
    def is_icmp(self) -> bool:
        return self.protocol in ("ICMP", "ICMPv6")

    def describe(self) -> str:
        if self.is_icmp:
            family = "IPv6" if self.protocol == "ICMPv6" else "IPv4"
            return f"{self.protocol} type {self.port} ({type_name(self.port, family)})"
        if self.name:
            where = self.name
        elif self.port == 0:
            where = "all ports"
        elif self.end_port:
            where = f"{self.port}-{self.end_port}"
        else:
            where = str(self.port)
        return f"{where}/{self.protocol}"


@dataclass(frozen=True)
class L7Rules:
    http: tuple[HttpRule, ...] = ()
    dns: tuple[DnsRule, ...] = ()

    def by_protocol(self) -> list[tuple[str, tuple]]:
        """(protocol name in the `l7` registry, its rules) for every protocol: one field each."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


@dataclass(frozen=True)
class PortRule:
    """A Kubernetes `ports` list entry or a Cilium `toPorts` entry."""

    ports: tuple[PortSpec, ...]
    l7: L7Rules | None = None


# ---------------------------------------------------------------------------- rules and policies


@dataclass(frozen=True)
class Rule:
    """One ingress/egress(/Deny) rule.

    peers: OR of peers; empty tuple = selects no peer at all (Cilium `ingress: [{}]`).
    port_rules: OR of port rules; empty tuple = every port and protocol.
    """

    section: Section
    index: int
    path: str  # field path of the rule inside its document, e.g. "specs[0].ingress[1]"
    peers: tuple[Peer, ...]
    port_rules: tuple[PortRule, ...] = ()
    location: SourceLocation | None = None
    # Cilium fromRequires / toRequires: selectors ANDed into the endpoint peers of every rule of
    # this direction (allow rules for an allow section, deny rules for a deny section) that
    # selects the same endpoint; they allow nothing by themselves (resolver.py).
    requires: tuple[LabelSelector, ...] = ()

    @property
    def is_deny(self) -> bool:
        return self.section.endswith("Deny")

    @property
    def direction(self) -> str:
        return "ingress" if self.section.startswith("ingress") else "egress"


@dataclass(frozen=True)
class PolicySpec:
    """One rule set with its subject selector and per-direction enforcement.

    `enforces_*`: whether selecting an endpoint with this spec turns default-deny on for that
    direction (K8s policyTypes after defaulting; Cilium: a non-empty ingress/ingressDeny section
    unless enableDefaultDeny says otherwise).
    """

    subject: LabelSelector
    rules: tuple[Rule, ...]
    enforces_ingress: bool
    enforces_egress: bool
    path: str = ""  # "spec" / "specs[1]"
    # A host policy (CCNP `nodeSelector`): `subject` selects nodes by their labels, never pods.
    host: bool = False


@dataclass(frozen=True)
class Policy:
    kind: str
    name: str
    namespace: str  # "" for a CiliumClusterwideNetworkPolicy
    specs: tuple[PolicySpec, ...]
    location: SourceLocation = field(default_factory=lambda: SourceLocation(""))

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity of a policy object: applying the same key again replaces it."""
        return (self.kind, self.namespace, self.name)

    @property
    def display(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"
