"""Scenario model: a lab described as plain typed objects, parsed and validated strictly.

A scenario file names namespaces, pods, world hosts, the policies applied at start and ordered
steps (policy changes, or probes with expected outcomes). Structure is checked against the JSON
Schema shipped in `schema/scenario.schema.json` (the one schema file; the docs link to it);
meaning is checked here (references, addresses, duplicates). Every error names the file, the
line and the field path. Policies stay raw manifests (`PolicySource`); `dataplane.policy` parses them.

Nothing here touches the kernel.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema

from . import limits
from .abi import PROXY_PORT
from .errors import ErrorList, SourceError, SourceLocation
from .yamlsource import Budget, Document, describe_value, format_path, load_file

Protocol = Literal["TCP", "UDP", "SCTP", "ICMP"]
# `audited`: the traffic passes (as `allowed` observes) and the kernel's verdict for the flow is
# AUDIT: a would-be drop that audit mode let through.
Expectation = Literal["allowed", "audited", "dropped", "denied", "refused", "unresolved"]
EXPECTATIONS: tuple[str, ...] = ("allowed", "audited", "dropped", "denied", "refused", "unresolved")



def meets(expectation: str, outcome: str) -> bool:
    """Whether an outcome meets a probe's expectation: the same, or `audited` for `allowed`
    (an audited flow passes, so scenarios written before `audited` existed still hold)."""
    return outcome == expectation or (expectation == "allowed" and outcome == "audited")


DEFAULT_POD_CIDR = "10.200.0.0/24"
# Addresses no host outside the cluster can have: they never name one unicast host (Linux
# routes none of them to a neighbour: 0/8 is "this network", 127/8 loops back inside the sender,
# 224/4 is multicast, 240/4 reserved and its last address the limited broadcast).
NOT_A_WORLD_ADDRESS = tuple((ipaddress.ip_network(n), why) for n, why in (
    ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8): it never leaves the sender's own namespace"),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("255.255.255.255/32", "the limited broadcast address"),
    ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
))
DEFAULT_NAMESPACE = "default"
DEFAULT_CLUSTER_NAME = "default"  # Cilium's default --cluster-name
NODE_TARGET = "node"  # a probe's `to` naming the lab node's own address, or its `from` naming the node
HOST_SOURCE = "host"  # Probe.source of a probe from the node (the oracle's name for the node's own stack)
GATEWAY_IP = "169.254.1.1"  # every pod's default gateway: an address of the node, answered by ARP
# Service ClusterIPs: Kubernetes' default service range starts at 10.96.0.0 (kube-apiserver
# --service-cluster-ip-range 10.96.0.0/12); the lab takes a /24 of it unless settings say otherwise.
DEFAULT_SERVICE_CIDR = "10.96.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
# The cluster DNS: the pods carrying this label (CoreDNS's, as kubeadm deploys it) answer DNS on
# port 53, and every pod's resolv.conf names the first of them. World hosts' records carry
# DEFAULT_DNS_TTL unless the scenario says otherwise; the cluster's own names CLUSTER_DNS_TTL,
# the default TTL of CoreDNS's kubernetes plugin.
CLUSTER_DNS_LABEL = ("k8s-app", "kube-dns")
DEFAULT_DNS_TTL = 30
CLUSTER_DNS_TTL = 5


@dataclass(frozen=True)
class Port:
    port: int
    protocol: Protocol = "TCP"
    name: str = ""
    tls: bool = False  # world hosts: the port serves HTTPS with a certificate of the lab's CA


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    audit: bool = False  # every pod of the namespace starts in audit mode


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ip: str
    ports: tuple[Port, ...] = ()
    audit: bool = False  # starts in audit mode (Cilium's per-endpoint PolicyAuditMode)

    @property
    def key(self) -> str:
        """'namespace/name': unique within a lab."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorldHost:
    name: str
    address: str
    dns_names: tuple[str, ...] = ()
    ports: tuple[Port, ...] = ()
    # A reserved identity the host's address carries instead of world ("kube-apiserver",
    # "remote-node"): the lab's stand-in for the API server or another node of the cluster.
    entity: str = ""
    aliases: tuple[str, ...] = ()  # names the cluster DNS answers with a CNAME to dns_names[0]
    ttl: int | None = None  # TTL of its DNS records (None: settings.dns_ttl)


@dataclass(frozen=True)
class ServicePort:
    """One port of a Service: `port` on the ClusterIP, forwarded to `target_port` of each backend
    (a number, or the name of a port the backend pods declare)."""

    port: int
    protocol: Protocol = "TCP"
    target_port: int | str = 0  # 0: the same as port
    name: str = ""

    def backend_port(self, pod: "Pod") -> int | None:
        """The port of `pod` this service port forwards to; None when `target_port` names a
        port the pod does not declare (Kubernetes leaves such a pod out of that port's endpoints)."""
        if isinstance(self.target_port, str):
            return next((p.port for p in pod.ports if p.name == self.target_port and p.protocol == self.protocol), None)
        return self.target_port or self.port


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service of type ClusterIP (spec.selector, spec.ports, spec.sessionAffinity)."""

    name: str
    namespace: str
    cluster_ip: str
    selector: dict[str, str]
    ports: tuple[ServicePort, ...]
    session_affinity: Literal["None", "ClientIP"] = "None"
    labels: dict[str, str] = field(default_factory=dict)  # the Service object's own labels

    @property
    def key(self) -> str:
        """'namespace/name': unique within a lab."""
        return f"{self.namespace}/{self.name}"

    def dns_names(self) -> list[str]:
        """The names cluster DNS gives the service, longest last: NAME.NS, NAME.NS.svc,
        NAME.NS.svc.cluster.local (and NAME alone inside its own namespace, through a pod's DNS
        search path: `Scenario.search_path`)."""
        return [f"{self.name}.{self.namespace}", f"{self.name}.{self.namespace}.svc",
                f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"]

    def selects(self, labels: dict[str, str]) -> bool:
        """Whether a pod of the service's namespace with these labels is a backend (a Service's
        selector is equality on every key; an empty or absent selector selects nothing)."""
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector.items())

    def port(self, port: int, protocol: str) -> ServicePort | None:
        return next((p for p in self.ports if p.port == port and p.protocol == protocol), None)


@dataclass(frozen=True)
class PolicySource:
    """One policy document as the user wrote it, with where it came from."""

    document: Document

    @property
    def data(self) -> dict[str, Any]:
        return self.document.data


@dataclass(frozen=True)
class PolicyRef:
    kind: str
    name: str
    namespace: str = ""


@dataclass(frozen=True)
class Relabel:
    target: Literal["pod", "namespace"]
    name: str  # pod key 'namespace/name' or namespace name
    set: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditChange:
    """Audit mode switched on or off for one pod, every pod of a namespace, or every endpoint
    ("all"): a scenario's `audit` step and `l7lab audit on|off` alike."""

    target: Literal["pod", "namespace", "all"]
    name: str  # pod key 'namespace/name', namespace name, or "" for all
    on: bool

    def __str__(self) -> str:
        what = "every endpoint" if self.target == "all" else f"{self.target} {self.name}"
        return f"audit {'on' if self.on else 'off'} for {what}"


@dataclass(frozen=True)
class HttpRequest:
    method: str = "GET"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class Destination:
    """What a probe targets: a pod or a world host, reached by address or by DNS name."""

    kind: Literal["pod", "world", "service", "node"]
    name: str  # pod key, world host name, service key, or the node's name
    ip: str
    port: int
    dns_name: str = ""  # set when the probe names the destination by a DNS name
    # A service: the pod key of the backend the probe's connection is to reach ("": the one
    # dataplane/services.py probe_backend picks). The prober chooses its source port for it.
    backend: str = ""
    # A world host's TLS port: the name the client sends as SNI and checks the server's
    # certificate for (the DNS name the probe used, else the host's first DNS name); "" for
    # plain TCP.
    tls_name: str = ""

    def __str__(self) -> str:
        name = self.dns_name or self.name
        text = f"{name}:{self.port}" if self.port else name  # an ICMP probe has no port
        return f"{text} (backend {self.backend})" if self.backend else text


@dataclass(frozen=True)
class IcmpMessage:
    """What an ICMP probe sends: `echo` is a ping (an echo request that expects its reply)."""

    type: Literal["echo"] = "echo"

    def __str__(self) -> str:
        return "ICMP echo request (ping)"


@dataclass(frozen=True)
class DnsQuery:
    """A DNS question a probe asks (over UDP): `name` and record `type`."""

    name: str
    type: str = "A"

    def __str__(self) -> str:
        return f"DNS {self.type} {self.name}"


@dataclass(frozen=True)
class Probe:
    source: str  # pod key, a world host's name (ingress from outside the cluster), or HOST_SOURCE (the node)
    destination: Destination
    protocol: Protocol
    expect: Expectation
    http: HttpRequest | None
    timeout: float
    location: SourceLocation
    dns: DnsQuery | None = None  # a DNS query instead of a plain datagram or HTTP request (UDP or TCP)
    icmp: IcmpMessage | None = None  # set exactly when protocol is ICMP; the destination has no port

    @property
    def host_header(self) -> str:
        """The Host header a client sends: the name as written, with the port unless it is 80."""
        dest = self.destination
        name = dest.dns_name or dest.name.split("/")[-1]
        return name if dest.port == 80 else f"{name}:{dest.port}"

    @property
    def request_text(self) -> str:
        if self.dns is not None:
            return str(self.dns)
        if self.icmp is not None:
            return str(self.icmp)
        if self.protocol == "UDP":
            return "datagram"
        if self.protocol == "SCTP":
            return "SCTP INIT"
        return str(self.http) if self.http else "GET /"


@dataclass(frozen=True)
class Step:
    index: int
    name: str
    apply: tuple[PolicySource, ...] = ()
    delete: tuple[PolicyRef, ...] = ()
    relabel: tuple[Relabel, ...] = ()
    probes: tuple[Probe, ...] = ()
    audit: tuple[AuditChange, ...] = ()
    # DNS names whose learned addresses the step waits for the lab to forget (TTL passed, no
    # connection open): the names as written, lower case, without a trailing dot.
    expire: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        for kind in ("apply", "delete", "relabel", "audit", "probes", "expire"):
            if getattr(self, kind):
                return kind
        return "empty"


@dataclass(frozen=True)
class Settings:
    pod_cidr: str = DEFAULT_POD_CIDR
    probe_timeout: float = 1.0
    policy_enforcement: Literal["default", "always", "never"] = "default"
    audit: bool = False
    # Cilium's --cluster-name: every pod's identity carries io.cilium.k8s.policy.cluster=<name>.
    cluster_name: str = DEFAULT_CLUSTER_NAME
    # Kubernetes `ipBlock` peers also select pods whose address they cover (the Kubernetes e2e
    # suite's expectation); off by default: Cilium's CIDR rules never select cluster endpoints.
    ip_block_selects_pods: bool = False
    # ClusterIPs are allocated from this range (Kubernetes' --service-cluster-ip-range).
    service_cidr: str = DEFAULT_SERVICE_CIDR
    # The cluster DNS's TTL for world hosts' records (cluster names get CLUSTER_DNS_TTL).
    dns_ttl: int = DEFAULT_DNS_TTL
    # Cilium's --tofqdns-min-ttl (default 0 since Cilium 1.13: the answer's TTL is honoured) and
    # --tofqdns-endpoint-max-ip-per-hostname (default 50).
    fqdn_min_ttl: int = 0
    fqdn_max_ips_per_hostname: int = 50


DEFAULT_NODE_NAME = "lab-node"
HOSTNAME_LABEL = "kubernetes.io/hostname"
OS_LABEL = "kubernetes.io/os"


@dataclass(frozen=True)
class Node:
    """The lab's single node as a Kubernetes Node. `labels` are the node's labels as a cluster
    shows them: the declared ones plus those the kubelet sets on every node (hostname, os); a
    CiliumClusterwideNetworkPolicy's nodeSelector is matched against them."""

    name: str = DEFAULT_NODE_NAME
    labels: dict[str, str] = field(default_factory=lambda: {HOSTNAME_LABEL: DEFAULT_NODE_NAME, OS_LABEL: "linux"})
    # What a server in the node's own namespace listens on: probes `to: node:PORT` reach it.
    ports: tuple[Port, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    description: str
    settings: Settings
    namespaces: dict[str, Namespace]
    pods: dict[str, Pod]  # by pod key
    world: dict[str, WorldHost]
    policies: tuple[PolicySource, ...]
    steps: tuple[Step, ...]
    node: Node = field(default_factory=Node)
    services: dict[str, Service] = field(default_factory=dict)  # by service key

    def service_key(self, ref: str, namespace: str = DEFAULT_NAMESPACE) -> str | None:
        """A service by 'namespace/name', or by bare name in `namespace`; None if there is none."""
        if ref in self.services:
            return ref
        key = f"{namespace}/{ref}"
        return key if key in self.services else None

    def service_by_dns(self, name: str, namespace: str) -> str | None:
        """The service a DNS name resolves to from a pod of `namespace` (its bare name only there)."""
        name = name.lower().rstrip(".")
        for key, svc in self.services.items():
            if name in svc.dns_names() or (svc.namespace == namespace and name == svc.name):
                return key
        return None

    def pod(self, ref: str) -> Pod:
        """A pod by 'namespace/name', or by bare name when that is unique."""
        key = self.pod_key(ref)
        if key is None:
            raise KeyError(ref)
        return self.pods[key]

    def pod_key(self, ref: str) -> str | None:
        if ref in self.pods:
            return ref
        matches = [k for k, p in self.pods.items() if p.name == ref]
        return matches[0] if len(matches) == 1 else None

    def source_key(self, ref: str) -> str | None:
        """What a probe's `from` names: a pod key, or a world host's name (world hosts and pods
        never share a name). None when it names neither."""
        if ref in self.world:
            return ref
        return self.pod_key(ref)

    def with_name(self, name: str) -> "Scenario":
        """The same scenario under another lab name (tests run labs side by side)."""
        return replace(self, name=name)

    @property
    def node_ip(self) -> str:
        """The node's own address: the first host address of the pod CIDR."""
        return node_addresses(ipaddress.ip_network(self.settings.pod_cidr))[0]

    def node_addresses(self) -> list[str]:
        """Addresses of the lab node (identity `host`): its own address and the pods' gateway."""
        return node_addresses(ipaddress.ip_network(self.settings.pod_cidr))

    def cluster_dns_pods(self) -> list[str]:
        """Keys of the pods that serve the cluster DNS (labelled k8s-app=kube-dns), in order."""
        key, value = CLUSTER_DNS_LABEL
        return [k for k, p in self.pods.items() if p.labels.get(key) == value]

    @property
    def nameserver(self) -> str | None:
        """The address every pod's resolv.conf names: the first cluster DNS pod's; None without one."""
        pods = self.cluster_dns_pods()
        return self.pods[pods[0]].ip if pods else None

    def search_path(self, namespace: str) -> list[str]:
        """A pod's DNS search path, as the kubelet writes it (ClusterFirst)."""
        return [f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]


def node_addresses(pod_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    """The lab node's addresses for a pod CIDR: the first host address, and the pods' gateway."""
    return [str(pod_cidr.network_address + 1), GATEWAY_IP]


def _address_key(text: str) -> str:
    """An address as one string whatever its spelling, for finding duplicates."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def world_address_problem(text: str, pod_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network,
                          node: list[str]) -> str | None:
    """Why `text` cannot be a world host's address, or None when it can.

    A world host may have any unicast IPv4 address that is not the cluster's own: it lives in a
    namespace of the lab behind the node's world link, and only the lab's namespaces route to
    it, so an address that also exists on the machine's own network (its address, its gateway,
    169.254.169.254, a 10.0.0.0/8 address) is never reached from the lab.
    """
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return f"expected an IPv4 address like 203.0.113.10, got {text!r}"
    if addr.version != 4 or str(addr) != text:
        return f"expected an IPv4 address written as four decimal numbers (like 203.0.113.10), got {text!r}"
    for net, why in NOT_A_WORLD_ADDRESS:
        if addr in net:
            return f"{text} is {why}, not the address of a host: expected a unicast IPv4 address"
    if text in node:
        return (f"{text} is an address of the lab node (its own address {node[0]} and the pods' gateway "
                f"{GATEWAY_IP}): a world host needs another unicast address")
    if addr in pod_cidr:
        return (f"{text} is inside the pod CIDR {pod_cidr} (settings.podCIDR): a world host is outside the "
                f"cluster; expected a unicast IPv4 address outside {pod_cidr}")
    return None


# --------------------------------------------------------------------------------------------
# Parsing


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    text = resources.files("dataplane").joinpath("schema/scenario.schema.json").read_text()
    return json.loads(text)


def _schema_message(err: jsonschema.ValidationError) -> str:
    v, inst = err.validator, err.instance
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(inst) - set(allowed), key=str) if isinstance(inst, dict) else []  # keys may be numbers
        return f"unknown field {', '.join(repr(e) for e in extra)}; allowed fields: {', '.join(allowed)}"
    if v == "type":
        return f"expected {err.validator_value}, got {describe_value(inst)}"
    if v == "enum":
        return f"expected one of {', '.join(map(str, err.validator_value))}, got {describe_value(inst)}"
    if v == "required":
        return err.message.replace("is a required property", "is required")
    if v == "pattern":
        desc = err.schema.get("description") or f"a value matching {err.validator_value}"
        return f"invalid value {inst!r}: expected {desc[0].lower() + desc[1:] if desc else desc}"
    if v in ("minimum", "maximum", "exclusiveMinimum"):
        return f"{inst!r} is out of range ({v} {err.validator_value})"
    if v == "oneOf" and isinstance(inst, dict):
        return "expected either {file: PATH} or a manifest with apiVersion and kind"
    if v == "propertyNames":
        return f"invalid label key: {err.message}"
    if v == "minItems":
        return "must not be empty"
    if v in ("maxItems", "maxProperties", "maxLength"):
        unit = "characters" if v == "maxLength" else "entries"
        return f"{len(inst)} {unit}, more than the limit of {err.validator_value}"
    return err.message


# The lists (and label mappings) of a scenario and their bounds, checked before the schema so
# that an oversized list is refused before anything walks it. "*" is every item of a list.
# The schema repeats each bound as maxItems/maxProperties (a unit test keeps them equal).
LIST_BOUNDS: tuple[tuple[tuple[str, ...], int, str], ...] = (
    (("namespaces",), limits.MAX_NAMESPACES, "namespaces"),
    (("namespaces", "*", "labels"), limits.MAX_LABELS, "labels"),
    (("pods",), limits.MAX_PODS, "pods"),
    (("pods", "*", "labels"), limits.MAX_LABELS, "labels"),
    (("pods", "*", "ports"), limits.MAX_DECLARED_PORTS, "ports"),
    (("world",), limits.MAX_WORLD_HOSTS, "world hosts"),
    (("world", "*", "dnsNames"), limits.MAX_DNS_NAMES, "DNS names"),
    (("world", "*", "aliases"), limits.MAX_DNS_NAMES, "DNS names"),
    (("world", "*", "ports"), limits.MAX_DECLARED_PORTS, "ports"),
    (("services",), limits.MAX_SERVICES, "services"),
    (("services", "*", "selector"), limits.MAX_LABELS, "labels"),
    (("services", "*", "labels"), limits.MAX_LABELS, "labels"),
    (("services", "*", "ports"), limits.MAX_DECLARED_PORTS, "ports"),
    (("policies",), limits.MAX_POLICIES, "policies"),
    (("steps",), limits.MAX_STEPS, "steps"),
    (("steps", "*", "apply"), limits.MAX_POLICIES, "policies"),
    (("steps", "*", "delete"), limits.MAX_DELETES, "deletions"),
    (("steps", "*", "relabel"), limits.MAX_RELABELS, "relabels"),
    (("steps", "*", "relabel", "*", "set"), limits.MAX_LABELS, "labels"),
    (("steps", "*", "relabel", "*", "remove"), limits.MAX_LABELS, "labels"),
    (("steps", "*", "audit"), limits.MAX_RELABELS, "audit changes"),
    (("steps", "*", "probes"), limits.MAX_PROBES, "probes"),
    (("steps", "*", "probes", "*", "http", "headers"), limits.MAX_HEADERS, "headers"),
)


def _matching(data: Any, pattern: tuple[str, ...], path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every value of `data` at `pattern` ("*": each item of a list)."""
    if not pattern:
        return [(path, data)]
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        items = list(enumerate(data)) if isinstance(data, list) else []
    else:
        items = [(head, data[head])] if isinstance(data, dict) and head in data else []
    return [found for key, value in items for found in _matching(value, rest, path + (key,))]


def _bound_errors(doc: Document) -> list[SourceError]:
    errors = []
    for pattern, bound, what in LIST_BOUNDS:
        for path, value in _matching(doc.data, pattern):
            if isinstance(value, (list, dict)) and len(value) > bound:
                errors.append(doc.error(path, f"{len(value)} {what}, more than the limit of {bound}"))
    return errors


def _schema_errors(doc: Document) -> list[SourceError]:
    validator = jsonschema.Draft202012Validator(schema())
    errors = []
    for err in sorted(validator.iter_errors(doc.data), key=lambda e: (doc.line(tuple(e.absolute_path)), list(map(str, e.absolute_path)))):
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})), key=str)  # YAML keys may be numbers
            if extra:
                path = path + (str(extra[0]),)
        errors.append(doc.error(path, _schema_message(err)))
    return errors


class _Builder:
    """Turns a schema-valid scenario document into typed objects, collecting semantic errors."""

    def __init__(self, doc: Document, path: Path, budget: Budget | None = None) -> None:
        self.doc = doc
        self.dir = path.parent
        self.errors: list[SourceError] = []
        # One budget of values for the scenario and every policy file it names; each file is
        # loaded once however often it is named, and the policies of all steps count together.
        self.budget = budget or Budget(what="a scenario and the policy files it names")
        self.files: dict[Path, list[Document]] = {}
        self.policy_count = 0

    def err(self, path: tuple, message: str) -> None:
        self.errors.append(self.doc.error(path, message))

    @staticmethod
    def ports(raw: list[dict[str, Any]]) -> tuple[Port, ...]:
        return tuple(Port(p["port"], p.get("protocol", "TCP"), p.get("name", ""), bool(p.get("tls", False)))
                     for p in raw)

    def check_ports(self, ports: tuple[Port, ...], base: tuple) -> None:
        seen: set[tuple[int, str]] = set()
        names: set[str] = set()
        for i, port in enumerate(ports):
            if (port.port, port.protocol) in seen:
                self.err(base + (i,), f"port {port.port}/{port.protocol} is declared twice")
            seen.add((port.port, port.protocol))
            if port.name and port.name in names:
                self.err(base + (i, "name"), f"port name {port.name!r} is used twice")
            names.add(port.name)

    def policy_file(self, target: Path, where: tuple) -> list[Document] | None:
        """The documents of a policy file, loaded once and within the scenario's bounds."""
        key = target.resolve()
        if key in self.files:
            return self.files[key]
        if len(self.files) >= limits.MAX_POLICY_FILES:
            self.err(where, f"more than {limits.MAX_POLICY_FILES} policy files, the limit for one scenario")
            return None
        try:
            docs = load_file(target, self.budget)
        except SourceError as exc:
            self.errors.append(SourceError(self.doc.location(where), f"cannot load policy file: {exc}"))
            return None
        self.files[key] = docs
        return docs

    def policy_list(self, raw: list[Any], base: tuple) -> tuple[PolicySource, ...]:
        out = []
        for i, item in enumerate(raw):
            if "file" in item:
                ref = Path(item["file"])
                docs = self.policy_file(ref if ref.is_absolute() else self.dir / ref, base + (i, "file"))
                if docs is None:
                    continue
                sources = [PolicySource(d) for d in docs]
            else:
                sources = [PolicySource(self.doc.sub(base + (i,)))]
            self.policy_count += len(sources)
            if self.policy_count > limits.MAX_POLICIES:
                self.err(base + (i,), f"more than {limits.MAX_POLICIES} policies in one scenario (its policies and "
                                      f"every step's apply together); the limit is {limits.MAX_POLICIES}")
                break
            out.extend(sources)
        return tuple(out)

    def build(self, file: Path) -> Scenario:
        data = self.doc.data
        raw_settings = data.get("settings", {})
        settings = Settings(
            pod_cidr=raw_settings.get("podCIDR", DEFAULT_POD_CIDR),
            probe_timeout=float(raw_settings.get("probeTimeout", 1.0)),
            policy_enforcement=raw_settings.get("policyEnforcement", "default"),
            audit=bool(raw_settings.get("audit", False)),
            cluster_name=raw_settings.get("clusterName", DEFAULT_CLUSTER_NAME),
            ip_block_selects_pods=bool(raw_settings.get("ipBlockSelectsPods", False)),
            service_cidr=raw_settings.get("serviceCIDR", DEFAULT_SERVICE_CIDR),
            dns_ttl=int(raw_settings.get("dnsTTL", DEFAULT_DNS_TTL)),
            fqdn_min_ttl=int(raw_settings.get("toFQDNsMinTTL", 0)),
            fqdn_max_ips_per_hostname=int(raw_settings.get("toFQDNsMaxIPsPerHostname", 50)),
        )
        try:
            cidr = ipaddress.ip_network(settings.pod_cidr)
            if cidr.version != 4 or cidr.prefixlen > 28 or not cidr.is_private:
                self.err(("settings", "podCIDR"), f"expected a private IPv4 prefix of /28 or larger, got {settings.pod_cidr!r}")
                cidr = ipaddress.ip_network(DEFAULT_POD_CIDR)
        except ValueError:
            self.err(("settings", "podCIDR"), f"expected an IPv4 prefix like {DEFAULT_POD_CIDR}, got {settings.pod_cidr!r}")
            cidr = ipaddress.ip_network(DEFAULT_POD_CIDR)

        namespaces: dict[str, Namespace] = {}
        for i, ns in enumerate(data.get("namespaces", [])):
            if ns["name"] in namespaces:
                self.err(("namespaces", i, "name"), f"namespace {ns['name']!r} is declared twice")
            given = ns.get("labels", {}).get(METADATA_NAME_LABEL)
            if given is not None and given != ns["name"]:
                self.err(("namespaces", i, "labels", METADATA_NAME_LABEL),
                         f"Kubernetes sets {METADATA_NAME_LABEL} to the namespace's own name ({ns['name']!r}) and "
                         f"keeps it so; got {given!r}")
            namespaces[ns["name"]] = Namespace(ns["name"], dict(ns.get("labels", {})), bool(ns.get("audit", False)))

        # Addresses: the first usable ones of the pod CIDR are kept for the node.
        reserved = {cidr.network_address + 1}
        explicit: dict[str, tuple] = {}
        for i, pod in enumerate(data.get("pods", [])):
            if "ip" in pod:
                try:
                    addr = ipaddress.ip_address(pod["ip"])
                except ValueError:
                    self.err(("pods", i, "ip"), f"expected an IPv4 address, got {pod['ip']!r}")
                    continue
                if addr not in cidr or addr in (cidr.network_address, cidr.broadcast_address) or addr in reserved:
                    self.err(("pods", i, "ip"), f"{addr} is not a usable pod address in {cidr} (the first host address belongs to the node)")
                elif str(addr) in explicit:
                    self.err(("pods", i, "ip"), f"{addr} is already used by pods[{explicit[str(addr)][0]}]")
                else:
                    explicit[str(addr)] = (i,)
        free = (str(a) for a in cidr.hosts() if a not in reserved and str(a) not in explicit)

        pods: dict[str, Pod] = {}
        for i, raw in enumerate(data.get("pods", [])):
            ns = raw.get("namespace", DEFAULT_NAMESPACE)
            if ns not in namespaces:
                if "namespaces" in data or ns != DEFAULT_NAMESPACE:
                    if ns != DEFAULT_NAMESPACE:
                        self.err(("pods", i, "namespace"), f"namespace {ns!r} is not declared under namespaces")
                namespaces.setdefault(ns, Namespace(ns, {}))
            ports = self.ports(raw.get("ports", []))
            self.check_ports(ports, ("pods", i, "ports"))
            for j, port in enumerate(ports):
                if port.tls:
                    self.err(("pods", i, "ports", j, "tls"), "only world hosts serve TLS in the lab; a pod port "
                                                             "cannot set tls")
            ip = raw.get("ip") if raw.get("ip") in explicit else next(free, None)
            if ip is None:
                self.err(("pods", i), f"no free address left in {cidr}")
                ip = "0.0.0.0"
            pod = Pod(raw["name"], ns, dict(raw.get("labels", {})), ip, ports, bool(raw.get("audit", False)))
            if pod.key in pods:
                self.err(("pods", i, "name"), f"pod {pod.key!r} is declared twice")
            pods[pod.key] = pod

        world: dict[str, WorldHost] = {}
        # A name is either an address name (A records, possibly of several hosts) or an alias
        # (one CNAME): DNS cannot give one name both.
        address_names: dict[str, str] = {}
        alias_owner: dict[str, str] = {}
        for i, raw in enumerate(data.get("world", [])):
            for j, dns in enumerate(raw.get("dnsNames", [])):
                address_names.setdefault(dns.lower().rstrip("."), raw["name"])
        for i, raw in enumerate(data.get("world", [])):
            problem = world_address_problem(raw["address"], cidr, node_addresses(cidr))
            if problem:
                self.err(("world", i, "address"), problem)
            if raw["name"] in world or any(p.name == raw["name"] for p in pods.values()):
                self.err(("world", i, "name"), f"name {raw['name']!r} is already used by another pod or world host")
            seen_names: set[str] = set()
            for j, dns in enumerate(raw.get("dnsNames", [])):
                if dns.lower() in seen_names:
                    self.err(("world", i, "dnsNames", j), f"DNS name {dns!r} is listed twice")
                seen_names.add(dns.lower())
            aliases = tuple(a.lower().rstrip(".") for a in raw.get("aliases", []))
            for j, alias in enumerate(aliases):
                if not raw.get("dnsNames"):
                    self.err(("world", i, "aliases", j), "an alias is a CNAME to the host's first DNS name: "
                                                         "declare dnsNames first")
                elif alias in address_names:
                    self.err(("world", i, "aliases", j), f"{alias!r} is a DNS name of {address_names[alias]!r} "
                                                         f"already; a name is either an address name or an alias")
                elif alias in alias_owner:
                    self.err(("world", i, "aliases", j), f"alias {alias!r} already belongs to {alias_owner[alias]!r}")
                alias_owner.setdefault(alias, raw["name"])
            ports = self.ports(raw.get("ports", []))
            self.check_ports(ports, ("world", i, "ports"))
            for j, port in enumerate(ports):
                if port.tls and port.protocol != "TCP":
                    self.err(("world", i, "ports", j, "tls"), f"TLS runs over TCP: port {port.port}/{port.protocol} "
                                                              f"cannot set tls")
                elif port.tls and not raw.get("dnsNames"):
                    self.err(("world", i, "ports", j, "tls"), "a TLS port's certificate names the host's DNS "
                                                              "names: declare dnsNames")
            world[raw["name"]] = WorldHost(raw["name"], raw["address"], tuple(raw.get("dnsNames", [])), ports,
                                           raw.get("entity", ""), aliases, raw.get("ttl"))
        first_with: dict[str, int] = {}
        for i, raw in enumerate(data.get("world", [])):
            key = _address_key(raw["address"])
            if key in first_with:
                self.err(("world", i, "address"), f"address {raw['address']} is already used by world[{first_with[key]}] "
                                                  f"({data['world'][first_with[key]]['name']}); each world host has its own")
            else:
                first_with[key] = i

        services = self.services(data, settings, cidr, namespaces, pods, world)
        policies = self.policy_list(data.get("policies", []), ("policies",))
        scenario = Scenario(name=data["name"], path=str(file), description=data.get("description", ""),
                            settings=settings, namespaces=namespaces, pods=pods, world=world,
                            policies=policies, steps=(), node=self.node(data.get("node", {})), services=services)
        steps = tuple(self.step(scenario, i, raw) for i, raw in enumerate(data.get("steps", [])))
        return replace(scenario, steps=steps)

    def node(self, raw: dict[str, Any]) -> Node:
        """The node: the kubelet's labels (hostname, os) under the declared ones; a declared
        kubernetes.io/hostname must name the node, as the kubelet keeps it so."""
        name = raw.get("name", DEFAULT_NODE_NAME)
        declared = dict(raw.get("labels", {}))
        given = declared.get(HOSTNAME_LABEL)
        if given is not None and given != name:
            self.err(("node", "labels", HOSTNAME_LABEL),
                     f"the kubelet sets {HOSTNAME_LABEL} to the node's name ({name!r}); got {given!r}")
        ports = self.ports(raw.get("ports", []))
        self.check_ports(ports, ("node", "ports"))
        for i, port in enumerate(ports):
            if port.port == PROXY_PORT:
                self.err(("node", "ports", i, "port"), f"port {PROXY_PORT} is the L7 proxy's listener in the node's "
                                                       "namespace; give the node's server another port")
        return Node(name, {HOSTNAME_LABEL: name, OS_LABEL: "linux", **declared}, ports)

    def service_cidr(self, settings: Settings, pod_cidr: ipaddress.IPv4Network,
                     world: dict[str, WorldHost]) -> ipaddress.IPv4Network | None:
        """settings.serviceCIDR, checked: a private IPv4 prefix clear of every other lab address."""
        where = ("settings", "serviceCIDR")
        try:
            net = ipaddress.ip_network(settings.service_cidr)
        except ValueError:
            self.err(where, f"expected an IPv4 prefix like {DEFAULT_SERVICE_CIDR}, got {settings.service_cidr!r}")
            return None
        if net.version != 4 or net.prefixlen > 30 or not net.is_private:
            self.err(where, f"expected a private IPv4 prefix of /30 or larger, got {settings.service_cidr!r}")
            return None
        if net.overlaps(pod_cidr):
            self.err(where, f"service range {net} overlaps the pod CIDR {pod_cidr}: ClusterIPs must be "
                            f"addresses no pod has")
            return None
        if ipaddress.ip_address(GATEWAY_IP) in net:
            self.err(where, f"service range {net} holds the node's gateway address {GATEWAY_IP}")
            return None
        for host in world.values():
            try:
                if ipaddress.ip_address(host.address) in net:
                    self.err(where, f"service range {net} holds world host {host.name!r} ({host.address})")
                    return None
            except ValueError:
                pass  # reported with the world host
        return net

    def services(self, data: dict[str, Any], settings: Settings, pod_cidr: ipaddress.IPv4Network,
                 namespaces: dict[str, Namespace], pods: dict[str, Pod],
                 world: dict[str, WorldHost]) -> dict[str, Service]:
        """The `services` section: names, ClusterIPs (fixed, or the next free one of the
        service range), selectors and ports checked."""
        raw_services = data.get("services", [])
        if not raw_services and "serviceCIDR" not in data.get("settings", {}):
            return {}
        net = self.service_cidr(settings, pod_cidr, world)
        if net is None:
            return {}
        fixed: dict[str, int] = {}
        for i, raw in enumerate(raw_services):
            if "clusterIP" not in raw:
                continue
            where = ("services", i, "clusterIP")
            try:
                addr = ipaddress.ip_address(raw["clusterIP"])
            except ValueError:
                self.err(where, f"expected an IPv4 address, got {raw['clusterIP']!r}")
                continue
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                self.err(where, f"{addr} is not a usable address of the service range {net} (settings.serviceCIDR)")
            elif str(addr) in fixed:
                self.err(where, f"{addr} is already the ClusterIP of services[{fixed[str(addr)]}]")
            else:
                fixed[str(addr)] = i
        free = (str(a) for a in net.hosts() if str(a) not in fixed)
        pod_names = {(p.namespace, p.name) for p in pods.values()}
        world_names = {n.lower() for h in world.values() for n in (h.name, *h.dns_names)}
        out: dict[str, Service] = {}
        for i, raw in enumerate(raw_services):
            base = ("services", i)
            ns = raw.get("namespace", DEFAULT_NAMESPACE)
            if ns not in namespaces:
                self.err(base + ("namespace",), f"namespace {ns!r} is not declared under namespaces and has no pods")
                continue
            if (ns, raw["name"]) in pod_names:
                self.err(base + ("name",), f"{ns}/{raw['name']} is a pod already: a service and a pod of one "
                                           f"namespace cannot share a name (they would share DNS names)")
            svc_names = [f"{raw['name']}.{ns}", f"{raw['name']}.{ns}.svc", f"{raw['name']}.{ns}.svc.{CLUSTER_DOMAIN}"]
            clash = next((n for n in svc_names if n in world_names), None)
            if clash:
                self.err(base + ("name",), f"DNS name {clash!r} of this service belongs to a world host already")
            ports: list[ServicePort] = []
            seen: set[tuple[int, str]] = set()
            names: set[str] = set()
            for j, rp in enumerate(raw["ports"]):
                sp = ServicePort(rp["port"], rp.get("protocol", "TCP"), rp.get("targetPort", 0), rp.get("name", ""))
                if (sp.port, sp.protocol) in seen:
                    self.err(base + ("ports", j), f"port {sp.port}/{sp.protocol} is declared twice")
                if len(raw["ports"]) > 1 and not sp.name:
                    self.err(base + ("ports", j, "name"), "a service with several ports must name each of them "
                                                          "(as Kubernetes requires)")
                elif sp.name and sp.name in names:
                    self.err(base + ("ports", j, "name"), f"port name {sp.name!r} is used twice")
                seen.add((sp.port, sp.protocol))
                names.add(sp.name)
                ports.append(sp)
            ip = raw.get("clusterIP") if raw.get("clusterIP") in fixed else next(free, None)
            if ip is None:
                self.err(base, f"no free address left in the service range {net}")
                continue
            svc = Service(raw["name"], ns, ip, dict(raw.get("selector", {})), tuple(ports),
                          raw.get("sessionAffinity", "None"), dict(raw.get("labels", {})))
            if svc.key in out:
                self.err(base + ("name",), f"service {svc.key!r} is declared twice")
            out[svc.key] = svc
        return out

    def step(self, scenario: Scenario, index: int, raw: dict[str, Any]) -> Step:
        base = ("steps", index)
        kinds = [k for k in ("apply", "delete", "relabel", "audit", "probes", "expire") if k in raw]
        if len(kinds) != 1:
            self.err(base, "a step has exactly one of apply, delete, relabel, audit, probes or expire"
                     + (f" (found {', '.join(kinds)})" if kinds else ""))
        name = raw.get("name", f"step {index + 1}")
        apply = self.policy_list(raw.get("apply", []), base + ("apply",))
        delete = tuple(PolicyRef(r["kind"], r["name"], r.get("namespace", "")) for r in raw.get("delete", []))
        for j, ref in enumerate(delete):
            if ref.kind == "CiliumClusterwideNetworkPolicy" and ref.namespace:
                self.err(base + ("delete", j, "namespace"), "a CiliumClusterwideNetworkPolicy has no namespace")
            if ref.kind != "CiliumClusterwideNetworkPolicy" and not ref.namespace:
                delete = delete[:j] + (replace(ref, namespace=DEFAULT_NAMESPACE),) + delete[j + 1:]
        relabels = []
        for j, r in enumerate(raw.get("relabel", [])):
            where = base + ("relabel", j)
            if ("pod" in r) == ("namespace" in r):
                self.err(where, "a relabel names exactly one of pod or namespace")
                continue
            if "pod" in r:
                key = scenario.pod_key(r["pod"])
                if key is None:
                    self.err(where + ("pod",), self._unknown_pod(scenario, r["pod"]))
                    continue
                relabels.append(Relabel("pod", key, dict(r.get("set", {})), tuple(r.get("remove", []))))
            else:
                if r["namespace"] not in scenario.namespaces:
                    self.err(where + ("namespace",), f"unknown namespace {r['namespace']!r}; declared: {', '.join(sorted(scenario.namespaces))}")
                    continue
                problem = protected_label_change(r["namespace"], r.get("set", {}), r.get("remove", []))
                if problem:
                    self.err(where, problem)
                    continue
                relabels.append(Relabel("namespace", r["namespace"], dict(r.get("set", {})), tuple(r.get("remove", []))))
        audits = []
        for j, a in enumerate(raw.get("audit", [])):
            change = self.audit_change(scenario, base + ("audit", j), a)
            if change is not None:
                audits.append(change)
        probes = []
        for j, p in enumerate(raw.get("probes", [])):
            probe = self.probe(scenario, base + ("probes", j), p)
            if probe is not None:
                probes.append(probe)
        expire = tuple(n.lower().rstrip(".") for n in raw.get("expire", []))
        if expire and scenario.nameserver is None:
            self.err(base + ("expire",), "names are learned from the cluster DNS's answers, and this lab has none: "
                                         "declare a pod labelled k8s-app: kube-dns")
        return Step(index, name, apply, delete, tuple(relabels), tuple(probes), tuple(audits), expire)

    def audit_change(self, scenario: Scenario, where: tuple, raw: dict[str, Any]) -> AuditChange | None:
        """One item of an `audit` step: {pod: P, enabled: B}, {namespace: N, enabled: B} or
        {enabled: B} (every endpoint). Not `on`: YAML 1.1 reads that key as the boolean true."""
        if "pod" in raw and "namespace" in raw:
            self.err(where, "an audit change names at most one of pod or namespace (neither: every endpoint)")
            return None
        if "pod" in raw:
            key = scenario.pod_key(raw["pod"])
            if key is None:
                self.err(where + ("pod",), self._unknown_pod(scenario, raw["pod"]))
                return None
            return AuditChange("pod", key, raw["enabled"])
        if "namespace" in raw:
            if raw["namespace"] not in scenario.namespaces:
                self.err(where + ("namespace",), f"unknown namespace {raw['namespace']!r}; declared: "
                                                 f"{', '.join(sorted(scenario.namespaces))}")
                return None
            return AuditChange("namespace", raw["namespace"], raw["enabled"])
        return AuditChange("all", "", raw["enabled"])

    @staticmethod
    def _unknown_pod(scenario: Scenario, ref: str) -> str:
        same = [k for k, p in scenario.pods.items() if p.name == ref]
        if len(same) > 1:
            return f"pod name {ref!r} is ambiguous: write one of {', '.join(sorted(same))}"
        return f"unknown pod {ref!r}; pods: {', '.join(sorted(scenario.pods))}"

    @classmethod
    def _unknown_source(cls, scenario: Scenario, ref: str) -> str:
        if any(p.name == ref for p in scenario.pods.values()):
            return cls._unknown_pod(scenario, ref)  # ambiguous
        world = f"; world hosts: {', '.join(sorted(scenario.world))}" if scenario.world else ""
        return (f"unknown pod {ref!r} (nor a world host, nor {NODE_TARGET!r}, the node); "
                f"pods: {', '.join(sorted(scenario.pods))}{world}")

    def probe(self, scenario: Scenario, where: tuple, raw: dict[str, Any]) -> Probe | None:
        source = scenario.source_key(raw["from"])
        if source is None and raw["from"] == NODE_TARGET:
            source = HOST_SOURCE  # the node's own stack (identity host), judged by host egress policy
        if source is None:
            self.err(where + ("from",), self._unknown_source(scenario, raw["from"]))
            return None
        protocol: Protocol = raw.get("protocol", "UDP" if "dns" in raw else "ICMP" if "icmp" in raw else "TCP")
        if raw.get("http") is not None and protocol != "TCP":
            self.err(where + ("http",), "an HTTP request needs protocol TCP")
        icmp = None
        if protocol == "ICMP" or "icmp" in raw:
            # A ping: `icmp: {type: echo}`, or `protocol: ICMP` alone (echo is the only message).
            icmp = IcmpMessage(raw.get("icmp", {}).get("type", "echo"))
            if protocol != "ICMP":
                self.err(where + ("protocol",), "an ICMP probe sends ICMP: protocol must be ICMP (or left out)")
            for other in ("http", "dns"):
                if other in raw:
                    self.err(where + (other,), f"a probe sends either an ICMP echo request or {'an HTTP request' if other == 'http' else 'a DNS query'}, not both")
        dns = None
        if "dns" in raw:
            dns = DnsQuery(raw["dns"]["name"].rstrip(".").lower(), raw["dns"].get("type", "A"))
            if protocol not in ("UDP", "TCP"):
                self.err(where + ("protocol",), "a DNS probe asks over UDP or TCP: protocol must be UDP (the "
                                                "default) or TCP")
            if raw.get("expect") == "denied":
                self.err(where + ("expect",), "'denied' is an HTTP answer (403); a DNS probe expects allowed, "
                                              "audited, dropped or refused")
            if "http" in raw:
                self.err(where + ("dns",), "a probe sends either an HTTP request or a DNS query, not both")
        target, _, port_text = raw["to"].rpartition(":") if ":" in raw["to"] else (raw["to"], "", "")
        port = 0
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                self.err(where + ("to",), f"expected a port number 1-65535 after ':', got {port_text!r}")
                return None
            port = int(port_text)
        dest: Destination | None = None
        ports: tuple[Port, ...] = ()
        pod_key = scenario.pod_key(target)
        from_pod = source in scenario.pods
        source_ns = scenario.pods[source].namespace if from_pod else DEFAULT_NAMESPACE
        svc_key = scenario.service_key(target, source_ns) if pod_key is None else None
        if svc_key is None and pod_key is None:
            svc_key = scenario.service_by_dns(target, source_ns)
        if svc_key is not None:
            if not from_pod:
                what = ("the node (the lab translates pods' connections only)" if source == HOST_SOURCE
                        else f"world host {source!r} outside the cluster")
                self.err(where + ("to",), f"{target!r} is a service: its ClusterIP is reachable from pods only, not "
                                          f"from {what}")
                return None
            if icmp is not None:
                self.err(where + ("to",), f"{target!r} is a service: a ClusterIP translates TCP and UDP "
                                          f"ports and answers no ping; ping a backend pod instead")
                return None
            return self.service_probe(scenario, where, raw, source, scenario.services[svc_key], target, port,
                                      protocol, dns)
        if "backend" in raw:
            self.err(where + ("backend",), "only a probe to a service names a backend")
        if pod_key is not None:
            pod = scenario.pods[pod_key]
            dest, ports = Destination("pod", pod_key, pod.ip, port), pod.ports
        elif target in scenario.world:
            host = scenario.world[target]
            dest, ports = Destination("world", host.name, host.address, port), host.ports
        elif target == NODE_TARGET:
            # The node's own address: host ingress policy (a CCNP nodeSelector) judges it.
            dest, ports = Destination("node", scenario.node.name, scenario.node_ip, port), scenario.node.ports
        else:
            for host in scenario.world.values():
                if target.lower().rstrip(".") in (d.lower() for d in (*host.dns_names, *host.aliases)):
                    dest, ports = Destination("world", host.name, host.address, port, dns_name=target), host.ports
                    break
        if dest is None:
            if "/" not in target and any(p.name == target for p in scenario.pods.values()):
                self.err(where + ("to",), self._unknown_pod(scenario, target))
            else:
                self.err(where + ("to",), f"unknown destination {target!r}: expected a pod, a world host, a world host's "
                                          f"DNS name, a service (by name, namespace/name or DNS name) or {NODE_TARGET!r}")
            return None
        if dest.dns_name and from_pod and scenario.nameserver is None:
            self.err(where + ("to",), f"{target!r} is a DNS name, which a pod resolves through the cluster DNS, and "
                                      f"this lab has none: declare a pod labelled k8s-app: kube-dns with port 53 "
                                      f"(or name the world host {dest.name!r} itself)")
            return None
        if raw["expect"] == "unresolved" and not (dest.dns_name and from_pod):
            self.err(where + ("expect",), "only a probe from a pod to a DNS name looks a name up, so only it can be "
                                          "unresolved")
            return None
        if source == HOST_SOURCE and dest.kind == "node":
            self.err(where + ("to",), "a probe from the node to its own address never leaves the node: no policy judges it")
            return None
        if source in scenario.world and dest.kind == "world":
            self.err(where + ("to",), f"a probe from world host {source!r} goes to a pod: traffic between hosts "
                                      f"outside the cluster never crosses it, so no policy judges it")
            return None
        if dns is not None and not any(p.port == 53 and p.protocol == protocol for p in ports):
            self.err(where + ("to",), f"{target!r} serves no DNS over {protocol}: a DNS probe needs a destination "
                                      f"declaring port 53/{protocol}")
            return None
        if dns is not None and port and port != 53:
            self.err(where + ("to",), f"the lab's DNS servers listen on port 53 only, got port {port}")
            return None
        if icmp is not None and port:
            self.err(where + ("to",), f"an ICMP echo request goes to an address, not a port: write {target!r} without ':{port}'")
            return None
        if not port and icmp is None:
            candidates = [p.port for p in ports if p.protocol == protocol]
            if dns is not None:
                candidates = [53]
            if not candidates:
                self.err(where + ("to",), f"{target!r} declares no {protocol} port; write {target}:PORT")
                return None
            port = candidates[0]
        http = self.http_request(where, raw)
        self.check_expect(where, raw, protocol, icmp)
        dest = replace(dest, port=port)
        if dest.kind == "world" and protocol == "TCP" and any(p.tls and p.port == port for p in ports):
            dest = replace(dest, tls_name=(dest.dns_name or scenario.world[dest.name].dns_names[0]).lower().rstrip("."))
        return Probe(source=source, destination=dest, protocol=protocol, expect=raw["expect"],
                     http=http, timeout=float(raw.get("timeout", scenario.settings.probe_timeout)),
                     location=self.doc.location(where), dns=dns, icmp=icmp)

    def http_request(self, where: tuple, raw: dict[str, Any]) -> HttpRequest | None:
        http = None
        if "http" in raw:
            h = raw["http"]
            http = HttpRequest(h.get("method", "GET"), h.get("path", "/"), dict(h.get("headers", {})), h.get("body", ""))
            if not http.path.startswith("/") and http.path != "*":
                self.err(where + ("http", "path"), f"expected a path starting with '/', got {http.path!r}")
        return http

    def check_expect(self, where: tuple, raw: dict[str, Any], protocol: str, icmp: IcmpMessage | None = None) -> None:
        expect = raw["expect"]
        if icmp is not None:
            if expect in ("denied", "refused"):
                self.err(where + ("expect",), f"an ICMP echo request is answered by the destination's kernel or not at "
                                              f"all: expect allowed, audited or dropped, not {expect!r}")
        elif expect == "denied" and protocol != "TCP":
            self.err(where + ("expect",), f"'denied' is an HTTP answer (403); a {protocol} probe expects allowed, "
                                          "audited, dropped or refused")

    def service_probe(self, scenario: Scenario, where: tuple, raw: dict[str, Any], source: str, svc: Service,
                      target: str, port: int, protocol: Protocol, dns: DnsQuery | None) -> Probe | None:
        """A probe to a service, by 'ns/name', bare name (the source's namespace) or DNS name."""
        if dns is not None:
            self.err(where + ("dns",), f"{target!r} is a service: a DNS probe asks a pod or world host serving "
                                       f"port 53 (the cluster DNS pod) directly")
            return None
        if not port:
            port = next((p.port for p in svc.ports if p.protocol == protocol), 0)
            if not port:
                self.err(where + ("to",), f"service {svc.key} has no {protocol} port; write {target}:PORT")
                return None
        elif svc.port(port, protocol) is None:
            have = ", ".join(f"{p.port}/{p.protocol}" for p in svc.ports)
            self.err(where + ("to",), f"service {svc.key} has no port {port}/{protocol} (ports: {have})")
            return None
        backend = ""
        if "backend" in raw:
            key = scenario.pod_key(raw["backend"]) or scenario.pod_key(f"{svc.namespace}/{raw['backend']}")
            if key is None or scenario.pods[key].namespace != svc.namespace:
                self.err(where + ("backend",), f"expected a pod of namespace {svc.namespace!r} (the service's), "
                                               f"got {raw['backend']!r}")
                return None
            backend = key
        dns_name = target if target not in (svc.key, svc.name) else ""
        if dns_name and scenario.nameserver is None:
            self.err(where + ("to",), f"{target!r} is a DNS name, which a pod resolves through the cluster DNS, and "
                                      f"this lab has none: declare a pod labelled k8s-app: kube-dns with port 53 "
                                      f"(or name the service as {svc.key!r})")
            return None
        if raw["expect"] == "unresolved" and not dns_name:
            self.err(where + ("expect",), "only a probe from a pod to a DNS name looks a name up, so only it can be "
                                          "unresolved")
            return None
        dest = Destination("service", svc.key, svc.cluster_ip, port, dns_name=dns_name, backend=backend)
        http = self.http_request(where, raw)
        self.check_expect(where, raw, protocol)
        return Probe(source=source, destination=dest, protocol=protocol, expect=raw["expect"], http=http,
                     timeout=float(raw.get("timeout", scenario.settings.probe_timeout)),
                     location=self.doc.location(where), dns=None)


METADATA_NAME_LABEL = "kubernetes.io/metadata.name"


def protected_label_change(namespace: str, set_labels: Any, remove: Any) -> str | None:
    """Why a relabel of `namespace` cannot be made, if it touches the label Kubernetes keeps
    equal to the namespace's name (set on every namespace since 1.21; NetworkPolicy's
    namespaceSelector relies on it), else None."""
    if METADATA_NAME_LABEL in remove:
        return f"{METADATA_NAME_LABEL} cannot be removed: Kubernetes keeps it on every namespace"
    given = set_labels.get(METADATA_NAME_LABEL)
    if given is not None and given != namespace:
        return (f"{METADATA_NAME_LABEL} cannot be changed: Kubernetes keeps it equal to the namespace's "
                f"name ({namespace!r}); got {given!r}")
    return None


def parse_scenario(doc: Document, file: Path, budget: Budget | None = None) -> Scenario:
    """Validate one scenario document; raises SourceError/ErrorList with every problem found.

    `budget`: what is left of the scenario's bound on values once its own file is loaded (the
    policy files it names share it).
    """
    if not isinstance(doc.data, dict):
        raise doc.error((), f"expected a mapping at the top of a scenario, got {describe_value(doc.data)}")
    ErrorList.raise_if_any(_bound_errors(doc))
    errors = _schema_errors(doc)
    if errors:
        raise ErrorList(errors) if len(errors) > 1 else errors[0]
    builder = _Builder(doc, file, budget)
    scenario = builder.build(file)
    ErrorList.raise_if_any(builder.errors)
    return scenario


def make_probe(scenario: Scenario, source: str, to: str, protocol: str = "TCP",
               http: HttpRequest | None = None, expect: str = "allowed", dns: DnsQuery | None = None,
               backend: str | None = None) -> Probe:
    """A probe built from command-line words, checked as a scenario's probes are."""
    raw: dict[str, Any] = {"from": source, "to": to, "protocol": protocol, "expect": expect}
    if backend:
        raw["backend"] = backend
    if http is not None:
        raw["http"] = {"method": http.method, "path": http.path, "headers": dict(http.headers), "body": http.body}
    if dns is not None:
        raw["dns"] = {"name": dns.name, "type": dns.type}
    doc = Document(raw, "<command line>", {})
    builder = _Builder(doc, Path(scenario.path))
    probe = builder.probe(scenario, (), raw)
    ErrorList.raise_if_any(builder.errors)
    assert probe is not None
    return probe


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file."""
    file = Path(path)
    budget = Budget(what="a scenario and the policy files it names")
    docs = load_file(file, budget)
    if len(docs) != 1:
        raise SourceError(SourceLocation(str(file)), f"expected exactly one YAML document, found {len(docs)}")
    return parse_scenario(docs[0], file, budget)


__all__ = [
    "AuditChange", "Destination", "EXPECTATIONS", "HttpRequest", "IcmpMessage", "Namespace", "Pod", "PolicyRef", "PolicySource",
    "Port", "Probe", "Relabel", "Scenario", "Settings", "Step", "WorldHost", "format_path",
    "load_scenario", "meets", "parse_scenario",
]
