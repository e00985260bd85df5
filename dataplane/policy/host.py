"""Host policies: CiliumClusterwideNetworkPolicy specs with `nodeSelector` instead of
`endpointSelector`.

In Cilium a host policy selects nodes by their labels and is enforced by the host firewall on
the node's own stack, the host endpoint (identity `host`, 1): ingress judges what reaches the
node, egress what the node itself sends. The parser accepts such specs (`PolicySpec.host`)
with Cilium's checks (only in a CCNP, not together with endpointSelector, no L7 at host
ingress, only DNS at host egress).

The lab enforces host INGRESS: once a host spec selects the node, the resolver adds the host
endpoint (`host_endpoint`: endpoint id HOST_ENDPOINT_ID, identity host, the node's addresses and
labels) and the datapath finds it as the destination of packets to the node's addresses, judging
them against its ingress policy in the same pass as the sender's egress (from pods, and from
world hosts). Without a host spec selecting the node there is no host endpoint, and traffic to
the node is judged as before (the sender's egress only).

Host EGRESS (what the node's own stack sends) is not enforced: `apply` and `run` refuse a host
spec that has egress rules or enforces egress (`host_policy_refusal`), rather than accept it and
silently not enforce it; `validate` says so (`host_policy_notices`).

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

WHY_EGRESS_NOT_ENFORCED = ("the lab enforces host policies at ingress only (what reaches the node); what the "
                           "node's own stack sends is never judged against a host egress policy, so it would be "
                           "accepted and not enforced; to restrict what reaches the pods from the node, write "
                           "the rule on the pods' side (fromEntities: [host] in their ingress)")


def host_specs(policies: Iterable[Policy]) -> list[tuple[Policy, PolicySpec]]:
    """Every host spec (nodeSelector) of the policies, in order."""
    return [(p, s) for p in policies for s in p.specs if s.host]


def selects_node(spec: PolicySpec, node_labels: Mapping[str, str]) -> bool:
    """Whether a host spec's nodeSelector selects a node carrying these labels."""
    return spec.host and spec.subject.matches(node_labels)


def has_egress(spec: PolicySpec) -> bool:
    """Whether a host spec says anything about the node's egress (rules, or isolation)."""
    return spec.enforces_egress or any(r.direction == "egress" for r in spec.rules)


def _selection_text(spec: PolicySpec, node_name: str, node_labels: Mapping[str, str]) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(node_labels.items()))
    verb = "selects" if selects_node(spec, node_labels) else "does not select"
    return f"its nodeSelector {spec.subject} {verb} node {node_name} ({labels})"


def host_policy_refusal(policies: Iterable[Policy], node_name: str, node_labels: Mapping[str, str]) -> SourceError | None:
    """The error `apply`/`run` raise for the first host spec with egress among `policies`, or None."""
    found = [(p, s) for p, s in host_specs(policies) if has_egress(s)]
    if not found:
        return None
    policy, spec = found[0]
    return SourceError(policy.location,
                       f"{policy.display} {spec.path}: host policy (nodeSelector) with egress not applied: "
                       f"{_selection_text(spec, node_name, node_labels)}; {WHY_EGRESS_NOT_ENFORCED}")


def host_policy_notices(policies: Iterable[Policy]) -> list[str]:
    """What `validate` says about each host spec with egress: valid as Cilium reads it, refused
    at apply (host ingress is enforced as Cilium enforces it: no notice)."""
    return [f"{p.display} {s.path}: host policy (nodeSelector) with egress is valid, but apply and run refuse it: "
            f"{WHY_EGRESS_NOT_ENFORCED}" for p, s in host_specs(policies) if has_egress(s)]
