"""Host policies: CiliumClusterwideNetworkPolicy specs with `nodeSelector` instead of
`endpointSelector`.

In Cilium a host policy selects nodes by their labels and is enforced by the host firewall on
the node's own stack, the host endpoint (identity `host`, 1): ingress judges what reaches the
node, egress what the node itself sends. The parser accepts such specs (`PolicySpec.host`)
with Cilium's checks (only in a CCNP, not together with endpointSelector, no L7 at host
ingress, only DNS at host egress). This module says which node a host spec selects and why the
lab does not enforce it yet: the lab's datapath has no host endpoint, so traffic to and from
the node's own stack is never judged against a policy of its own. Rather than accept a policy
and silently not enforce it, `apply` and `run` refuse a host policy with `host_policy_refusal`,
and `validate` prints `host_policy_notices`.

A host spec never selects a pod: the resolver skips specs with `host` set when it matches
subjects against pod labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import SourceError
from .api import Policy, PolicySpec

WHY_NOT_ENFORCED = ("the lab's datapath has no host firewall yet: traffic to and from the node's own stack "
                    "(identity host) is never judged against a policy of its own, so a host policy would be "
                    "accepted and not enforced; to restrict what pods may send to the node, write the rule on "
                    "the pods' side (toEntities: [host] in their egress)")


def host_specs(policies: Iterable[Policy]) -> list[tuple[Policy, PolicySpec]]:
    """Every host spec (nodeSelector) of the policies, in order."""
    return [(p, s) for p in policies for s in p.specs if s.host]


def selects_node(spec: PolicySpec, node_labels: Mapping[str, str]) -> bool:
    """Whether a host spec's nodeSelector selects a node carrying these labels."""
    return spec.host and spec.subject.matches(node_labels)


def _selection_text(spec: PolicySpec, node_name: str, node_labels: Mapping[str, str]) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(node_labels.items()))
    verb = "selects" if selects_node(spec, node_labels) else "does not select"
    return f"its nodeSelector {spec.subject} {verb} node {node_name} ({labels})"


def host_policy_refusal(policies: Iterable[Policy], node_name: str, node_labels: Mapping[str, str]) -> SourceError | None:
    """The error `apply`/`run` raise for the first host policy among `policies`, or None."""
    found = host_specs(policies)
    if not found:
        return None
    policy, spec = found[0]
    return SourceError(policy.location,
                       f"{policy.display} {spec.path}: host policy (nodeSelector) not applied: "
                       f"{_selection_text(spec, node_name, node_labels)}; {WHY_NOT_ENFORCED}")


def host_policy_notices(policies: Iterable[Policy]) -> list[str]:
    """What `validate` says about each host spec: valid as Cilium reads it, refused at apply."""
    return [f"{p.display} {s.path}: host policy (nodeSelector) is valid, but apply and run refuse it: "
            f"{WHY_NOT_ENFORCED}" for p, s in host_specs(policies)]
