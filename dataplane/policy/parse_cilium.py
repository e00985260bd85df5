"""Parsing of Cilium rules (CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy specs): peers,
entities, CIDR sets, toFQDNs, toPorts with HTTP and DNS rules, icmps, deny sections.

A mixin of `parse._PolicyParser`, which provides the shared helpers (`err`, `selector`,
`port_spec`, `cidr_peer`, ...); kept apart so that each dialect reads on its own.
"""

from __future__ import annotations

from typing import Any

import re2

from l7.dns import DnsRule, validate_dns_pattern
from l7.http import HeaderMatch, HttpRule, is_http_token
from l7.regex import compile_regex

from .. import limits
from ..icmp import CILIUM_TYPE_NAMES, FAMILIES
from .api import (ENTITIES, KIND_CNP, AllPeer, EndpointPeer, EntityPeer, ServicePeer,
                  FQDNPeer, L7Rules, Peer, PolicySpec, PortRule, PortSpec, Rule)
from .patterns import match_name_error, match_pattern_error
from .selectors import (NAMESPACE_LABEL, LabelSelector)
from ..yamlsource import describe_value

# A Kubernetes object name that is a DNS label (RFC 1123): services and namespaces.
DNS_LABEL = re2.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


# A first compile with little memory: RE2 stops as soon as the program outgrows it, so an
# oversized regex costs microseconds instead of the milliseconds a full compile would take.
_SIZE_CHECK = re2.Options()
_SIZE_CHECK.log_errors = False
_SIZE_CHECK.max_mem = 32 * 1024  # room for about 1,300 instructions, above MAX_REGEX_PROGRAM_SIZE


def regex_size_error(pattern: str) -> str | None:
    """Why a regex is too large for a rule (its text or its compiled RE2 program), or None."""
    if len(pattern) > limits.MAX_REGEX_CHARS:
        return (f"a regex of {len(pattern)} characters is longer than the limit of "
                f"{limits.MAX_REGEX_CHARS} characters")
    try:
        size = re2.compile(pattern, options=_SIZE_CHECK).programsize
    except re2.error as exc:
        if b"too large" not in (exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""):
            return None  # a syntax error: compile_regex explains it
        size = limits.MAX_REGEX_PROGRAM_SIZE + 1
    if size > limits.MAX_REGEX_PROGRAM_SIZE:
        return (f"regex {pattern[:80]!r} is too large: its RE2 program exceeds the limit of "
                f"{limits.MAX_REGEX_PROGRAM_SIZE} instructions")
    return None


def quote_value(value: Any) -> str:
    """A user's value in a message: strings quoted, anything else described."""
    return repr(value) if isinstance(value, str) else describe_value(value)


class CiliumRuleParser:
    """The Cilium half of the policy parser (see `parse._PolicyParser`)."""

    def cilium_spec(self, path: tuple, raw: Any) -> PolicySpec | None:
        fields = ("endpointSelector", "nodeSelector", "ingress", "egress", "ingressDeny", "egressDeny",
                  "description", "labels", "enableDefaultDeny")
        spec = self.ctx.mapping(path, raw, fields)
        if spec is None:
            return None
        # Cilium: rule_validation.go (*Rule).Sanitize wants exactly one of the two selectors;
        # cnp_types.go (*CiliumNetworkPolicy).Parse refuses nodeSelector in a namespaced policy.
        host = "nodeSelector" in spec
        if "endpointSelector" not in spec and not host:
            self.err(path, "rule must have one of endpointSelector or nodeSelector")
        if "endpointSelector" in spec and host:
            self.err(path + ("nodeSelector",), "rule cannot have both endpointSelector and nodeSelector")
        elif host and self.kind == KIND_CNP:
            self.err(path + ("nodeSelector",), "rule cannot have nodeSelector in a CiliumNetworkPolicy: host policies "
                                               "are cluster-wide, write a CiliumClusterwideNetworkPolicy")
        which = "nodeSelector" if host else "endpointSelector"
        subject = self.selector(path + (which,), spec.get(which, {}), cilium=True)
        if subject.names_reserved():
            self.err(path + (which,), "selecting reserved identities is not supported by l7lab"
                                      + ("" if host else "; select the node with nodeSelector (a host policy)"))
        if host:
            self._check_host_l7(path, spec)
        if self.kind == KIND_CNP and not host:
            # A CNP only ever selects endpoints of its own namespace.
            subject = subject.and_(LabelSelector(((NAMESPACE_LABEL, self.namespace),)))
        if "description" in spec:
            self.ctx.string(path + ("description",), spec["description"])
        dd = {"ingress": True, "egress": True}
        if "enableDefaultDeny" in spec:
            raw_dd = self.ctx.mapping(path + ("enableDefaultDeny",), spec["enableDefaultDeny"], ("ingress", "egress"))
            for k, v in (raw_dd or {}).items():
                if k in dd:
                    if not isinstance(v, bool):
                        self.err(path + ("enableDefaultDeny", k), f"expected true or false, got {describe_value(v)}")
                    else:
                        dd[k] = v
        rules: list[Rule] = []
        for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
            for i, raw_rule in enumerate(self.ctx.list_(path + (section,), spec.get(section), f"a list of {section} rules",
                                                                limits.MAX_RULES, "rules")):
                rule = self.cilium_rule(path + (section, i), section, i, raw_rule)
                if rule is not None:
                    rules.append(rule)
        # Cilium (pkg/policy/repository.go): a rule with a non-empty ingress or ingressDeny
        # section puts the endpoints it selects into default deny at ingress, unless
        # enableDefaultDeny.ingress is false; the same for egress.
        enforces_in = bool(spec.get("ingress") or spec.get("ingressDeny")) and dd["ingress"]
        enforces_eg = bool(spec.get("egress") or spec.get("egressDeny")) and dd["egress"]
        return PolicySpec(subject, tuple(rules), enforces_in, enforces_eg, self._path(path), host=host)

    def _check_host_l7(self, path: tuple, spec: dict) -> None:
        """Cilium's rule_validation.go for host policies: no L7 rule at host ingress, and only
        DNS rules at host egress (HTTP: "not supported on host egress yet")."""
        for section in ("ingress", "egress"):
            raw_rules = spec.get(section)
            if not isinstance(raw_rules, list):
                continue
            for i, r in enumerate(raw_rules):
                port_rules = r.get("toPorts") if isinstance(r, dict) else None
                for j, pr in enumerate(port_rules if isinstance(port_rules, list) else []):
                    l7 = pr.get("rules") if isinstance(pr, dict) else None
                    if not isinstance(l7, dict) or not l7:
                        continue
                    where = path + (section, i, "toPorts", j, "rules")
                    if section == "ingress":
                        self.err(where, "L7 policy is not supported on host ingress (Cilium refuses L7 rules in a "
                                        "host policy's ingress)")
                    elif "http" in l7:
                        self.err(where + ("http",), "L7 protocol HTTP is not supported on host egress (Cilium "
                                                    "allows only DNS rules in a host policy's egress)")

    def cilium_rule(self, path: tuple, section: str, index: int, raw: Any) -> Rule | None:
        ingress = section.startswith("ingress")
        deny = section.endswith("Deny")
        d = "from" if ingress else "to"
        l3 = [f"{d}Endpoints", f"{d}Entities", f"{d}CIDR", f"{d}CIDRSet"]
        if not ingress and not deny:
            l3.append("toFQDNs")
        if not ingress:
            l3.append("toServices")
        r = self.ctx.mapping(path, raw, tuple(l3) + (f"{d}Requires", "toPorts", "icmps"))
        if r is None:
            return None
        # Requirements are not L3 peers: never scoped to the policy's namespace (Cilium's
        # k8s conversion leaves them as written), and they select no peer themselves.
        requires = tuple(self.selector(path + (f"{d}Requires", j), sel, cilium=True)
                         for j, sel in enumerate(self.ctx.list_(path + (f"{d}Requires",), r.get(f"{d}Requires"),
                                                                "a list of endpoint selectors", limits.MAX_PEERS,
                                                                "selectors")))
        peers: list[Peer] = []
        for j, sel in enumerate(self.ctx.list_(path + (f"{d}Endpoints",), r.get(f"{d}Endpoints"), "a list of endpoint selectors",
                                             limits.MAX_PEERS, "selectors")):
            s = self.selector(path + (f"{d}Endpoints", j), sel, cilium=True)
            if self.kind == KIND_CNP and not s.names_namespace() and not s.names_reserved():
                s = s.and_(LabelSelector(((NAMESPACE_LABEL, self.namespace),)))
            peers.append(EndpointPeer(s))
        for j, ent in enumerate(self.ctx.list_(path + (f"{d}Entities",), r.get(f"{d}Entities"), "a list of entities",
                                             limits.MAX_PEERS, "entities")):
            if ent not in ENTITIES:
                self.err(path + (f"{d}Entities", j), f"unknown entity {quote_value(ent)}; expected one of {', '.join(ENTITIES)}")
            else:
                peers.append(EntityPeer(ent))
        for j, c in enumerate(self.ctx.list_(path + (f"{d}CIDR",), r.get(f"{d}CIDR"), "a list of CIDRs",
                                             limits.MAX_PEERS, "CIDRs")):
            p = self.cidr_peer(path + (f"{d}CIDR", j), c, None, None)
            if p:
                peers.append(p)
        for j, cs in enumerate(self.ctx.list_(path + (f"{d}CIDRSet",), r.get(f"{d}CIDRSet"), "a list of CIDR sets",
                                             limits.MAX_PEERS, "CIDR sets")):
            m = self.ctx.mapping(path + (f"{d}CIDRSet", j), cs, ("cidr", "except"), ("cidr",))
            if m is not None and "cidr" in m:
                p = self.cidr_peer(path + (f"{d}CIDRSet", j), m["cidr"], m.get("except"), "cidr")
                if p:
                    peers.append(p)
        if "toServices" in l3:
            services = self.ctx.list_(path + ("toServices",), r.get("toServices"), "a list of services",
                                      limits.MAX_PEERS, "services")
            if services and r.get("toPorts"):
                # Cilium rejects the combination (Documentation/security/policy/language.rst,
                # "Services based", Limitations).
                self.err(path + ("toServices",), "toServices cannot be combined with toPorts in one rule (Cilium "
                                                 "rejects such a policy): write the ports as a rule of their own")
            for j, svc in enumerate(services):
                peer = self.service_peer(path + ("toServices", j), svc)
                if peer is not None:
                    peers.append(peer)
        fqdns = self.ctx.list_(path + ("toFQDNs",), r.get("toFQDNs"), "a list of FQDN selectors",
                               limits.MAX_PEERS, "FQDN selectors") if "toFQDNs" in l3 else []
        if fqdns and peers:
            self.err(path + ("toFQDNs",), "toFQDNs cannot be combined with other L3 selectors (toEndpoints, toEntities, toCIDR, toCIDRSet) in one rule")
        for j, f in enumerate(fqdns):
            fp = path + ("toFQDNs", j)
            m = self.ctx.mapping(fp, f, ("matchName", "matchPattern"))
            if m is None:
                continue
            if len(m) != 1:
                self.err(fp, "expected exactly one of matchName or matchPattern")
                continue
            peer = self.fqdn(fp, m)
            if peer:
                peers.append(FQDNPeer(peer.match_name, peer.match_pattern))
        any_l3 = any(k in r and r[k] for k in l3)
        port_rules = [pr for j, raw_pr in enumerate(self.ctx.list_(path + ("toPorts",), r.get("toPorts"), "a list of port rules",
                                                                                  limits.MAX_PORT_RULES, "port rules"))
                      if (pr := self.cilium_port_rule(path + ("toPorts", j), raw_pr, deny)) is not None]
        icmps = self.ctx.list_(path + ("icmps",), r.get("icmps"), "a list of ICMP rules ({fields: [{type, family}]})",
                               limits.MAX_PORT_RULES, "ICMP rules")
        if icmps and r.get("toPorts"):
            self.err(path + ("icmps",), "icmps and toPorts cannot be used together in one rule (Cilium: the ICMPs block "
                                        "may only be present without toPorts); write a separate rule for the ports")
        port_rules.extend(pr for j, raw_icmp in enumerate(icmps)
                          if (pr := self.icmp_rule(path + ("icmps", j), raw_icmp)) is not None)
        if not any_l3:
            # Only toPorts or icmps: they apply to every peer. Nothing at all ({}): no peer.
            peers = [AllPeer()] if r.get("toPorts") or icmps else []
        return Rule(section, index, self._path(path), tuple(peers), tuple(port_rules), self.doc.location(path),
                    requires)

    def icmp_rule(self, path: tuple, raw: Any) -> PortRule | None:
        """One `icmps` entry: {fields: [{type, family}]}. Each field becomes a port spec of
        protocol ICMP (or ICMPv6) whose port is the type, as Cilium keys it
        (pkg/policy/api/icmp.go, ICMPField.PortProtocol). No fields: the rule allows nothing."""
        m = self.ctx.mapping(path, raw, ("fields",))
        if m is None:
            return None
        specs: list[PortSpec] = []
        for j, f in enumerate(self.ctx.list_(path + ("fields",), m.get("fields"), "a list of ICMP fields ({type, family})",
                                             limits.MAX_ICMP_FIELDS, "ICMP fields")):
            spec = self.icmp_field(path + ("fields", j), f)
            if spec is not None:
                specs.append(spec)
        return PortRule(tuple(specs))

    def icmp_field(self, path: tuple, raw: Any) -> PortSpec | None:
        f = self.ctx.mapping(path, raw, ("type", "family"), ("type",))
        if f is None or "type" not in f:
            return None
        family = f.get("family", "IPv4")
        if family not in FAMILIES:
            self.err(path + ("family",), f"expected family IPv4 or IPv6, got {quote_value(family)}")
            return None
        value = f["type"]
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # an IntOrString: "8" is the number 8
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.err(path + ("type",), f"expected an ICMP type 0-255 or a type name like EchoRequest, got {describe_value(value)}")
            return None
        if isinstance(value, int):
            if not 0 <= value <= 255:
                self.err(path + ("type",), f"ICMP type {value} is out of range: expected 0-255")
                return None
            number = value
        else:
            names = CILIUM_TYPE_NAMES[family]
            if value not in names:
                other = "IPv6" if family == "IPv4" else "IPv4"
                hint = (f"; {value} is an {other} type: set family: {other}" if value in CILIUM_TYPE_NAMES[other]
                        else f"; {family} names: {', '.join(names)}")
                self.err(path + ("type",), f"ICMP type {value!r} not found in {family}{hint}")
                return None
            number = names[value]
        return PortSpec("ICMPv6" if family == "IPv6" else "ICMP", number)

    def service_peer(self, path: tuple, raw: Any) -> ServicePeer | None:
        """One toServices item: {k8sService: {serviceName, namespace}} or {k8sServiceSelector:
        {selector, namespace}}; the namespace defaults to the policy's own ('default' for a CCNP)."""
        m = self.ctx.mapping(path, raw, ("k8sService", "k8sServiceSelector"))
        if m is None:
            return None
        if len(m) != 1:
            self.err(path, "expected exactly one of k8sService or k8sServiceSelector")
            return None
        key, value = next(iter(m.items()))
        if key == "k8sService":
            s = self.ctx.mapping(path + (key,), value, ("serviceName", "namespace"), ("serviceName",))
            if s is None or "serviceName" not in s:
                return None
            name = s["serviceName"]
            if not isinstance(name, str) or not DNS_LABEL.fullmatch(name):
                self.err(path + (key, "serviceName"), f"expected a service name (a DNS label), got {describe_value(name)}")
                return None
            namespace = self.service_namespace(path + (key,), s)
            return ServicePeer(namespace, name=name) if namespace is not None else None
        s = self.ctx.mapping(path + (key,), value, ("selector", "namespace"), ("selector",))
        if s is None or "selector" not in s:
            return None
        selector = self.selector(path + (key, "selector"), s["selector"], cilium=True)
        namespace = self.service_namespace(path + (key,), s)
        return ServicePeer(namespace, selector=selector) if namespace is not None else None

    def service_namespace(self, path: tuple, s: dict) -> str | None:
        namespace = s.get("namespace", self.namespace or "default")
        if not isinstance(namespace, str) or not DNS_LABEL.fullmatch(namespace):
            self.err(path + ("namespace",), f"expected a namespace name (a DNS label), got {describe_value(namespace)}")
            return None
        return namespace

    def fqdn(self, path: tuple, m: dict) -> DnsRule | None:
        key, value = next(iter(m.items()))
        if not isinstance(value, str):
            self.err(path + (key,), f"expected a DNS name, got {describe_value(value)}")
            return None
        if len(value) > limits.MAX_DNS_NAME_CHARS:
            self.err(path + (key,), f"a DNS {'name' if key == 'matchName' else 'pattern'} of {len(value)} characters is "
                                    f"longer than the limit of {limits.MAX_DNS_NAME_CHARS} characters")
            return None
        # The CRD's patterns first (patterns.py), with their hints; then matchpattern.Validate
        # (l7/dns.py). Both accept every use of '*', `**.example.com` included, as Cilium does.
        problem = match_name_error(value) if key == "matchName" else match_pattern_error(value)
        if problem:
            self.err(path + (key,), problem)
            return None
        try:
            if key == "matchName":
                return DnsRule(match_name=value.lower().rstrip("."))
            validate_dns_pattern(value)
            return DnsRule(match_pattern=value.lower().rstrip("."))
        except ValueError as exc:
            self.err(path + (key,), str(exc))
            return None

    def cilium_port_rule(self, path: tuple, raw: Any, deny: bool) -> PortRule | None:
        pr = self.ctx.mapping(path, raw, ("ports", "rules"), ("ports",))
        if pr is None:
            return None
        ports = [p for j, rp in enumerate(self.ctx.list_(path + ("ports",), pr.get("ports"), "a list of ports",
                                                                 limits.MAX_PORTS_PER_PORT_RULE, "ports"))
                 if (p := self.port_spec(path + ("ports", j), rp, "ANY", ("TCP", "UDP", "SCTP", "ANY"))) is not None]
        if "ports" in pr and not pr.get("ports"):
            self.err(path + ("ports",), "must not be empty")
        if "rules" not in pr:
            return PortRule(tuple(ports))
        if deny:
            self.err(path + ("rules",), "L7 rules are not allowed in a deny rule (ingressDeny/egressDeny take ports only)")
            return None
        rules = self.ctx.mapping(path + ("rules",), pr["rules"], ("http", "dns"))
        if rules is None:
            return None
        if "http" in rules and "dns" in rules:
            self.err(path + ("rules",), "a port rule has either http or dns rules, not both")
            return None
        for j, p in enumerate(ports):
            ppath = path + ("ports", j)
            if p.port == 0 and not p.name:
                self.err(ppath + ("port",), "L7 rules need a specific port (got port 0, all ports)")
            if p.end_port and "dns" in rules:
                # Cilium (1.17 and later) takes port ranges with HTTP rules, never with DNS rules.
                self.err(ppath + ("endPort",), "DNS rules cannot be used with a port range (endPort); "
                                               "Cilium takes a port range with HTTP rules only")
            if "http" in rules and p.protocol != "TCP":
                self.err(ppath + ("protocol",), f"HTTP rules apply to TCP only: set protocol: TCP (got {p.protocol})")
            if "dns" in rules and p.protocol == "SCTP":
                self.err(ppath + ("protocol",), "DNS rules apply to UDP or TCP, not SCTP")
        http: list[HttpRule] = []
        for j, h in enumerate(self.ctx.list_(path + ("rules", "http"), rules.get("http"), "a list of HTTP rules",
                                                  limits.MAX_L7_RULES, "HTTP rules")):
            rule = self.http_rule(path + ("rules", "http", j), h)
            if rule is not None:
                http.append(rule)
        dns: list[DnsRule] = []
        for j, dr in enumerate(self.ctx.list_(path + ("rules", "dns"), rules.get("dns"), "a list of DNS rules",
                                                   limits.MAX_L7_RULES, "DNS rules")):
            dp = path + ("rules", "dns", j)
            m = self.ctx.mapping(dp, dr, ("matchName", "matchPattern"))
            if m is None:
                continue
            if len(m) != 1:
                self.err(dp, "expected exactly one of matchName or matchPattern")
                continue
            got = self.fqdn(dp, m)
            if got:
                dns.append(got)
        if "http" in rules and not rules.get("http") or "dns" in rules and not rules.get("dns"):
            self.err(path + ("rules",), "an empty rules list: remove it, or add at least one rule")
        return PortRule(tuple(ports), L7Rules(tuple(http), tuple(dns)))

    def http_rule(self, path: tuple, raw: Any) -> HttpRule | None:
        h = self.ctx.mapping(path, raw, ("method", "path", "host", "headers", "headerMatches"))
        if h is None:
            return None
        values: dict[str, str] = {}
        ok = True
        for key in ("method", "path", "host"):
            if key not in h:
                continue
            v = self.ctx.string(path + (key,), h[key], "an RE2 regular expression string")
            if v is None:
                ok = False
                continue
            too_large = regex_size_error(v)
            if too_large:
                self.err(path + (key,), too_large)
                ok = False
                continue
            try:
                compile_regex(v)
                values[key] = v
            except ValueError as exc:
                self.err(path + (key,), str(exc))
                ok = False
        headers: list[HeaderMatch] = []
        for j, text in enumerate(self.ctx.list_(path + ("headers",), h.get("headers"), "a list of 'Name' or 'Name: value' strings",
                                                    limits.MAX_HEADERS, "headers")):
            s = self.ctx.string(path + ("headers", j), text, "a 'Name' or 'Name: value' string")
            if s is None:
                ok = False
                continue
            name, sep, value = s.partition(":")
            name = name.strip()
            problem = _header_size_error(name, value)
            if problem:
                self.err(path + ("headers", j), problem)
                ok = False
                continue
            if not is_http_token(name):
                self.err(path + ("headers", j), f"invalid header {s!r}: expected 'Name' or 'Name: value' with a valid header name")
                ok = False
                continue
            headers.append(HeaderMatch(name, value.strip() if sep else None))
        for j, hm in enumerate(self.ctx.list_(path + ("headerMatches",), h.get("headerMatches"), "a list of {name, value}",
                                                  limits.MAX_HEADERS, "header matches")):
            hp = path + ("headerMatches", j)
            m = self.ctx.mapping(hp, hm, ("name", "value"), ("name",))
            if m is None or "name" not in m:
                ok = False
                continue
            name = self.ctx.string(hp + ("name",), m["name"], "a header name")
            value = self.ctx.string(hp + ("value",), m["value"], "a header value") if "value" in m else None
            if name is None or ("value" in m and value is None):
                ok = False
                continue
            problem = _header_size_error(name, value or "")
            if problem:
                self.err(hp + ("value" if len(name) <= limits.MAX_HEADER_NAME_CHARS else "name",), problem)
                ok = False
                continue
            if not is_http_token(name):
                self.err(hp + ("name",), f"invalid header name {name!r}")
                ok = False
                continue
            headers.append(HeaderMatch(name, value))
        if not ok:
            return None
        return HttpRule(values.get("method", ""), values.get("path", ""), values.get("host", ""), tuple(headers))


def _header_size_error(name: str, value: str) -> str | None:
    if len(name) > limits.MAX_HEADER_NAME_CHARS:
        return f"a header name of {len(name)} characters is longer than the limit of {limits.MAX_HEADER_NAME_CHARS} characters"
    if len(value) > limits.MAX_HEADER_VALUE_CHARS:
        return f"a header value of {len(value)} characters is longer than the limit of {limits.MAX_HEADER_VALUE_CHARS} characters"
    return None
