"""Host policies: CiliumClusterwideNetworkPolicy specs with `nodeSelector` instead of
`endpointSelector`.

In Cilium a host policy selects nodes by their labels and is enforced by the host firewall on
the node's own stack, the host endpoint (identity `host`, 1): ingress judges what reaches the
node, egress what the node itself sends. The parser accepts such specs (`PolicySpec.host`)
with Cilium's checks (only in a CCNP, not together with endpointSelector, no L7 at host
ingress, only DNS at host egress).

The lab enforces both directions. Once a host spec selects the node, the resolver adds the
host endpoint (endpoint id HOST_ENDPOINT_ID, identity host, the node's addresses and labels) and
the datapath finds it by the node's addresses: as the destination of packets to the node (its
INGRESS, judged in from_container in the same pass as the sender's egress, from pods and world
hosts alike), and as the source of what the node's own stack sends (its EGRESS, judged in
to_container, lib/host.h, toward pods and world hosts, combined with a pod's ingress). Without a
host spec selecting the node there is no host endpoint and traffic to and from the node is
judged as before. The L7 proxy's own upstream connections are exempt, as in Cilium.

One thing is refused rather than enforced differently: DNS rules at host egress (Cilium sends
the node's DNS through its DNS proxy). The node's packets leave at tc egress, where nothing can
be handed to the proxy (bpf_sk_assign works at tc ingress only), so `apply` and `run` refuse a
host spec with L7 rules in its egress (`host_policy_refusal`) and `validate` says so
(`host_policy_notices`).

A host spec never selects a pod, and a pod spec never the node: the resolver matches each kind
of spec against its own kind of subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import SourceError
from .api import Policy, PolicySpec

# The host endpoint's id: above any pod's (pods are numbered 1.. up to limits.MAX_PODS), within
# the datapath's 16-bit endpoint ids.
HOST_ENDPOINT_ID = 0xFFFF
# How flows, traces and the policy map name the host endpoint (never a pod key: those hold a '/').
HOST_ENDPOINT_NAME = "host"

WHY_L7_REFUSED = ("the node's own packets leave it at tc egress, where the lab cannot hand them to the DNS "
                  "proxy (bpf_sk_assign works at tc ingress only), so these DNS rules would not be enforced; "
                  "allow the DNS servers at L3/L4 instead (toEndpoints or toEntities with toPorts 53/UDP)")


def host_specs(policies: Iterable[Policy]) -> list[tuple[Policy, PolicySpec]]:
    """Every host spec (nodeSelector) of the policies, in order."""
    return [(p, s) for p in policies for s in p.specs if s.host]


def selects_node(spec: PolicySpec, node_labels: Mapping[str, str]) -> bool:
    """Whether a host spec's nodeSelector selects a node carrying these labels."""
    return spec.host and spec.subject.matches(node_labels)


def l7_at_egress(spec: PolicySpec) -> bool:
    """Whether a host spec has L7 (DNS) rules in its egress: the one thing refused."""
    return any(r.direction == "egress" and not r.is_deny and any(pr.l7 for pr in r.port_rules) for r in spec.rules)


def _selection_text(spec: PolicySpec, node_name: str, node_labels: Mapping[str, str]) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(node_labels.items()))
    verb = "selects" if selects_node(spec, node_labels) else "does not select"
    return f"its nodeSelector {spec.subject} {verb} node {node_name} ({labels})"


def host_policy_refusal(policies: Iterable[Policy], node_name: str, node_labels: Mapping[str, str]) -> SourceError | None:
    """The error `apply`/`run` raise for the first host spec with DNS rules at egress among
    `policies`, or None."""
    found = [(p, s) for p, s in host_specs(policies) if l7_at_egress(s)]
    if not found:
        return None
    policy, spec = found[0]
    return SourceError(policy.location,
                       f"{policy.display} {spec.path}: host policy (nodeSelector) with DNS rules at egress not applied: "
                       f"{_selection_text(spec, node_name, node_labels)}; {WHY_L7_REFUSED}")


def host_policy_notices(policies: Iterable[Policy]) -> list[str]:
    """What `validate` says about each host spec with DNS rules at egress: valid as Cilium reads
    it, refused at apply (host policies are otherwise enforced as Cilium enforces them)."""
    return [f"{p.display} {s.path}: host policy (nodeSelector) with DNS rules at egress is valid, but apply and run "
            f"refuse it: {WHY_L7_REFUSED}" for p, s in host_specs(policies) if l7_at_egress(s)]
