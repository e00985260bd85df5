"""L7 rules: HTTP and DNS rule matching, the way Envoy and Cilium's DNS proxy match them.

HTTP (Cilium pkg/policy/api/http.go, Envoy's RE2 "safe_regex"): `method`, `path` and `host`
are RE2 regular expressions that must match the *whole* value (full match), case-sensitively.
`path` is matched against the request target including the query string (`/data?x=1` does not
full-match `/data`). `headers` entries are "Name" (header present) or "Name: value" (exact
value); `headerMatches` entries are {name, value} (value omitted: presence). Header names are
case-insensitive (HTTP), values case-sensitive. All conditions of one rule are ANDed; the
rules of a set are ORed.

DNS / FQDN (Cilium pkg/fqdn/matchpattern): names compare case-insensitively without a trailing
dot. `matchName` is an exact name. In `matchPattern`, `*` matches any run of characters
allowed in a DNS label (`[-a-zA-Z0-9_]*`), so it never crosses a dot: `*.example.com` matches
`api.example.com` but neither `example.com` nor `a.b.example.com`. A pattern of just `*`
matches every name.

`L7RuleSet` is the merged rule set of one (remote identity, port) of an endpoint and
direction: the value the proxy looks up. `allow_all` is set when some allow for that peer and
port carries no L7 rule (an L4-only allow merged with L7 rules lets every request through).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Mapping

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are reported by us, with file and line

# Characters of a DNS label in Cilium's matchpattern (allowedDNSCharsREGroup).
_DNS_LABEL_CHARS = "[-a-zA-Z0-9_]"
_DNS_NAME_RE = re2.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*\.?",
                           options=_OPTIONS)
_DNS_PATTERN_RE = re2.compile(r"[-A-Za-z0-9_.*]+", options=_OPTIONS)
# An HTTP token (RFC 9110 section 5.6.2): what a header name and a method must be. The proxy
# answers 400 Bad Request to a header line whose name is not one (proxy/http.py _TOKEN).
_HEADER_NAME_RE = re2.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", options=_OPTIONS)
HTTP_TOKEN_CHARS = "letters, digits and !#$%&'*+-.^_`|~"


def is_http_token(text: str) -> bool:
    """True when `text` is an HTTP token: a valid header name or method."""
    return _HEADER_NAME_RE.fullmatch(text) is not None


def is_header_value(text: str) -> bool:
    """True when `text` has only the characters a header value may carry (HTAB, SP, VCHAR,
    obs-text: any byte of a non-ASCII character); the proxy answers 400 to any other."""
    return all(c == "\t" or " " <= c <= "~" or ord(c) >= 0x80 for c in text)


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str):
    """Compile an RE2 regex as Envoy does; raises ValueError with RE2's explanation."""
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"invalid RE2 regex {pattern!r}: {detail}") from None


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str | None = None  # None: the header must be present

    def matches(self, headers: Mapping[str, str]) -> bool:
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.name.lower() not in lowered:
            return False
        return self.value is None or lowered[self.name.lower()] == self.value

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}: {self.value}"

    # JSON round trip (the proxy reads the lab's state file; see MapState.to_json).
    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value}

    @classmethod
    def from_json(cls, data: dict) -> "HeaderMatch":
        return cls(str(data["name"]), None if data.get("value") is None else str(data["value"]))


@dataclass(frozen=True)
class HttpRule:
    method: str = ""  # "" = any; else RE2 full match
    path: str = ""
    host: str = ""
    headers: tuple[HeaderMatch, ...] = ()

    def __post_init__(self) -> None:
        for text in (self.method, self.path, self.host):
            if text:
                compile_regex(text)

    def matches(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.method and not compile_regex(self.method).fullmatch(method):
            return False
        if self.path and not compile_regex(self.path).fullmatch(path):
            return False
        if self.host:
            host = next((v for k, v in headers.items() if k.lower() == "host"), "")
            if not compile_regex(self.host).fullmatch(host):
                return False
        return all(h.matches(headers) for h in self.headers)

    def __str__(self) -> str:
        parts = [f"method={self.method!r}" if self.method else "", f"path={self.path!r}" if self.path else "",
                 f"host={self.host!r}" if self.host else ""]
        parts += [f"header {h}" for h in self.headers]
        return "{" + ", ".join(p for p in parts if p) + "}" if any(parts) else "{} (any request)"

    def to_json(self) -> dict:
        return {"method": self.method, "path": self.path, "host": self.host,
                "headers": [h.to_json() for h in self.headers]}

    @classmethod
    def from_json(cls, data: dict) -> "HttpRule":
        return cls(data.get("method", ""), data.get("path", ""), data.get("host", ""),
                   tuple(HeaderMatch.from_json(h) for h in data.get("headers", ())))


def normalize_dns_name(name: str) -> str:
    return name.lower().rstrip(".")


def validate_dns_name(name: str) -> None:
    if not name or not _DNS_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid DNS name {name!r}")


def validate_dns_pattern(pattern: str) -> None:
    if not pattern or not _DNS_PATTERN_RE.fullmatch(pattern):
        raise ValueError(f"invalid DNS pattern {pattern!r}: allowed are letters, digits, '-', '_', '.' and '*'")
    if "**" in pattern:
        raise ValueError(f"invalid DNS pattern {pattern!r}: '**' is not supported; '*' matches within one DNS label")


def pattern_to_regex(pattern: str) -> str:
    """Cilium matchpattern.ToAnchoredRegexp, minus the anchors (we full-match)."""
    pattern = normalize_dns_name(pattern)
    if pattern == "*":
        return "[-a-zA-Z0-9_.]*"  # a lone "*" matches every name
    return r"\.".join(re2.escape(part).replace(r"\*", _DNS_LABEL_CHARS + "*") for part in pattern.split("."))


def fqdn_matches(name: str, match_name: str = "", match_pattern: str = "") -> bool:
    name = normalize_dns_name(name)
    if match_name:
        return name == normalize_dns_name(match_name)
    return bool(compile_regex(pattern_to_regex(match_pattern)).fullmatch(name))


@dataclass(frozen=True)
class DnsRule:
    match_name: str = ""
    match_pattern: str = ""

    def matches(self, name: str) -> bool:
        return fqdn_matches(name, self.match_name, self.match_pattern)

    def __str__(self) -> str:
        return f"matchName {self.match_name}" if self.match_name else f"matchPattern {self.match_pattern}"

    def to_json(self) -> dict:
        return {"match_name": self.match_name, "match_pattern": self.match_pattern}

    @classmethod
    def from_json(cls, data: dict) -> "DnsRule":
        return cls(data.get("match_name", ""), data.get("match_pattern", ""))


@dataclass
class L7RuleSet:
    """Merged L7 rules for one remote identity and port (see module docstring)."""

    allow_all: bool = False
    http: list[tuple[HttpRule, int]] = field(default_factory=list)  # (rule, rule id)
    dns: list[tuple[DnsRule, int]] = field(default_factory=list)
    allow_all_rule_ids: list[int] = field(default_factory=list)

    def match_http(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[bool, str, tuple[int, ...]]:
        """(allowed, why, rule ids) for one request."""
        if self.allow_all:
            return True, "an allow without L7 rules covers this peer and port: every request passes", \
                tuple(self.allow_all_rule_ids)
        for rule, rule_id in self.http:
            if rule.matches(method, path, headers):
                return True, f"matches HTTP rule {rule}", (rule_id,)
        tried = "; ".join(str(r) for r, _ in self.http) or "none"
        return False, f"matches no HTTP rule (tried: {tried})", ()

    def match_dns(self, name: str) -> tuple[bool, str, tuple[int, ...]]:
        if self.allow_all:
            return True, "an allow without L7 rules covers this peer and port: every query passes", \
                tuple(self.allow_all_rule_ids)
        for rule, rule_id in self.dns:
            if rule.matches(name):
                return True, f"matches DNS rule {rule}", (rule_id,)
        tried = "; ".join(str(r) for r, _ in self.dns) or "none"
        return False, f"matches no DNS rule (tried: {tried})", ()

    def to_json(self) -> dict:
        return {"allow_all": self.allow_all, "allow_all_rule_ids": list(self.allow_all_rule_ids),
                "http": [{"rule": r.to_json(), "rule_id": i} for r, i in self.http],
                "dns": [{"rule": r.to_json(), "rule_id": i} for r, i in self.dns]}

    @classmethod
    def from_json(cls, data: dict) -> "L7RuleSet":
        return cls(bool(data.get("allow_all", False)),
                   [(HttpRule.from_json(e["rule"]), int(e["rule_id"])) for e in data.get("http", ())],
                   [(DnsRule.from_json(e["rule"]), int(e["rule_id"])) for e in data.get("dns", ())],
                   [int(i) for i in data.get("allow_all_rule_ids", ())])


@dataclass
class L7Policy:
    """Value of `MapState.l7[(endpoint id, direction, proxy port)]`.

    `rules[(remote identity, port)]`; identity 0 holds the rules that apply to any peer. The
    proxy looks up (identity, port) first and falls back to (0, port), as `lookup` does.
    """

    rules: dict[tuple[int, int], L7RuleSet] = field(default_factory=dict)

    def lookup(self, identity: int, port: int) -> L7RuleSet | None:
        return self.rules.get((identity, port)) or self.rules.get((0, port))

    def to_json(self) -> dict:
        return {"rules": [{"identity": ident, "port": port, "set": rs.to_json()}
                          for (ident, port), rs in sorted(self.rules.items())]}

    @classmethod
    def from_json(cls, data: dict) -> "L7Policy":
        return cls({(int(e["identity"]), int(e["port"])): L7RuleSet.from_json(e["set"])
                    for e in data.get("rules", ())})

