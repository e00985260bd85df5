"""The service map's model: who talks to whom in a lab, and how it went, from its flow records.

Nodes are the lab's pods (grouped by namespace on the page), its world hosts, DNS servers (pods
labelled `k8s-app=kube-dns`, as in Kubernetes), the lab node's own stack (`node`), and any
other address a record names (by its IP). An edge joins a record's source to its destination
and counts the records by **verdict class**:

    forwarded   the kernel forwarded the flow (FORWARD) or handed it to the L7 proxy (REDIRECT),
                or the proxy forwarded the request
    audit       the kernel would have dropped the flow and passed it (AUDIT, audit mode)
    l7-denied   the L7 proxy denied the request by policy (HTTP 403, DNS REFUSED)
    dropped     the kernel dropped the flow (any drop reason), or the proxy could not serve the
                request (malformed, over a limit, no answer upstream: Hubble's ERROR)

A red edge names who dropped it: a drop no rule explains (a default deny) names, in its row's
`isolated_by`, the policies whose selection of the deciding pod makes that direction enforced,
as the lab's map state says (`MapState.isolating_policies`, the lookup the metrics' policy-drop
counter makes too; the server loads the state from the lab's policy.json and again after each
`l7lab apply`).

Edges from the lab node whose records carry a pod's identity, not the host's, are the L7
proxy's upstream connections: the proxy, in the node's stack, opens them on behalf of that pod,
and the datapath passes them without a policy lookup, as Cilium passes traffic from its proxy.
Such an edge says on whose behalf (`proxy_upstream_for`).

An edge's class is the worst class among its recent records, in the order
dropped > l7-denied > audit > forwarded: one denied DELETE among GETs paints the edge
l7-denied for as long as it is among the edge's last `RECENT_PER_EDGE` records. The map keeps
only those records per edge and at most `MAX_EDGES` edges (the least recently active goes
first), so its memory is bounded however long the lab runs.

This module is pure: records in, plain dicts (the JSON API's bodies) out; the server
(`dataplane/ui/server.py`) feeds it and serves what it says.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from ..abi import Direction
from ..flowrecord import Endpoint, Flow, FlowType, Record, TrafficDirection, Verdict
from ..mapstate import MapState, policy_display

RECENT_PER_EDGE = 50  # records kept per edge (the side panel's list, and what "recent" means)
MAX_EDGES = 2000  # edges kept; past it the edge that was quiet longest is forgotten
MAX_PODS_PER_IDENTITY = 16  # pods remembered per identity from the records (a lab has a handful)
NODE_ID = "node"  # the lab node's own stack, as the records name it
DNS_LABEL = ("k8s-app", "kube-dns")
FIRST_POD_IDENTITY = 256  # Cilium's label-set identities: 256 up to the CIDR identities at 2^24
FIRST_CIDR_IDENTITY = 1 << 24


class EdgeClass(str, enum.Enum):
    FORWARDED = "forwarded"
    AUDIT = "audit"
    L7_DENIED = "l7-denied"
    DROPPED = "dropped"


# Worst last: an edge shows the highest-ranked class among its recent records.
SEVERITY = {EdgeClass.FORWARDED: 0, EdgeClass.AUDIT: 1, EdgeClass.L7_DENIED: 2, EdgeClass.DROPPED: 3}

_CLASS_OF_VERDICT = {
    Verdict.FORWARD: EdgeClass.FORWARDED, Verdict.REDIRECT: EdgeClass.FORWARDED,
    Verdict.AUDIT: EdgeClass.AUDIT, Verdict.DROP: EdgeClass.DROPPED,
    Verdict.FORWARDED: EdgeClass.FORWARDED, Verdict.DENIED: EdgeClass.L7_DENIED, Verdict.ERROR: EdgeClass.DROPPED,
}


def edge_class(flow: Flow) -> EdgeClass:
    """The verdict class of one record (see the module's docstring)."""
    return _CLASS_OF_VERDICT[flow.verdict]


def worst(classes: Any) -> EdgeClass:
    """The worst of some classes (forwarded when there are none)."""
    return max(classes, key=SEVERITY.__getitem__, default=EdgeClass.FORWARDED)


@dataclass(frozen=True)
class MapNode:
    """One box on the map."""

    id: str  # "namespace/pod", a world host's name, "node", or an IP nobody in the lab has
    kind: str  # "pod", "dns", "world", "node" or "other"
    ip: str = ""
    namespace: str = ""
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "ip": self.ip, "namespace": self.namespace,
                "name": self.name or self.id, "labels": dict(sorted(self.labels.items()))}


def lab_nodes(endpoints: dict[str, Any]) -> list[MapNode]:
    """The map's fixed nodes from a lab record's endpoints (`LabRecord.endpoints`: key ->
    EndpointRecord with kind 'pod' or 'world', ip and labels), plus the lab node."""
    nodes = []
    for key, ep in sorted(endpoints.items()):
        if ep.kind == "pod":
            namespace, _, name = key.partition("/")
            kind = "dns" if ep.labels.get(DNS_LABEL[0]) == DNS_LABEL[1] else "pod"
            nodes.append(MapNode(key, kind, ep.ip, namespace, name, dict(ep.labels)))
        else:
            nodes.append(MapNode(key, "world", ep.ip, name=key))
    nodes.append(MapNode(NODE_ID, "node", name="lab node"))
    return nodes


def is_pod_identity(identity: int) -> bool:
    return FIRST_POD_IDENTITY <= identity < FIRST_CIDR_IDENTITY


def default_denied(flow: Flow) -> bool:
    """A flow a policy stopped (or, in audit mode, would have) while naming no policy: no rule
    matched where the direction is enforced (kernel), or no L7 rule covers it (proxy)."""
    if flow.policy.policies:
        return False
    return (flow.verdict == Verdict.DROP and flow.drop_reason == "POLICY_DENIED") or \
        flow.verdict in (Verdict.AUDIT, Verdict.DENIED)


def isolated_by(flow: Flow, state: MapState | None) -> list[str]:
    """For a default-denied flow, the policies that isolate the deciding pod in the flow's
    direction (the destination's ingress, the source's egress), as verdicts name them; [] for
    any other flow, or with no map state to ask."""
    if state is None or not default_denied(flow):
        return []
    if flow.direction == TrafficDirection.INGRESS:
        side, direction = flow.destination, Direction.INGRESS
    elif flow.direction == TrafficDirection.EGRESS:
        side, direction = flow.source, Direction.EGRESS
    else:
        return []
    if not side.namespace:
        return []
    return [policy_display(*ref) for ref in state.isolating_policies(f"{side.namespace}/{side.pod}", direction)]


def flow_detail(flow: Flow, state: MapState | None = None) -> dict[str, Any]:
    """One row of an edge's side panel: when, what was decided, by which policy and rule (for
    a default deny, the policies isolating the pod, as `state` names them), and for an L7
    record the request and its answer."""
    out: dict[str, Any] = {
        "time": flow.time, "type": flow.type.value, "verdict": flow.verdict.value, "class": edge_class(flow).value,
        "drop_reason": flow.drop_reason if flow.verdict == Verdict.DROP else "",
        "direction": flow.direction.value, "protocol": flow.l4.protocol, "port": flow.destination.port,
        "source_identity": flow.source.identity,
        "policies": list(flow.policy.policies), "rules": list(flow.policy.rules),
        "isolated_by": isolated_by(flow, state), "summary": flow.summary,
        "http": None, "dns": None,
    }
    if flow.http is not None:
        out["http"] = {"method": flow.http.method, "path": flow.http.path, "url": flow.http.url,
                       "protocol": flow.http.protocol, "code": flow.http.code}
    if flow.dns is not None:
        out["dns"] = {"query": flow.dns.query, "qtypes": list(flow.dns.qtypes), "rcode": flow.dns.rcode}
    return out


@dataclass
class Edge:
    source: str
    destination: str
    counts: Counter[EdgeClass] = field(default_factory=Counter)
    recent: deque[Flow] = field(default_factory=lambda: deque(maxlen=RECENT_PER_EDGE))

    @property
    def verdict(self) -> EdgeClass:
        return worst(edge_class(f) for f in self.recent)

    def upstream_identities(self) -> list[int]:
        """The pod identities the node's records on this edge carry: the pods the L7 proxy
        connected upstream for ([] for an edge not from the node, or the node's own traffic)."""
        if self.source != NODE_ID:
            return []
        return sorted({f.source.identity for f in self.recent if is_pod_identity(f.source.identity)})

    def summary(self, upstream_for: list[str] | None = None) -> dict[str, Any]:
        ports = sorted({f.destination.port for f in self.recent if f.destination.port})
        return {"from": self.source, "to": self.destination, "verdict": self.verdict.value,
                "counts": {c.value: self.counts[c] for c in EdgeClass},
                "last": self.recent[-1].time if self.recent else 0.0, "ports": ports[:8],
                "proxy_upstream_for": upstream_for or []}

    def detail(self, upstream_for: list[str] | None = None, state: MapState | None = None) -> dict[str, Any]:
        """The summary and the recent records, newest first (the kernel's and the proxy's
        records arrive from two files, so arrival order is not quite time order)."""
        newest_first = sorted(self.recent, key=lambda f: f.time, reverse=True)
        return {**self.summary(upstream_for), "flows": [flow_detail(f, state) for f in newest_first]}


class ServiceMap:
    """The lab's nodes and the edges its records make; `add` takes new records and says which
    edges changed, `graph` and `edge` give the API's bodies."""

    def __init__(self, nodes: list[MapNode], max_edges: int = MAX_EDGES) -> None:
        self.nodes: dict[str, MapNode] = {}
        self.by_ip: dict[str, str] = {}
        self.set_nodes(nodes)
        self.edges: OrderedDict[tuple[str, str], Edge] = OrderedDict()  # least recently active first
        self.max_edges = max_edges
        self.policy_state: MapState | None = None  # the lab's map state in force (policy.json)
        self.pods_by_identity: dict[int, set[str]] = {}  # as records name pods: when there is no map state

    def set_policy_state(self, state: MapState | None) -> None:
        """The lab's map state as policy.json now holds it (after an `l7lab apply`, the new one)."""
        self.policy_state = state

    def pods_of(self, identity: int) -> list[str]:
        """The pods that carry a security identity (pods with the same labels share one): by
        the map state if there is one, else as the records have named them."""
        if self.policy_state is not None:
            pods = sorted(ep.name for ep in self.policy_state.endpoints.values() if ep.identity == identity)
            if pods:
                return pods
        return sorted(self.pods_by_identity.get(identity, ()))

    def upstream_for(self, edge: Edge) -> list[str]:
        """On whose behalf the L7 proxy made an edge's connections: the pods of the identities
        its records carry (an identity no pod is known to have is named by its number)."""
        return [pod for identity in edge.upstream_identities()
                for pod in (self.pods_of(identity) or [f"identity {identity}"])]

    def set_nodes(self, nodes: list[MapNode]) -> bool:
        """The lab's nodes as its record now says (labels change with `l7lab label`); True if
        anything changed. Edges are kept: they are named by node ids, which do not change."""
        by_id = {n.id: n for n in nodes}
        if by_id == self.nodes:
            return False
        self.nodes = by_id
        self.by_ip = {n.ip: n.id for n in nodes if n.ip}
        return True

    def node_id(self, ep: Endpoint) -> str:
        """Which node an endpoint of a record is: a pod by name, a world host or the node by its
        host name, else by its address (the proxy's records name pods only, so a world host
        there is known by its IP)."""
        if ep.namespace:
            return f"{ep.namespace}/{ep.pod}"
        if ep.host:
            return ep.host
        return self.by_ip.get(ep.ip, ep.ip or "?")

    def node(self, node_id: str) -> MapNode:
        return self.nodes.get(node_id) or MapNode(node_id, "other", node_id)

    def add(self, records: list[Record]) -> list[tuple[str, str]]:
        """Count new records (PROXY events are not traffic and are skipped); the keys of the
        edges that changed, in order of first change."""
        changed: dict[tuple[str, str], None] = {}
        for record in records:
            if not isinstance(record, Flow) or record.type not in (FlowType.L3_L4, FlowType.L7):
                continue
            key = (self.node_id(record.source), self.node_id(record.destination))
            edge = self.edges.get(key)
            if edge is None:
                edge = self.edges[key] = Edge(*key)
                while len(self.edges) > self.max_edges:
                    gone, _ = self.edges.popitem(last=False)
                    changed.pop(gone, None)
            else:
                self.edges.move_to_end(key)
            for side in (record.source, record.destination):
                if side.namespace and is_pod_identity(side.identity):
                    pods = self.pods_by_identity.setdefault(side.identity, set())
                    if len(pods) < MAX_PODS_PER_IDENTITY:
                        pods.add(f"{side.namespace}/{side.pod}")
            edge.counts[edge_class(record)] += 1
            edge.recent.append(record)
            changed[key] = None
        return list(changed)

    def nodes_of(self, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The nodes the edges `keys` join (a node not in the lab record appears as 'other')."""
        ids = dict.fromkeys(i for key in keys for i in key)
        return [self.node(i).to_json() for i in ids]

    def graph(self) -> dict[str, Any]:
        """Every node (the lab's, and any other an edge names) and every edge's summary."""
        ids = dict.fromkeys([*self.nodes, *(i for key in self.edges for i in key)])
        return {"nodes": [self.node(i).to_json() for i in ids],
                "edges": [e.summary(self.upstream_for(e)) for e in self.edges.values()],
                "classes": [c.value for c in sorted(EdgeClass, key=SEVERITY.__getitem__, reverse=True)]}

    def update(self, keys: list[tuple[str, str]]) -> dict[str, Any]:
        """What a live update says about changed edges: their nodes and their summaries."""
        return {"nodes": self.nodes_of(keys),
                "edges": [self.edges[k].summary(self.upstream_for(self.edges[k])) for k in keys if k in self.edges]}

    def edge(self, source: str, destination: str) -> dict[str, Any] | None:
        edge = self.edges.get((source, destination))
        return edge.detail(self.upstream_for(edge), self.policy_state) if edge is not None else None
