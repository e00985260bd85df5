"""Notices about policies the lab accepts but enforces differently from a cluster: what
`validate` and `apply` print beside "valid"/"applied", and the lines `explain` adds for a flow.

They are not errors: Cilium accepts these policies, and so does the lab. They say where the
lab's single IPv4 node cannot do what the manifest asks for:

- an IPv6 CIDR (`toCIDR: [0.0.0.0/0, ::/0]`, an IPv6 `ipBlock`) is accepted and selects
  nothing: the lab is IPv4 only and its datapath drops every IPv6 packet before policy
  (`UNSUPPORTED_L3`). A rule whose peers are all IPv6 allows nothing, yet its section still puts
  the endpoints it selects into default deny, as any rule of a section does in Cilium;
- a Kubernetes `ipBlock` selects pods or not depending on `settings.ipBlockSelectsPods`;
- an IPv6 ICMP type in `icmps` (`family: IPv6`) is accepted and, for the same reason, never
  matches;
- `fromRequires` / `toRequires` are deprecated in Cilium since 1.17 and refused from 1.19 on;
  the lab applies them as Cilium documented them until then;
- a host policy (CCNP `nodeSelector`) is valid as Cilium reads it, but the lab has no host
  firewall: `validate` says so here, and `apply`/`run` refuse it (host.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .api import CIDRPeer, Policy, PolicySpec, Rule
from .host import host_policy_notices
from .identity import IdentityTable

IPV6_NOTE = ("the lab is IPv4 only: IPv6 packets are dropped before policy (UNSUPPORTED_L3), so an IPv6 "
             "CIDR can never match")


def _ipv6_cidrs(rule: Rule) -> list[str]:
    return [p.cidr for p in rule.peers if isinstance(p, CIDRPeer) and p.ipv6]


def policy_notices(policies: Iterable[Policy]) -> list[str]:
    """One line per rule the lab enforces differently (what `validate` and `apply` print): host
    policies, fromRequires/toRequires, IPv6 CIDRs, IPv6 ICMP types."""
    policies = list(policies)
    out = host_policy_notices(policies)
    for policy in policies:
        for spec in policy.specs:
            for rule in spec.rules:
                if (icmp6 := icmpv6_note(policy, rule)) is not None:
                    out.append(icmp6)
                if rule.requires:
                    field = "fromRequires" if rule.direction == "ingress" else "toRequires"
                    out.append(f"{policy.display} {rule.path}: {field} is deprecated since Cilium 1.17 and refused "
                               f"from Cilium 1.19 on (the field takes no items there); write the requirement into "
                               f"each {field.replace('Requires', 'Endpoints')} selector instead")
                v6 = _ipv6_cidrs(rule)
                if not v6:
                    continue
                line = f"{policy.display} {rule.path}: IPv6 CIDR {', '.join(v6)} accepted; {IPV6_NOTE}"
                if len(v6) == len(rule.peers):
                    line += (f"; this rule selects no peer in the lab, and its section still puts the endpoints "
                             f"it selects into default deny for {rule.direction}")
                out.append(line)
    return out


def peer_notes(selecting: Iterable[tuple[Policy, PolicySpec]], direction: str, remote_ip: str | None,
               ids: IdentityTable) -> list[str]:
    """What `explain` says about the rules of `direction` of the selecting specs whose peers the
    lab treats apart: IPv6 CIDRs, and Kubernetes ipBlocks (which behaviour applied)."""
    out: list[str] = []
    remote_pod = next((k for k, ip in ids.pod_ips.items() if ip == remote_ip), None) if remote_ip else None
    for policy, spec in selecting:
        for rule in spec.rules:
            if rule.direction != direction:
                continue
            where = f"{policy.display} {rule.path}"
            v6 = _ipv6_cidrs(rule)
            if v6:
                out.append(f"note: {where} names IPv6 CIDR {', '.join(v6)}: {IPV6_NOTE} here")
            if remote_pod is None:
                continue  # both behaviours agree on what is not a pod
            for peer in rule.peers:
                if not (isinstance(peer, CIDRPeer) and peer.ip_block) or peer.ipv6:
                    continue
                if ipaddress.ip_address(remote_ip) not in ipaddress.ip_network(peer.cidr):  # type: ignore[arg-type]
                    continue
                if not ids.ip_block_selects_pods:
                    what = ("not selected: settings.ipBlockSelectsPods is false (Cilium's behaviour: CIDR rules "
                            "never select pods)")
                elif remote_pod in ids.pods_in_block(peer):
                    what = ("selected: settings.ipBlockSelectsPods is true (the Kubernetes e2e suite's expectation: "
                            "an ipBlock selects the pods whose addresses it covers)")
                else:
                    what = "not selected: its address lies inside an except (settings.ipBlockSelectsPods is true)"
                out.append(f"note: {where} ipBlock {peer.describe().removeprefix('ipBlock ')} covers pod "
                           f"{remote_pod}'s address; the pod is {what}")
    return out


def requirement_notes(stated: Iterable[tuple[Policy, Rule]], endpoint: str) -> list[str]:
    """What `explain` says about the fromRequires / toRequires in force for one endpoint and
    direction: each requirement, the rule that states it, and the rules it narrows."""
    out = []
    for policy, rule in stated:
        field = "fromRequires" if rule.direction == "ingress" else "toRequires"
        kind = "deny" if rule.is_deny else "allow"
        peers = field.replace("Requires", "Endpoints")
        for selector in rule.requires:
            out.append(f"requirement {selector} ({field} of {policy.display} {rule.path}): ANDed into the {peers} "
                       f"selectors of every {kind} rule selecting {endpoint}")
    return out


def icmpv6_note(policy: Policy, rule: Rule) -> str | None:
    """Why a rule's IPv6 `icmps` fields never match (accepted, but the lab carries no IPv6: its
    packets are dropped as UNSUPPORTED_L3); None when the rule has none."""
    v6 = [s for pr in rule.port_rules for s in pr.ports if s.protocol == "ICMPv6"]
    if not v6:
        return None
    return (f"{policy.display} {rule.path}: icmps {', '.join(s.describe() for s in v6)} can never match: "
            "the lab carries no IPv6 (IPv6 packets are dropped as UNSUPPORTED_L3)")


def icmpv6_notes(policies: list[Policy]) -> list[str]:
    """`icmpv6_note` of every rule of `policies` that has one."""
    return [note for policy in policies for spec in policy.specs for rule in spec.rules
            if (note := icmpv6_note(policy, rule)) is not None]
