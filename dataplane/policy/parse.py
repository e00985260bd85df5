"""Strict parsing and validation of policy manifests into the rule model of `api.py`.

Accepted: `networking.k8s.io/v1` NetworkPolicy, `cilium.io/v2` CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy; single objects, multi-document YAML, and `List` kinds
(`kind: List`, `NetworkPolicyList`, ... with `items`). Every problem of a document is collected
and raised together (`ErrorList`) so nothing is half-applied; each error names the file, the
line, the object (`CiliumNetworkPolicy shop/api`), the field path and what was expected.

Translation (how Cilium itself translates, pkg/k8s/apis/cilium.io/utils and pkg/k8s/network_policy.go):
- NetworkPolicy subject and `podSelector` peers are scoped to the policy's namespace;
  `namespaceSelector` keys become `io.cilium.k8s.namespace.labels.<key>`; a peer's
  namespaceSelector and podSelector are ANDed, peers are ORed; an omitted/empty `from`/`to`
  matches every peer, omitted/empty `ports` every port; policyTypes defaults to Ingress, plus
  Egress when `egress` has rules.
- CiliumNetworkPolicy endpoint selectors (subject and peers) are scoped to the policy's
  namespace unless a peer selector names `io.kubernetes.pod.namespace` (or a `reserved:` label);
  a CiliumClusterwideNetworkPolicy's are not scoped. Inside one Cilium rule the L3 fields are
  ORed. A rule with only `toPorts` applies to every peer; a rule with nothing (`{}`) selects no
  peer, yet the section still turns default-deny on (Cilium: "ingress: [{}]" denies all).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import limits
from ..errors import ErrorList, SourceError, SourceLocation
from ..yamlsource import Document, describe_value, load_file
from .api import (KIND_CCNP, KIND_CNP, KIND_K8S, AllPeer, CIDRPeer, EndpointPeer, Peer, Policy, PolicySpec, PortRule, PortSpec, Rule)
from .parse_cilium import CiliumRuleParser, quote_value
from .patterns import cilium_port, k8s_port, quote_hint, typographic_quote
from .selectors import (NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, OPERATORS, LabelSelector,
                        Requirement, key_source, strip_source)

API_VERSIONS = {KIND_K8S: "networking.k8s.io/v1", KIND_CNP: "cilium.io/v2", KIND_CCNP: "cilium.io/v2"}
LIST_KINDS = {"List": "v1", "NetworkPolicyList": "networking.k8s.io/v1",
              "CiliumNetworkPolicyList": "cilium.io/v2", "CiliumClusterwideNetworkPolicyList": "cilium.io/v2"}

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _label_value_error(value: str) -> str:
    """Why a label value is refused, with a hint when typographic quotes are the cause."""
    hint = f": {quote_hint(value, 'the label value')}" if typographic_quote(value) else ""
    return f"invalid label value {value!r}: expected at most 63 letters, digits, '-', '_', '.'{hint}"


# Why a field is refused, where more than "not supported" can be said.
_CILIUM_UNSUPPORTED_WHY = {
    "toGroups": "it is cloud-provider specific: Cilium's operator asks the provider's API (AWS "
                "security groups) for the addresses behind a group, and the lab has no cloud",
    "fromGroups": "it is cloud-provider specific: Cilium's operator asks the provider's API (AWS "
                  "security groups) for the addresses behind a group, and the lab has no cloud",
}

_CILIUM_UNSUPPORTED = {
    "fromGroups": "cloud groups",
    "toGroups": "cloud groups", "fromNodes": "node selectors", "toNodes": "node selectors",
    "authentication": "mutual authentication",
    "terminatingTLS": "TLS interception",
    "originatingTLS": "TLS origination", "serverNames": "SNI rules", "listener": "Envoy listeners",
    "kafka": "Kafka rules", "l7proto": "generic L7 parsers", "l7": "generic L7 parsers",
    "mismatch": "header mismatch actions", "secret": "header secrets", "cidrGroupRef": "CIDR groups",
    "cidrGroupSelector": "CIDR groups",
}


class _Ctx:
    """Error collection for one manifest: every message gets file, line, object and path."""

    def __init__(self, doc: Document, obj: str = "") -> None:
        self.doc = doc
        self.obj = obj
        self.errors: list[SourceError] = []

    def err(self, path: tuple, message: str) -> None:
        self.errors.append(self.doc.error(path, message, self.obj))

    def mapping(self, path: tuple, value: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict | None:
        """Check a mapping's type and fields; returns it (or None when not a mapping)."""
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping with fields {', '.join(allowed)}, got {describe_value(value)}")
            return None
        for key in value:
            if key in allowed:
                continue
            if key in _CILIUM_UNSUPPORTED:
                why = f": {_CILIUM_UNSUPPORTED_WHY[key]}" if key in _CILIUM_UNSUPPORTED_WHY else ""
                self.err(path + (key,), f"{_CILIUM_UNSUPPORTED[key]} ({key}) are not supported by l7lab{why}")
            else:
                self.err(path + (str(key),), f"unknown field {key!r}; allowed fields: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.err(path, f"{key} is required")
        return value

    def list_(self, path: tuple, value: Any, what: str = "a list", limit: int = 0, noun: str = "items") -> list:
        """A list field; one longer than `limit` is an error (and its items are not looked at)."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, f"expected {what}, got {describe_value(value)}")
            return []
        if limit and len(value) > limit:
            self.err(path, f"{len(value)} {noun}, more than the limit of {limit}")
            return []
        return value

    def string(self, path: tuple, value: Any, what: str = "a string") -> str | None:
        if not isinstance(value, str):
            self.err(path, f"expected {what}, got {describe_value(value)}")
            return None
        return value


# ---------------------------------------------------------------------------- documents


def parse_documents(docs: list[Document]) -> list[Policy]:
    """Parse every manifest of `docs`; raises SourceError/ErrorList listing every problem."""
    _check_policy_count(docs)
    policies: list[Policy] = []
    errors: list[SourceError] = []
    for doc in docs:
        got, errs = parse_document(doc)
        policies.extend(got)
        errors.extend(errs)
    ErrorList.raise_if_any(errors)
    seen: dict[tuple, Policy] = {}
    for p in policies:
        if p.key in seen:
            errors.append(SourceError(p.location, f"{p.display} is defined twice (first at {seen[p.key].location})"))
        seen[p.key] = p
    ErrorList.raise_if_any(errors)
    return policies


def _check_policy_count(docs: list[Document]) -> None:
    """At most MAX_POLICIES policies at once (a file, a change, a scenario), counted before parsing."""
    count = 0
    for doc in docs:
        data = doc.data
        items = data.get("items") if isinstance(data, dict) and _is_list_kind(data.get("kind")) else None
        count += len(items) if isinstance(items, list) else 1
        if count > limits.MAX_POLICIES:
            raise SourceError(SourceLocation(doc.source, doc.line(())),
                              f"more than {limits.MAX_POLICIES} policies at once (the limit for one file, one change "
                              "or one scenario)")


def _is_list_kind(kind: object) -> bool:
    """`kind` names a List; a kind that is not text (a list, a mapping) is no kind at all."""
    return isinstance(kind, str) and kind in LIST_KINDS


def parse_document(doc: Document) -> tuple[list[Policy], list[SourceError]]:
    """One YAML document: a policy object or a List of them. Returns (policies, errors)."""
    ctx = _Ctx(doc)
    data = doc.data
    if not isinstance(data, dict):
        # Only the type: a file that is no manifest at all (a scenario may point at any file) is never quoted.
        what = "a list" if isinstance(data, list) else "null" if data is None else "a plain value (text or a number)"
        ctx.err((), f"expected a policy manifest (a mapping with apiVersion and kind), got {what}")
        return [], ctx.errors
    kind = data.get("kind")
    if _is_list_kind(kind):
        ctx.mapping((), data, ("apiVersion", "kind", "metadata", "items"), ("items",))
        if data.get("apiVersion") not in (LIST_KINDS[kind], "v1"):
            ctx.err(("apiVersion",), f"expected apiVersion {LIST_KINDS[kind]} for kind {kind}, got {describe_value(data.get('apiVersion'))}")
        policies: list[Policy] = []
        errors = list(ctx.errors)
        for i, item in enumerate(ctx.list_(("items",), data.get("items"), "a list of policies", limits.MAX_POLICIES, "policies")):
            got, errs = parse_document(doc.sub(("items", i)))
            if kind != "List" and isinstance(item, dict) and item.get("kind") != kind[:-4]:
                errs.append(doc.error(("items", i, "kind"), f"expected kind {kind[:-4]} inside a {kind}, got {describe_value(item.get('kind'))}"))
            policies.extend(got)
            errors.extend(errs)
        errors.extend(e for e in ctx.errors if e not in errors)
        return policies, errors
    if not isinstance(kind, str) or kind not in API_VERSIONS:
        ctx.err(("kind",), f"expected kind NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or a List of them, got {describe_value(kind)}")
        return [], ctx.errors
    policy, errors = _PolicyParser(doc, kind).parse()
    return ([policy] if policy is not None else []), errors


def validate_policy_file(path: str | Path) -> list[SourceError]:
    """Every error in a policy file (empty list when the file is valid)."""
    try:
        docs = load_file(path)
    except SourceError as exc:
        return [exc]
    try:
        parse_documents(docs)
    except ErrorList as exc:
        return exc.errors
    except SourceError as exc:
        return [exc]
    return []


# ---------------------------------------------------------------------------- one policy


class _PolicyParser(CiliumRuleParser):
    def __init__(self, doc: Document, kind: str) -> None:
        self.doc = doc
        self.kind = kind
        self.ctx = _Ctx(doc, kind)
        self.namespace = ""
        self.cilium = kind != KIND_K8S

    def err(self, path: tuple, message: str) -> None:
        self.ctx.err(path, message)

    def parse(self) -> tuple[Policy | None, list[SourceError]]:
        data, ctx = self.doc.data, self.ctx
        top = ("apiVersion", "kind", "metadata", "spec") + (("specs", "status") if self.cilium else ("status",))
        ctx.mapping((), data, top, ("metadata",))
        if data.get("apiVersion") != API_VERSIONS[self.kind]:
            self.err(("apiVersion",), f"expected apiVersion {API_VERSIONS[self.kind]} for kind {self.kind}, got {describe_value(data.get('apiVersion'))}")
        name = self.metadata(data.get("metadata"))
        ctx.obj = f"{self.kind} {self.namespace}/{name}" if self.namespace else f"{self.kind} {name or '<unnamed>'}"
        # Errors found before the name was known get the object name too.
        for e in ctx.errors:
            e.obj = ctx.obj
            e.args = (str(e),)
        specs: list[PolicySpec] = []
        if self.cilium:
            if "spec" not in data and "specs" not in data:
                self.err((), "spec or specs is required")
            if "spec" in data:
                specs.append(self.cilium_spec(("spec",), data["spec"]))
            for i, raw in enumerate(ctx.list_(("specs",), data.get("specs"), "a list of rule specs", limits.MAX_SPECS, "specs")):
                specs.append(self.cilium_spec(("specs", i), raw))
            if "specs" in data and not data.get("specs"):
                self.err(("specs",), "must not be empty")
        else:
            if "spec" not in data:
                self.err((), "spec is required")
            else:
                specs.append(self.k8s_spec(("spec",), data["spec"]))
        specs = [s for s in specs if s is not None]
        if ctx.errors:
            return None, ctx.errors
        return Policy(self.kind, name or "", self.namespace, tuple(specs), self.doc.location(())), []

    def metadata(self, raw: Any) -> str | None:
        if raw is None:
            return None
        meta = self.ctx.mapping(("metadata",), raw, ("name", "namespace", "labels", "annotations", "uid",
                                                     "resourceVersion", "generation", "creationTimestamp"))
        if meta is None:
            return None
        name = meta.get("name")
        if name is None:
            self.err(("metadata",), "metadata.name is required")
        elif not isinstance(name, str) or not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
            self.err(("metadata", "name"), f"expected a DNS subdomain name (lower case letters, digits, '-', '.'), got {describe_value(name)}")
            name = None
        if self.kind == KIND_CCNP:
            if "namespace" in meta:
                self.err(("metadata", "namespace"), "a CiliumClusterwideNetworkPolicy is cluster-scoped: remove metadata.namespace")
        else:
            ns = meta.get("namespace", "default")
            if not isinstance(ns, str) or not _DNS1123_LABEL.match(ns):
                self.err(("metadata", "namespace"), f"expected a namespace name (DNS label), got {describe_value(ns)}")
            else:
                self.namespace = ns
        return name

    # ------------------------------------------------------------------ selectors

    def selector(self, path: tuple, raw: Any, cilium: bool, namespace_keys: bool = False) -> LabelSelector:
        """A label selector; `namespace_keys` maps k8s namespaceSelector keys onto namespace labels."""
        sel = self.ctx.mapping(path, raw, ("matchLabels", "matchExpressions"))
        if sel is None:
            return LabelSelector()
        labels: dict[str, str] = {}
        ml = sel.get("matchLabels")
        if ml is not None and not isinstance(ml, dict):
            self.err(path + ("matchLabels",), f"expected a mapping of label keys to values, got {describe_value(ml)}")
            ml = {}
        if ml and len(ml) > limits.MAX_LABELS:
            self.err(path + ("matchLabels",), f"{len(ml)} labels, more than the limit of {limits.MAX_LABELS}")
            ml = {}
        for key, value in (ml or {}).items():
            k = self.label_key(path + ("matchLabels", str(key)), key, cilium, namespace_keys)
            if not isinstance(value, str):
                hint = " (quote it in YAML)" if isinstance(value, (bool, int, float)) else ""
                self.err(path + ("matchLabels", str(key)), f"expected a string label value, got {describe_value(value)}{hint}")
            elif not _LABEL_VALUE.match(value):
                self.err(path + ("matchLabels", str(key)), _label_value_error(value))
            elif k is not None:
                labels[k] = value
        exprs: list[Requirement] = []
        for i, raw_e in enumerate(self.ctx.list_(path + ("matchExpressions",), sel.get("matchExpressions"), "a list of expressions",
                                                    limits.MAX_EXPRESSIONS, "expressions")):
            epath = path + ("matchExpressions", i)
            e = self.ctx.mapping(epath, raw_e, ("key", "operator", "values"), ("key", "operator"))
            if e is None or "key" not in e or "operator" not in e:
                continue
            k = self.label_key(epath + ("key",), e["key"], cilium, namespace_keys)
            op = e["operator"]
            if op not in OPERATORS:
                self.err(epath + ("operator",), f"unknown operator {quote_value(op)}; expected one of {', '.join(OPERATORS)}")
                continue
            values = e.get("values")
            if op in ("In", "NotIn"):
                if not isinstance(values, list) or not values:
                    self.err(epath + ("values",), f"operator {op} needs a non-empty list of values")
                    continue
                if len(values) > limits.MAX_EXPRESSION_VALUES:
                    self.err(epath + ("values",), f"{len(values)} values, more than the limit of {limits.MAX_EXPRESSION_VALUES}")
                    continue
                if not all(isinstance(v, str) for v in values):
                    self.err(epath + ("values",), "expected a list of strings (quote numbers and booleans)")
                    continue
                # Values are label values, checked as Kubernetes and Cilium check them
                # (ValidateLabelSelectorRequirement with AllowInvalidLabelValueInSelector off).
                bad = [j for j, v in enumerate(values) if not _LABEL_VALUE.match(v)]
                for j in bad:
                    self.err(epath + ("values", j), _label_value_error(values[j]))
                if bad:
                    continue
            elif values not in (None, []):
                self.err(epath + ("values",), f"operator {op} takes no values")
                continue
            if k is not None:
                exprs.append(Requirement(k, op, tuple(values or ())))
        return LabelSelector(tuple(sorted(labels.items())), tuple(exprs))

    def label_key(self, path: tuple, key: Any, cilium: bool, namespace_keys: bool) -> str | None:
        if not isinstance(key, str):
            self.err(path, f"expected a string label key, got {describe_value(key)}")
            return None
        source = key_source(key) if cilium else ""
        if source is None or (not cilium and ":" in key):
            self.err(path, f"invalid label key {key!r}: " + ("unknown label source; use k8s:, any: or reserved:" if cilium
                                                               else "expected [prefix/]name"))
            return None
        bare = strip_source(key)
        name_part = bare.split(":", 1)[1] if bare.startswith("reserved:") else bare
        prefix, _, name = name_part.rpartition("/")
        if not _LABEL_NAME.match(name) or (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))):
            self.err(path, f"invalid label key {key!r}: expected [prefix/]name with a name of at most 63 letters, digits, '-', '_', '.'")
            return None
        return NAMESPACE_LABELS_PREFIX + bare if namespace_keys else bare

    # ------------------------------------------------------------------ ports

    def port_value(self, path: tuple, raw: Any) -> tuple[int, str] | None:
        """(number, name) of a port given as int, numeric string or port name."""
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            self.err(path, f"expected a port number 1-65535 or a port name, got {describe_value(raw)}")
            return None
        if isinstance(raw, int) and self.cilium:
            # The CRD schema types port as a string: the API server refuses a YAML number.
            self.err(path, f"expected a string, got number {raw}: write \"{raw}\" (a Cilium policy's port is text, "
                           "and the API server refuses a number here)")
            return None
        if isinstance(raw, int):
            low = 0 if self.cilium else 1
            if not low <= raw <= 65535:
                self.err(path, f"port {raw} is out of range: expected {low}-65535")
                return None
            return raw, ""
        # Text is checked as the cluster checks it (patterns.py): Cilium reads a name or a
        # number, Kubernetes only a name.
        got = cilium_port(raw) if self.cilium else k8s_port(raw)
        if isinstance(got, str):
            self.err(path, got)
            return None
        return got

    def port_spec(self, path: tuple, raw: Any, default_protocol: str, protocols: tuple[str, ...]) -> PortSpec | None:
        p = self.ctx.mapping(path, raw, ("port", "protocol", "endPort"), () if not self.cilium else ("port",))
        if p is None:
            return None
        protocol = p.get("protocol", default_protocol)
        if protocol not in protocols:
            self.err(path + ("protocol",), f"expected protocol {', '.join(protocols)}, got {describe_value(protocol)}")
            return None
        number, name = 0, ""
        if "port" in p:
            got = self.port_value(path + ("port",), p["port"])
            if got is None:
                return None
            number, name = got
        end = 0
        if "endPort" in p:
            e = p["endPort"]
            if isinstance(e, bool) or not isinstance(e, int):
                self.err(path + ("endPort",), f"expected a port number, got {describe_value(e)}")
                return None
            if name:
                self.err(path + ("endPort",), f"endPort cannot be used with a named port ({name!r})")
                return None
            if "port" not in p or number == 0:
                self.err(path + ("endPort",), "endPort needs a numbered port")
                return None
            if not number <= e <= 65535:
                self.err(path + ("endPort",), f"endPort {e} must be between port ({number}) and 65535")
                return None
            end = e if e != number else 0
        return PortSpec(protocol, number, end, name)

    # ------------------------------------------------------------------ Kubernetes NetworkPolicy

    def k8s_spec(self, path: tuple, raw: Any) -> PolicySpec | None:
        spec = self.ctx.mapping(path, raw, ("podSelector", "policyTypes", "ingress", "egress"), ("podSelector",))
        if spec is None:
            return None
        subject = self.selector(path + ("podSelector",), spec.get("podSelector", {}), cilium=False)
        subject = subject.and_(LabelSelector(((NAMESPACE_LABEL, self.namespace),)))
        types = spec.get("policyTypes")
        if types is None:
            # Kubernetes defaulting (pkg/apis/networking/v1/defaults.go): Ingress always,
            # Egress when the policy has egress rules.
            types = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
        else:
            for i, t in enumerate(self.ctx.list_(path + ("policyTypes",), types, "a list of Ingress/Egress")):
                if t not in ("Ingress", "Egress"):
                    self.err(path + ("policyTypes", i), f"expected Ingress or Egress, got {describe_value(t)}")
                elif types.count(t) > 1 and types.index(t) != i:
                    self.err(path + ("policyTypes", i), f"{t} is listed twice")
            if not isinstance(types, list):
                types = []
        rules: list[Rule] = []
        for section, peers_key in (("ingress", "from"), ("egress", "to")):
            for i, raw_rule in enumerate(self.ctx.list_(path + (section,), spec.get(section), f"a list of {section} rules",
                                                                limits.MAX_RULES, "rules")):
                rpath = path + (section, i)
                r = self.ctx.mapping(rpath, raw_rule, (peers_key, "ports"))
                if r is None:
                    continue
                raw_peers = self.ctx.list_(rpath + (peers_key,), r.get(peers_key), "a list of peers", limits.MAX_PEERS, "peers")
                peers: list[Peer] = [p for j, rp in enumerate(raw_peers)
                                     if (p := self.k8s_peer(rpath + (peers_key, j), rp)) is not None]
                if not raw_peers:
                    peers = [AllPeer()]  # omitted or empty from/to: every peer
                ports = [p for j, rp in enumerate(self.ctx.list_(rpath + ("ports",), r.get("ports"), "a list of ports",
                                                                  limits.MAX_PORT_RULES, "ports"))
                         if (p := self.port_spec(rpath + ("ports", j), rp, "TCP", ("TCP", "UDP", "SCTP"))) is not None]
                port_rules = tuple(PortRule((p,)) for p in ports)
                if section.capitalize() in types:
                    rules.append(Rule(section, i, self._path(rpath), tuple(peers), port_rules, self.doc.location(rpath)))
        return PolicySpec(subject, tuple(rules), "Ingress" in types, "Egress" in types, self._path(path))

    def k8s_peer(self, path: tuple, raw: Any) -> Peer | None:
        p = self.ctx.mapping(path, raw, ("podSelector", "namespaceSelector", "ipBlock"))
        if p is None:
            return None
        if not p:
            self.err(path, "a peer needs podSelector, namespaceSelector or ipBlock")
            return None
        if "ipBlock" in p:
            if "podSelector" in p or "namespaceSelector" in p:
                self.err(path + ("ipBlock",), "ipBlock cannot be combined with podSelector or namespaceSelector in one peer")
                return None
            b = self.ctx.mapping(path + ("ipBlock",), p["ipBlock"], ("cidr", "except"), ("cidr",))
            if b is None or "cidr" not in b:
                return None
            peer = self.cidr_peer(path + ("ipBlock",), b["cidr"], b.get("except"), "cidr")
            return replace(peer, ip_block=True) if peer is not None else None
        selector = LabelSelector()
        if "namespaceSelector" in p:
            selector = self.selector(path + ("namespaceSelector",), p["namespaceSelector"], False, namespace_keys=True)
        else:
            selector = LabelSelector(((NAMESPACE_LABEL, self.namespace),))
        if "podSelector" in p:
            selector = selector.and_(self.selector(path + ("podSelector",), p["podSelector"], False))
        return EndpointPeer(selector)

    def cidr_peer(self, path: tuple, cidr: Any, excepts: Any, cidr_field: str | None) -> CIDRPeer | None:
        cpath = path + ((cidr_field,) if cidr_field else ())
        net = self.network(cpath, cidr)
        if net is None:
            return None
        out = []
        for i, e in enumerate(self.ctx.list_(path + ("except",), excepts, "a list of CIDRs", limits.MAX_EXCEPTS, "CIDRs")):
            sub = self.network(path + ("except", i), e)
            if sub is None:
                continue
            if sub.version != net.version or not sub.subnet_of(net) or sub == net:  # type: ignore[arg-type]
                self.err(path + ("except", i), f"except {sub} must be a strict subnet of {net}")
                continue
            out.append(str(sub))
        return CIDRPeer(str(net), tuple(out))

    def network(self, path: tuple, raw: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """An IPv4 or IPv6 prefix. An IPv6 one is accepted as Cilium accepts it and selects
        nothing in the IPv4-only lab (`identity.py`; `notices.py` tells the user)."""
        if not isinstance(raw, str):
            self.err(path, f"expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got {describe_value(raw)}")
            return None
        try:
            return ipaddress.ip_network(raw, strict=False)
        except ValueError:
            self.err(path, f"invalid CIDR {raw!r}: expected an IPv4 prefix like 10.0.0.0/8 or an IPv6 prefix "
                           "like 2001:db8::/32")
            return None

    # ------------------------------------------------------------------ Cilium

    @staticmethod
    def _path(path: tuple) -> str:
        from ..yamlsource import format_path
        return format_path(path)
