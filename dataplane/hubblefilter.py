"""Hubble's flow filters, built from `hubble observe`'s flags, matched against Hubble flow dicts.

A Hubble flow dict is one flow as `hubble observe -o json` prints it (`dataplane/hubble.py` makes
them from l7lab's records). This module turns the filter flags of `l7lab observe` and `l7lab
monitor` into Hubble's filters and answers whether a flow passes them, with Hubble's semantics,
taken from Cilium's source (hubble/cmd/observe/flows_filter.go builds the filters from the flags,
pkg/hubble/filters/*.go matches them):

- A filter (`FlowFilter`) is a set of criteria, one per kind (pods, verdicts, ports, ...). The
  values of one kind are OR (`--verdict DROPPED --verdict AUDIT`), different kinds AND
  (`--verdict DROPPED --to-pod retail/inventory-api`).
- The flags build two filters, "left" and "right", and a flow passes if it matches either. A flag
  about one side (`--from-pod`, `--to-port`) goes into both; a flag about either side (`--pod`,
  `--label`, `--port`, `--identity`, `--ip`, `--fqdn`) puts its source criterion into the left
  filter and its destination criterion into the right one, so `--pod X` shows flows from X or
  to X.
- `--namespace N` narrows the left filter's source pods and the right filter's destination pods
  to N; `--from-namespace` / `--to-namespace` narrow the source / destination pods of both. A pod
  name without a namespace means namespace `default`, as in Hubble; a pod name is a prefix.
- `--not` sends the one filter flag after it to a second set of filters, the blacklist, built the
  same way: a flow is shown when it passes the whitelist (or there is none) and matches no
  blacklist filter. As in Hubble, all `--not` flags of one command line build one blacklist, so
  `--not --verdict DROPPED --not --protocol udp` hides dropped UDP flows only.
- Some flags cannot be combined (`--label` with `--from-label`, `--port` with `--to-port`, ...).
- An HTTP flag (`--http-status`, `--http-method`, `--http-path`, `--http-url`) needs an event
  type criterion that can match L7 flows: none, or one naming `l7` (pkg/hubble/filters/http.go);
  with only other types the filter is refused, where it would match nothing.

Label selectors (`--label`) are read and matched by `dataplane/labelselector.py`. Values are
checked when the flag is read; a bad one raises `FilterError` naming the flag and what
was expected. Agent events (l7lab's notes about its L7 proxy, `{"agent_event": ...}`) pass an
empty filter and `--type agent`, as Hubble's agent events do, and no flow criterion.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from l7.regex import compile_regex

from .abi import RESERVED_IDENTITIES  # the reserved identities `--identity` takes by name
from .hubble import EVENT_AGENT, EVENT_L7, EVENT_TRACE, EVENT_TYPE_NAMES, VERDICTS
from .hubble import TRACE_POINTS as TRACE_OBSERVATION_POINTS
from .labelselector import Requirement, flow_labels, parse_selector

HubbleFlow = dict[str, Any]

# The vocabulary is dataplane/hubble.py's (one table per concept, mirrored from Cilium), read
# the way the flags name it: flow.proto's Verdict names (`--verdict`, VERDICTS), pkg/monitor/api's
# MessageTypeNames (`--type drop`) and TraceObservationPoints (`--type trace:to-endpoint`).
EVENT_TYPES = {name: number for number, name in EVENT_TYPE_NAMES.items()}
AGENT_EVENT_TYPE = EVENT_AGENT
TRACE_POINTS = {name: number for number, name in TRACE_OBSERVATION_POINTS.values()}
# A message type and its sub-type are one byte each in the datapath's notification header.
EVENT_TYPE_MAX = 255
L4_PROTOCOLS = {"tcp": ("TCP",), "udp": ("UDP",), "sctp": ("SCTP",), "icmp": ("ICMPv4", "ICMPv6"),
                "icmpv4": ("ICMPv4",), "icmpv6": ("ICMPv6",)}
L7_PROTOCOLS = {"http": "http", "dns": "dns", "kafka": "kafka"}
TCP_FLAGS = ("SYN", "FIN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")

# Flags that name one filter each; `not` is the negation. In the order `observe --help` lists them.
FILTER_FLAGS = ("verdict", "type", "pod", "from-pod", "to-pod", "namespace", "from-namespace", "to-namespace",
                "label", "from-label", "to-label", "identity", "from-identity", "to-identity", "ip", "from-ip",
                "to-ip", "fqdn", "from-fqdn", "to-fqdn", "protocol", "port", "from-port", "to-port", "tcp-flags",
                "traffic-direction", "http-method", "http-path", "http-url", "http-status")
# flows_filter.go's conflict groups (of the flags l7lab has): two flags of one group cannot be
# given together (to the whitelist, or together to the blacklist).
CONFLICTS = (("from-fqdn", "from-ip", "ip", "fqdn", "from-namespace", "namespace"),
             ("from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"),
             ("to-fqdn", "to-ip", "ip", "fqdn", "to-namespace", "namespace"),
             ("to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"),
             ("to-pod", "namespace"), ("from-pod", "namespace"), ("label", "from-label"), ("label", "to-label"),
             ("port", "to-port"), ("port", "from-port"), ("identity", "to-identity"), ("identity", "from-identity"))


class FilterError(ValueError):
    """A filter flag with a value it cannot take, or flags that cannot go together."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"--{flag}: {message}" if flag else message)
        self.flag = flag


# --------------------------------------------------------------------------- one filter


@dataclass(frozen=True)
class EventTypeFilter:
    type: int
    sub_type: int | None = None  # None: any sub-type


@dataclass(frozen=True)
class StatusFilter:
    """`--http-status`: a full code (403) or a prefix (4+, 40+)."""

    text: str

    def matches(self, code: int) -> bool:
        if code == 0:
            return False  # not a response
        return f"{code:03d}".startswith(self.text[:-1]) if self.text.endswith("+") else f"{code:03d}" == self.text


@dataclass
class FlowFilter:
    """One Hubble FlowFilter: every non-empty criterion must match (AND); within a criterion, any
    value (OR). Pods stay text until the namespaces are applied (`FilterTracker.filters`)."""

    source_pod: list[str] = field(default_factory=list)
    destination_pod: list[str] = field(default_factory=list)
    source_label: list[tuple[Requirement, ...]] = field(default_factory=list)
    destination_label: list[tuple[Requirement, ...]] = field(default_factory=list)
    source_identity: list[int] = field(default_factory=list)
    destination_identity: list[int] = field(default_factory=list)
    source_ip: list[Any] = field(default_factory=list)  # ip_network
    destination_ip: list[Any] = field(default_factory=list)
    source_fqdn: list[Any] = field(default_factory=list)  # compiled patterns
    destination_fqdn: list[Any] = field(default_factory=list)
    source_port: list[int] = field(default_factory=list)
    destination_port: list[int] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    event_type: list[EventTypeFilter] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    tcp_flags: list[frozenset[str]] = field(default_factory=list)
    traffic_direction: list[str] = field(default_factory=list)
    http_method: list[str] = field(default_factory=list)
    http_path: list[Any] = field(default_factory=list)  # compiled RE2
    http_url: list[Any] = field(default_factory=list)
    http_status: list[StatusFilter] = field(default_factory=list)

    def passes_agent_events(self) -> bool:
        """Whether an agent event matches: it carries no flow, so only a filter whose one
        criterion is the event type can (Hubble's other filters read fields it lacks)."""
        others = [name for name, value in vars(self).items() if value and name != "event_type"]
        return not others and (not self.event_type or _event_type({"agent_event": {}}, tuple(self.event_type)))

    def predicates(self) -> list[Callable[[HubbleFlow], bool]]:
        """The criteria of this filter, each a test of a flow (pkg/hubble/filters' FilterFuncs)."""
        tests: list[Callable[[HubbleFlow], bool]] = []
        if self.event_type:
            tests.append(lambda f, t=tuple(self.event_type): _event_type(f, t))
        if self.verdict:
            tests.append(lambda f, v=frozenset(self.verdict): f.get("verdict") in v)
        for side, pods in (("source", self.source_pod), ("destination", self.destination_pod)):
            if pods:
                names = tuple(namespace_name(p) for p in pods)
                tests.append(lambda f, s=side, n=names: _pod(f.get(s) or {}, n))
        for side, selectors in (("source", self.source_label), ("destination", self.destination_label)):
            if selectors:
                tests.append(lambda f, s=side, sel=tuple(selectors): _labels(f.get(s) or {}, sel))
        for side, ids in (("source", self.source_identity), ("destination", self.destination_identity)):
            if ids:
                tests.append(lambda f, s=side, i=frozenset(ids): int((f.get(s) or {}).get("identity") or 0) in i)
        for side, nets in (("source", self.source_ip), ("destination", self.destination_ip)):
            if nets:
                tests.append(lambda f, s=side, n=tuple(nets): _ip(f, s, n))
        for side, patterns in (("source_names", self.source_fqdn), ("destination_names", self.destination_fqdn)):
            if patterns:
                tests.append(lambda f, s=side, p=tuple(patterns): any(
                    x.match(str(n)) for n in f.get(s) or () for x in p))
        if self.protocol:
            tests.append(lambda f, p=tuple(self.protocol): _protocol(f, p))
        for side, ports in (("source_port", self.source_port), ("destination_port", self.destination_port)):
            if ports:
                tests.append(lambda f, s=side, p=frozenset(ports): _port(f, s) in p)
        if self.tcp_flags:
            tests.append(lambda f, t=tuple(self.tcp_flags): _tcp_flags(f, t))
        if self.traffic_direction:
            tests.append(lambda f, d=frozenset(self.traffic_direction): f.get("traffic_direction") in d)
        if self.http_status:
            tests.append(lambda f, s=tuple(self.http_status): any(x.matches(int(_http(f).get("code") or 0)) for x in s))
        if self.http_method:
            methods = frozenset(m.upper() for m in self.http_method)
            tests.append(lambda f, m=methods: bool(_http(f).get("method")) and str(_http(f)["method"]).upper() in m)
        if self.http_path:
            tests.append(lambda f, r=tuple(self.http_path): _http_path(f, r))
        if self.http_url:
            tests.append(lambda f, r=tuple(self.http_url): bool(url := str(_http(f).get("url") or ""))
                         and any(x.search(url) for x in r))
        return tests


def namespace_name(name: str) -> tuple[str, str]:
    """Hubble's ParseNamespaceName: "ns/pod" -> (ns, pod prefix), "pod" -> ("default", pod),
    "ns/" -> (ns, "") (any pod of ns)."""
    parts = name.split("/")
    if len(parts) > 1:
        return parts[0], parts[1]
    return ("", "") if not parts[0] else ("default", parts[0])


def _pod(endpoint: dict[str, Any], names: tuple[tuple[str, str], ...]) -> bool:
    namespace, pod = str(endpoint.get("namespace") or ""), str(endpoint.get("pod_name") or "")
    if not namespace and not pod:
        return False
    return any((not prefix or pod.startswith(prefix)) and (not ns or ns == namespace) for ns, prefix in names)


def _labels(endpoint: dict[str, Any], selectors: tuple[tuple[Requirement, ...], ...]) -> bool:
    labels = flow_labels(endpoint)
    return any(all(r.matches(labels) for r in selector) for selector in selectors)


def _ip(flow: HubbleFlow, side: str, networks: tuple[Any, ...]) -> bool:
    text = (flow.get("IP") or {}).get(side)
    if not text:
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _l4(flow: HubbleFlow) -> dict[str, Any]:
    return flow.get("l4") or {}


def _port(flow: HubbleFlow, which: str) -> int | None:
    for name in ("TCP", "UDP", "SCTP"):
        layer = _l4(flow).get(name)
        if layer is not None:
            return int(layer.get(which) or 0)
    return None  # no ports: never matches a port filter


def _protocol(flow: HubbleFlow, protocols: tuple[str, ...]) -> bool:
    l4, l7 = _l4(flow), flow.get("l7") or {}
    return any(any(name in l4 for name in L4_PROTOCOLS[p]) if p in L4_PROTOCOLS else L7_PROTOCOLS[p] in l7
               for p in protocols)


def _tcp_flags(flow: HubbleFlow, wanted: tuple[frozenset[str], ...]) -> bool:
    flags = (_l4(flow).get("TCP") or {}).get("flags")
    if not flags:
        return False
    present = {name for name, on in flags.items() if on}
    return any(w <= present for w in wanted)


def _http(flow: HubbleFlow) -> dict[str, Any]:
    return (flow.get("l7") or {}).get("http") or {}


def _http_path(flow: HubbleFlow, regexes: tuple[Any, ...]) -> bool:
    url = str(_http(flow).get("url") or "")
    # Go's url.ParseRequestURI: an absolute URL or an absolute path; anything else never matches.
    parts = urlsplit(url)
    if not url or not (parts.scheme or url.startswith("/")):
        return False
    return any(r.search(parts.path) for r in regexes)


def _event_type(flow: HubbleFlow, types: tuple[EventTypeFilter, ...]) -> bool:
    if "agent_event" in flow:
        return any(t.type in (0, AGENT_EVENT_TYPE) and t.sub_type is None for t in types)
    event = flow.get("event_type")
    if not event:
        return False
    kind, sub = int(event.get("type") or 0), int(event.get("sub_type") or 0)
    return any((t.type == 0 or t.type == kind) and (t.sub_type is None or t.sub_type == sub) for t in types)


# --------------------------------------------------------------------------- from flags


def _decimal(text: str, top: int) -> int | None:
    """`text` as a number from 0 to `top`, else None. ASCII digits only, as Go's strconv reads
    them (Python's int() also takes other scripts' digits, and refuses very long ones)."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]+", text) or len(text.lstrip("0")) > len(str(top)):
        return None
    number = int(text)
    return number if number <= top else None


def _number(flag: str, value: str, what: str, top: int) -> int:
    number = _decimal(value, top)
    if number is None:
        raise FilterError(flag, f"expected {what}, got {value!r}")
    return number


def _identity(flag: str, value: str) -> int:
    if value in RESERVED_IDENTITIES:
        return RESERVED_IDENTITIES[value]
    number = _decimal(value, 0xFFFFFFFF)
    if number is None:
        raise FilterError(flag, f"expected a numeric security identity or one of {', '.join(RESERVED_IDENTITIES)}, "
                                f"got {value!r}")
    return number


def _event_type_filter(flag: str, value: str) -> EventTypeFilter:
    kind, sep, sub = value.partition(":")
    number = EVENT_TYPES[kind] if kind in EVENT_TYPES else _decimal(kind, EVENT_TYPE_MAX)
    if number is None:
        raise FilterError(flag, f"expected an event type ({', '.join(EVENT_TYPES)}) or its number "
                                f"(0-{EVENT_TYPE_MAX}), optionally :SUBTYPE (trace:to-endpoint), got {value!r}")
    if not sep:
        return EventTypeFilter(number)
    if number == EVENT_TRACE and sub in TRACE_POINTS:
        return EventTypeFilter(number, TRACE_POINTS[sub])
    sub_number = _decimal(sub, EVENT_TYPE_MAX)
    if sub_number is None:
        known = f" ({', '.join(TRACE_POINTS)})" if number == EVENT_TRACE else ""
        raise FilterError(flag, f"expected a sub-type name{known} or number (0-{EVENT_TYPE_MAX}) after {kind}:, "
                                f"got {sub!r}")
    return EventTypeFilter(number, sub_number)


def _network(flag: str, value: str) -> Any:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise FilterError(flag, f"expected an IP address or a CIDR (10.0.0.1, 10.0.0.0/24), got {value!r}") from None


def _fqdn(flag: str, value: str) -> Any:
    """Hubble's FQDN pattern (pkg/hubble/filters/patterns.go): a name, any case, an optional
    trailing dot, `*` for any run of letters, digits, dashes and dots; the whole name matches."""
    pattern = value.strip().removesuffix(".").lower()
    if not pattern or pattern.endswith(".") or not re.fullmatch(r"[-0-9_a-z.*]+", pattern):
        raise FilterError(flag, f"expected a DNS name or pattern (www.example.com, *.example.com), got {value!r}")
    return re.compile("".join(r"[-.0-9a-z]*" if c == "*" else re.escape(c) for c in pattern) + r"\Z")


def _regex(flag: str, value: str) -> Any:
    try:
        return compile_regex(value)
    except ValueError as exc:
        raise FilterError(flag, f"expected a regular expression (RE2 syntax): {exc}") from None


def _selector(flag: str, value: str) -> tuple[Requirement, ...]:
    try:
        return parse_selector(value)
    except ValueError as exc:
        raise FilterError(flag, f"expected a label selector (app=x, k8s:app=x, 'app in (a,b)', !app): {exc}") from None


def _pod_name(flag: str, value: str) -> str:
    if not value:
        raise FilterError(flag, "expected [NAMESPACE/]POD, got an empty name")
    return value


def _namespace(flag: str, value: str) -> str:
    if not value or "/" in value:
        raise FilterError(flag, f"expected a namespace name, got {value!r}")
    return value


@dataclass
class FilterTracker:
    """The filters one list of flags builds (flows_filter.go's filterTracker): `left` and `right`,
    OR'ed, and the namespaces to apply to their pods when they are made."""

    left: FlowFilter | None = None
    right: FlowFilter | None = None
    namespaces: list[str] = field(default_factory=list)
    source_namespaces: list[str] = field(default_factory=list)
    destination_namespaces: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)  # the --type values, for the error below

    def _sides(self) -> tuple[FlowFilter, FlowFilter]:
        self.left = self.left or FlowFilter()
        self.right = self.right or FlowFilter()
        return self.left, self.right

    def both(self, attribute: str, value: Any) -> None:
        for side in self._sides():
            getattr(side, attribute).append(value)

    def either(self, source_attribute: str, destination_attribute: str, value: Any) -> None:
        left, right = self._sides()
        getattr(left, source_attribute).append(value)
        getattr(right, destination_attribute).append(value)

    def set(self, flag: str, value: str) -> None:
        if flag not in self.changed:
            self.changed.append(flag)
        for group in CONFLICTS:
            given = [f for f in group if f in self.changed]
            if len(given) > 1:
                raise FilterError("", f"filters --{given[0]} and --{given[1]} cannot be combined")
        side, _, what = flag.partition("-") if flag.startswith(("from-", "to-")) else ("", "", flag)
        attribute = {"pod": "pod", "label": "label", "identity": "identity", "ip": "ip", "port": "port",
                     "fqdn": "fqdn"}.get(what)
        if attribute is not None:
            parsed = {"pod": _pod_name, "label": _selector, "identity": _identity, "ip": _network, "fqdn": _fqdn,
                      "port": lambda f, v: _number(f, v, "a port number (0-65535)", 65535)}[what](flag, value)
            if side == "from":
                self.both(f"source_{attribute}", parsed)
            elif side == "to":
                self.both(f"destination_{attribute}", parsed)
            else:
                self.either(f"source_{attribute}", f"destination_{attribute}", parsed)
        elif what == "namespace":
            {"": self.namespaces, "from": self.source_namespaces,
             "to": self.destination_namespaces}[side].append(_namespace(flag, value))
        elif flag == "verdict":
            if value.upper() not in VERDICTS:
                raise FilterError(flag, f"expected one of {', '.join(VERDICTS[1:])}, got {value!r}")
            self.both("verdict", value.upper())
        elif flag == "type":
            self.both("event_type", _event_type_filter(flag, value))
            self.types.append(value)
        elif flag == "protocol":
            if value.lower() not in L4_PROTOCOLS and value.lower() not in L7_PROTOCOLS:
                raise FilterError(flag, f"expected one of {', '.join([*L4_PROTOCOLS, *L7_PROTOCOLS])}, got {value!r}")
            self.both("protocol", value.lower())
        elif flag == "tcp-flags":
            flags = frozenset(f.upper() for f in value.split(","))
            if not flags <= set(TCP_FLAGS):
                raise FilterError(flag, f"expected TCP flags separated by commas ({', '.join(TCP_FLAGS)}), got {value!r}")
            self.both("tcp_flags", flags)
        elif flag == "traffic-direction":
            if value.lower() not in ("ingress", "egress"):
                raise FilterError(flag, f"expected ingress or egress, got {value!r}")
            self.both("traffic_direction", value.upper())
        elif flag == "http-method":
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
                raise FilterError(flag, f"expected an HTTP method (GET, POST, ...), got {value!r}")
            self.both("http_method", value)
        elif flag == "http-path":
            self.both("http_path", _regex(flag, value))
        elif flag == "http-url":
            self.both("http_url", _regex(flag, value))
        elif flag == "http-status":
            if not re.fullmatch(r"[1-5][0-9]{2}|[1-5][0-9]?\+", value):
                raise FilterError(flag, f"expected a status code (403) or a prefix of one (4+, 40+), got {value!r}")
            self.both("http_status", StatusFilter(value))
        else:
            raise FilterError(flag, "is not a filter flag")
        self._check_namespaces()

    def _check_namespaces(self) -> None:
        """flows_filter.go's checkNamespaceConflicts: a pod named with a namespace must be in the
        namespace the namespace flags give."""
        for side in (self.left, self.right):
            if side is None:
                continue
            for namespaces, pods in ((self.namespaces, side.source_pod + side.destination_pod),
                                     (self.source_namespaces, side.source_pod),
                                     (self.destination_namespaces, side.destination_pod)):
                for ns in namespaces:
                    for pod in pods:
                        if "/" in pod and pod.split("/")[0] != ns:
                            raise FilterError("", f"namespace conflict: {ns!r} does not contain {pod!r}")

    def _check_http_types(self) -> None:
        """pkg/hubble/filters/http.go: an HTTP criterion needs an event type filter that can match
        L7 events (none at all, or one naming type l7). Hubble refuses the filter otherwise; it
        would match nothing, as `--http-status 403 --type drop` would."""
        for ff in (self.left, self.right):
            if ff is None or not ff.event_type or any(t.type == EVENT_L7 for t in ff.event_type):
                continue
            for flag, what, given in (("http-status", "HTTP status code", ff.http_status),
                                      ("http-method", "HTTP method", ff.http_method),
                                      ("http-path", "HTTP path", ff.http_path),
                                      ("http-url", "HTTP URL", ff.http_url)):
                if given:
                    types = " ".join(f"--type {t}" for t in self.types)
                    raise FilterError(flag, f"cannot be combined with {types}: filtering by {what} requires the "
                                            f"event type filter to match 'l7' events (add --type l7, or leave "
                                            f"--type out)")

    def filters(self) -> list[FlowFilter]:
        """The filters, with the namespaces applied to their pods (flowFilters())."""
        self._check_http_types()
        if self.left is None and self.right is None and not (
                self.namespaces or self.source_namespaces or self.destination_namespaces):
            return []
        left, right = self._sides()
        for ff in (left, right):
            if self.destination_namespaces:
                ff.destination_pod = _with_namespaces(ff.destination_pod or [""], self.destination_namespaces)
            if self.source_namespaces:
                ff.source_pod = _with_namespaces(ff.source_pod or [""], self.source_namespaces)
        if self.namespaces:
            left.source_pod = _with_namespaces(left.source_pod or [""], self.namespaces)
            right.destination_pod = _with_namespaces(right.destination_pod or [""], self.namespaces)
        return [left] if left == right else [left, right]


def _with_namespaces(pods: list[str], namespaces: list[str]) -> list[str]:
    return [p if "/" in p else f"{ns}/{p}" for p in pods for ns in ([""] if "/" in p else namespaces)]


@dataclass
class Filters:
    """A whitelist and a blacklist of filters: a flow is shown if it matches a whitelist filter
    (or there is none) and no blacklist filter (filters.Apply)."""

    whitelist: list[FlowFilter] = field(default_factory=list)
    blacklist: list[FlowFilter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._white = [(f.predicates(), f.passes_agent_events()) for f in self.whitelist]
        self._black = [(f.predicates(), f.passes_agent_events()) for f in self.blacklist]

    def __bool__(self) -> bool:
        return bool(self.whitelist or self.blacklist)

    def matches(self, flow: HubbleFlow) -> bool:
        """Whether `flow` (a Hubble flow dict, or `{"agent_event": ...}`) passes."""
        agent = "agent_event" in flow

        def match(test: tuple[list[Callable[[HubbleFlow], bool]], bool]) -> bool:
            return test[1] if agent else all(p(flow) for p in test[0])

        if self._white and not any(match(t) for t in self._white):
            return False
        return not any(match(t) for t in self._black)


@dataclass
class FilterBuilder:
    """Reads filter flags in command-line order (`add(flag, value)`; `add("not")` negates the
    next one) and gives the `Filters` they mean."""

    whitelist: FilterTracker = field(default_factory=FilterTracker)
    blacklist: FilterTracker = field(default_factory=FilterTracker)
    negate_next: bool = False

    def add(self, flag: str, value: str = "") -> None:
        if flag == "not":
            if self.negate_next:
                raise FilterError("not", "consecutive --not: --not negates the one filter flag after it")
            self.negate_next = True
            return
        tracker = self.blacklist if self.negate_next else self.whitelist
        self.negate_next = False
        tracker.set(flag, value)

    def build(self) -> Filters:
        if self.negate_next:
            raise FilterError("not", "a trailing --not: --not negates the filter flag after it, and none follows")
        return Filters(self.whitelist.filters(), self.blacklist.filters())


def parse_filters(flags: list[tuple[str, str]]) -> Filters:
    """Filters from (flag, value) pairs in command-line order, flags without their dashes
    (`[("not", ""), ("verdict", "FORWARDED")]`). Raises FilterError."""
    builder = FilterBuilder()
    for flag, value in flags:
        builder.add(flag, value)
    return builder.build()
