"""Label selectors over Cilium-style identity labels, and the label sets of pods.

A pod's identity labels are its own labels plus two kinds of labels Cilium derives from its
namespace (Cilium pkg/k8s/apis/cilium.io/const.go):

    k8s:app=frontend                                   pod label
    k8s:io.kubernetes.pod.namespace=shop               the pod's namespace
    k8s:io.cilium.k8s.namespace.labels.team=shop       every label of the namespace
    k8s:io.cilium.k8s.policy.cluster=default           the cluster the pod runs in

The cluster label is the agent's `--cluster-name` (Cilium pkg/k8s/apis/cilium.io/const.go
PolicyLabelCluster, added to every endpoint's labels); the scenario's `settings.clusterName`
sets it, `default` unless given, as in Cilium.

All pod labels have source `k8s`. Selector keys may be written with the `k8s:` or `any:` source
prefix or without one (Cilium treats a bare key as `any:`); both match `k8s` labels, so the
prefix is dropped when a selector is built. Keys with the `reserved:` source select reserved
identities (`reserved:host`, `reserved:world`, ...), which carry the single label
`reserved:<name>` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
DEFAULT_CLUSTER = "default"
RESERVED_PREFIX = "reserved:"
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
LABEL_SOURCES = ("k8s", "any", "reserved")


def strip_source(key: str) -> str:
    """'k8s:app' -> 'app'; 'any:app' -> 'app'; 'reserved:host' stays as it is."""
    if key.startswith("k8s:"):
        return key[4:]
    if key.startswith("any:"):
        return key[4:]
    return key


def key_source(key: str) -> str | None:
    """The source prefix of a selector key ('' when none), None for an unknown source."""
    if ":" not in key:
        return ""
    source = key.split(":", 1)[0]
    return source if source in LABEL_SOURCES else None


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        # Semantics of k8s.io/apimachinery/pkg/labels/selector.go Requirement.Matches.
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist

    def __str__(self) -> str:
        if self.operator in ("In", "NotIn"):
            return f"{self.key} {self.operator.lower()} ({','.join(self.values)})"
        return self.key if self.operator == "Exists" else f"!{self.key}"


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels AND matchExpressions; empty selects every label set it is applied to."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and \
            all(r.matches(labels) for r in self.match_expressions)

    def keys(self) -> set[str]:
        return {k for k, _ in self.match_labels} | {r.key for r in self.match_expressions}

    def names_namespace(self) -> bool:
        return NAMESPACE_LABEL in self.keys()

    def names_reserved(self) -> bool:
        return any(k.startswith(RESERVED_PREFIX) for k in self.keys())

    def and_(self, other: "LabelSelector") -> "LabelSelector":
        """Both selectors must match (K8s namespaceSelector AND podSelector in one peer)."""
        # Conflicting matchLabels for one key are kept as an expression so the AND stays exact.
        labels = dict(self.match_labels)
        exprs = list(self.match_expressions) + list(other.match_expressions)
        for k, v in other.match_labels:
            if k in labels and labels[k] != v:
                exprs.append(Requirement(k, "In", (v,)))
            else:
                labels[k] = v
        return LabelSelector(tuple(sorted(labels.items())), tuple(exprs))

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels] + [str(r) for r in self.match_expressions]
        return "{" + ", ".join(parts) + "}" if parts else "{} (all)"


def pod_identity_labels(pod_labels: Mapping[str, str], namespace: str,
                        namespace_labels: Mapping[str, str], cluster: str = DEFAULT_CLUSTER) -> dict[str, str]:
    """The label set (source prefix dropped) that decides a pod's identity."""
    labels = dict(pod_labels)
    labels[NAMESPACE_LABEL] = namespace
    for k, v in namespace_labels.items():
        labels[NAMESPACE_LABELS_PREFIX + k] = v
    # Kubernetes sets this label on every namespace (since 1.21) to the namespace's name and keeps
    # it so whatever a manifest says; NetworkPolicy relies on it.
    labels[NAMESPACE_LABELS_PREFIX + "kubernetes.io/metadata.name"] = namespace
    # Set last: the cluster label comes from the agent's configuration, never from the pod, so a
    # pod label of the same key does not change which cluster the identity names.
    labels[CLUSTER_LABEL] = cluster
    return labels
