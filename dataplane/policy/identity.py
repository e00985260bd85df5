"""Security identities, the ipcache, and which identities a peer selects.

Numbering follows Cilium (pkg/identity/numericidentity.go, constants in `mapstate`):

- reserved identities 1..9 (host, world, unmanaged, health, init, remote-node, kube-apiserver,
  ingress) carry the single label `reserved:<name>`;
- label-set identities from 256: one per distinct pod label set (pod labels + namespace labels,
  `selectors.pod_identity_labels`); pods with equal label sets share an identity. Numbers are
  given in sorted order of the label sets when the engine starts, and later label sets (after a
  relabel) get the next free number, so numbering is deterministic for a scenario and stable
  across steps;
- CIDR identities from 2^24: one per prefix named by any CIDR rule (including `except`
  prefixes), plus one /32 per address that DNS answers taught the lab (`dataplane/fqdn`) for a
  name some `toFQDNs` selector matches, as Cilium allocates one per learned IP. 0.0.0.0/0 is
  `world`.

ipcache (LPM trie in the datapath): pod IP/32 -> pod identity, node addresses/32 -> host,
world hosts declared with an `entity` /32 -> that reserved identity (kube-apiserver 7,
remote-node 6), CIDR prefixes -> CIDR identities, 0.0.0.0/0 -> world. Since a pod's /32 is always
the longest match, CIDR rules never select pods, as in Cilium; nor do they select the addresses
of entity hosts, which carry no CIDR identity: Cilium gives the API server's and the other
nodes' addresses their reserved identity, which CIDR selectors do not match (nodes: Cilium's
default policy-cidr-match-mode; the API server: cilium/cilium#20550), and FQDN selectors do
not give them one either.

Selection (Cilium's selector cache):
- an endpoint selector selects label-set identities whose labels match (and reserved
  identities when it names `reserved:` keys);
- a CIDR selector selects every CIDR identity whose prefix lies inside it and not inside one of
  its excepts (and `world` itself when the CIDR is /0); an IPv6 CIDR selects nothing (the lab is
  IPv4 only and drops IPv6 before any policy);
- with `settings.ipBlockSelectsPods` (the Kubernetes e2e suite's expectation, not Cilium's), a
  Kubernetes `ipBlock` also selects the identity of every pod whose address lies inside it and
  not inside an except; the policy is enforced by identity, so pods that share an identity must
  all lie inside or all outside (`ip_block_split` finds the ones that do not);
- entity `world` selects world and every CIDR identity; `cluster` every pod identity and the
  reserved in-cluster identities; `all` is the wildcard identity 0;
- a FQDN selector selects the /32 identities of learned addresses with a matching name; before
  any lookup it selects nothing.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from l7.dns import fqdn_matches

from ..abi import (IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_LABEL_BASED, IDENTITY_HOST, IDENTITY_WORLD,
                   RESERVED_IDENTITIES)
from .api import AllPeer, CIDRPeer, EndpointPeer, EntityPeer, FQDNPeer, Peer, Policy
from .selectors import CLUSTER_LABEL, NAMESPACE_LABELS_PREFIX

CLUSTER_RESERVED = ("host", "remote-node", "health", "init", "unmanaged", "kube-apiserver", "ingress")


@dataclass(frozen=True)
class Identity:
    number: int
    labels: tuple[tuple[str, str], ...]  # sorted; source prefix dropped ("reserved:x" kept)
    kind: str  # "reserved" | "pod" | "cidr"
    prefix: str = ""  # for CIDR identities
    dns_names: tuple[str, ...] = ()  # names DNS answers gave this /32 (FQDN identities)
    hosts: tuple[str, ...] = ()  # world hosts declared with this reserved identity as `entity`

    @functools.cached_property
    def label_map(self) -> dict[str, str]:
        """`labels` as a mapping, made once: selection matches every selector of every rule
        against every identity, and the policy-map bound must be reached quickly."""
        return dict(self.labels)

    def describe(self) -> str:
        if self.kind == "reserved":
            extra = f", {', '.join(self.hosts)}" if self.hosts else ""
            return f"{self.number} ({self.labels[0][0]}{extra})"
        if self.kind == "cidr":
            extra = f", {'/'.join(self.dns_names)}" if self.dns_names else ""
            return f"{self.number} (cidr:{self.prefix}{extra})"
        # The short form leaves out what every pod derives from its namespace's labels and from
        # the cluster; the full label list is `identity_labels` (observe, inspect).
        shown = [f"k8s:{k}={v}" for k, v in self.labels
                 if not k.startswith(NAMESPACE_LABELS_PREFIX) and k != CLUSTER_LABEL]
        return f"{self.number} ({', '.join(shown)})"


class IdentityAllocator:
    """Hands out label-set and CIDR identity numbers; numbers are never reused in one engine."""

    def __init__(self) -> None:
        self.by_labels: dict[tuple[tuple[str, str], ...], int] = {}
        self.by_prefix: dict[str, int] = {}

    def label_identities(self, label_sets: Iterable[tuple[tuple[str, str], ...]]) -> None:
        for labels in sorted(set(label_sets)):
            if labels not in self.by_labels:
                self.by_labels[labels] = IDENTITY_FIRST_LABEL_BASED + len(self.by_labels)

    def cidr_identities(self, prefixes: Iterable[str]) -> None:
        def order(p: str) -> tuple[int, int]:
            net = ipaddress.ip_network(p)
            return int(net.network_address), net.prefixlen
        for prefix in sorted(set(prefixes), key=order):
            if prefix not in self.by_prefix:
                self.by_prefix[prefix] = IDENTITY_FIRST_CIDR + len(self.by_prefix)


@dataclass
class IdentityTable:
    """The identities of one lab state, the ipcache, and peer selection over them."""

    identities: dict[int, Identity] = field(default_factory=dict)
    pod_identity: dict[str, int] = field(default_factory=dict)  # pod key -> identity
    ipcache: dict[str, int] = field(default_factory=dict)
    pod_ips: dict[str, str] = field(default_factory=dict)  # pod key -> address
    ip_block_selects_pods: bool = False  # settings.ipBlockSelectsPods

    @classmethod
    def build(cls, allocator: IdentityAllocator, pod_labels: Mapping[str, Mapping[str, str]],
              pod_ips: Mapping[str, str], node_addresses: Iterable[str],
              learned: Iterable[tuple[str, tuple[str, ...]]], policies: Iterable[Policy],
              entity_hosts: Mapping[str, tuple[str, str]] | None = None,
              ip_block_selects_pods: bool = False) -> "IdentityTable":
        """`learned`: (address, names) that DNS answers taught (the FQDN cache); `entity_hosts`:
        address -> (reserved entity name, world host name) for the world hosts that stand for the
        API server or another node."""
        table = cls(pod_ips=dict(pod_ips), ip_block_selects_pods=ip_block_selects_pods)
        entity_hosts = dict(entity_hosts or {})
        for name, number in RESERVED_IDENTITIES.items():
            hosts = tuple(sorted(host for entity, host in entity_hosts.values() if entity == name))
            table.identities[number] = Identity(number, ((f"reserved:{name}", ""),), "reserved", hosts=hosts)
        keyed = {key: tuple(sorted(labels.items())) for key, labels in pod_labels.items()}
        allocator.label_identities(keyed.values())
        for key, labels in keyed.items():
            number = allocator.by_labels[labels]
            table.pod_identity[key] = number
            table.identities[number] = Identity(number, labels, "pod")

        # CIDR prefixes named by rules, and /32s of learned addresses that FQDN selectors match.
        prefixes: set[str] = set()
        fqdn_peers: list[FQDNPeer] = []
        for policy in policies:
            for spec in policy.specs:
                for rule in spec.rules:
                    for peer in rule.peers:
                        if isinstance(peer, CIDRPeer) and not peer.ipv6:  # no IPv6 in the ipcache
                            prefixes.add(peer.cidr)
                            prefixes.update(peer.excepts)
                        elif isinstance(peer, FQDNPeer):
                            fqdn_peers.append(peer)
        host_names: dict[str, tuple[str, ...]] = {}
        for address, names in learned:
            if ":" in address:
                continue  # IPv4 only, as the rest of the ipcache
            if address in entity_hosts:
                continue  # its reserved identity, never a CIDR one (see the module docstring)
            if any(fqdn_matches(n, p.match_name, p.match_pattern) for n in names for p in fqdn_peers):
                prefixes.add(f"{address}/32")
                host_names[f"{address}/32"] = tuple(names)
        taken = {f"{ip}/32" for ip in pod_ips.values()} | {f"{a}/32" for a in node_addresses} | \
            {f"{a}/32" for a in entity_hosts}
        prefixes = {p for p in prefixes if p not in taken and p != "0.0.0.0/0"}
        allocator.cidr_identities(prefixes)
        for prefix in prefixes:
            number = allocator.by_prefix[prefix]
            table.identities[number] = Identity(number, ((f"cidr:{prefix}", ""), ("reserved:world", "")), "cidr",
                                                prefix, host_names.get(prefix, ()))
            table.ipcache[prefix] = number
        table.ipcache["0.0.0.0/0"] = IDENTITY_WORLD
        for address in node_addresses:
            table.ipcache[f"{address}/32"] = IDENTITY_HOST
        for address, (entity, _) in entity_hosts.items():
            table.ipcache[f"{address}/32"] = RESERVED_IDENTITIES[entity]
        for key, ip in pod_ips.items():
            table.ipcache[f"{ip}/32"] = table.pod_identity[key]
        return table

    # ------------------------------------------------------------------ selection

    def select(self, peer: Peer) -> set[int]:
        """Identities selected by a peer; {IDENTITY_ANY} for the wildcard."""
        if isinstance(peer, AllPeer):
            return {IDENTITY_ANY}
        if isinstance(peer, EndpointPeer):
            sel = peer.selector
            out = {i.number for i in self.identities.values() if i.kind == "pod" and sel.matches(i.label_map)}
            if sel.names_reserved():
                out |= {i.number for i in self.identities.values()
                        if i.kind == "reserved" and sel.matches(i.label_map)}
            return out
        if isinstance(peer, EntityPeer):
            return self.select_entity(peer.entity)
        if isinstance(peer, CIDRPeer):
            if peer.ipv6:
                # The lab is IPv4 only: its datapath drops IPv6 (REASON_UNSUPPORTED_L3) before any
                # policy, so no identity stands for an IPv6 address. `::/0` selects no world
                # identity either, as in a Cilium agent with IPv6 disabled (pkg/policy/api/cidr.go).
                return set()
            net = ipaddress.ip_network(peer.cidr)
            excepts = [ipaddress.ip_network(e) for e in peer.excepts]
            out = set()
            for ident in self.identities.values():
                if ident.kind != "cidr":
                    continue
                p = ipaddress.ip_network(ident.prefix)
                if p.subnet_of(net) and not any(p.subnet_of(e) for e in excepts):
                    out.add(ident.number)
            if net.prefixlen == 0:
                out.add(IDENTITY_WORLD)
            if peer.ip_block and self.ip_block_selects_pods:
                out |= {self.pod_identity[k] for k in self.pods_in_block(peer)}
            return out
        if isinstance(peer, FQDNPeer):
            return {i.number for i in self.identities.values() if i.kind == "cidr" and i.dns_names and
                    any(fqdn_matches(n, peer.match_name, peer.match_pattern) for n in i.dns_names)}
        raise TypeError(peer)

    def pods_in_block(self, peer: CIDRPeer) -> list[str]:
        """The pods (keys) whose address lies inside `peer` and not inside one of its excepts."""
        if peer.ipv6:
            return []
        net = ipaddress.ip_network(peer.cidr)
        excepts = [ipaddress.ip_network(e) for e in peer.excepts]
        return sorted(k for k, ip in self.pod_ips.items()
                      if (a := ipaddress.ip_address(ip)) in net and not any(a in e for e in excepts))

    def ip_block_split(self, peer: CIDRPeer) -> tuple[str, str, int] | None:
        """(a pod inside, a pod outside, their shared identity) when `peer` covers some but not all
        pods of one identity; None when it covers every pod of an identity or none of them."""
        inside = set(self.pods_in_block(peer))
        for key in sorted(inside):
            number = self.pod_identity[key]
            outside = sorted(k for k in self.pods_with_identity(number) if k not in inside)
            if outside:
                return key, outside[0], number
        return None

    def select_entity(self, entity: str) -> set[int]:
        if entity == "all":
            return {IDENTITY_ANY}
        if entity == "world":
            return {IDENTITY_WORLD} | {i.number for i in self.identities.values() if i.kind == "cidr"}
        if entity == "cluster":
            return {i.number for i in self.identities.values() if i.kind == "pod"} | \
                {RESERVED_IDENTITIES[n] for n in CLUSTER_RESERVED}
        return {RESERVED_IDENTITIES[entity]}

    def describe(self, number: int) -> str:
        if number == IDENTITY_ANY:
            return "0 (any)"
        ident = self.identities.get(number)
        return ident.describe() if ident else str(number)

    def pods_with_identity(self, number: int) -> list[str]:
        return [k for k, n in self.pod_identity.items() if n == number]
