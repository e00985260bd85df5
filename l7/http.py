"""HTTP as the L7 rules see it: rule types, request normalization, matching, the decision for
one request against one rule set, and the HTTP part of a flow record.

Both the policy oracle (`dataplane.policy.engine`) and the proxy (`proxy.state`) judge an HTTP
request with `judge` below, over the request as `view_request` (oracle) or the proxy's wire parser
(`proxy.http.parse_request`, which calls `request_path` and the header rules here) leave it.

Matching (Cilium pkg/policy/api/http.go, Envoy's RE2 "safe_regex"): `method`, `path` and `host`
are RE2 regular expressions that must match the *whole* value (full match), case-sensitively.
`path` is matched against the request target including the query string (`/data?x=1` does not
full-match `/data`). `headers` entries are "Name" (header present) or "Name: value" (exact
value); `headerMatches` entries are {name, value} (value omitted: presence). Header names are
case-insensitive (HTTP), values case-sensitive. All conditions of one rule are ANDed; the
rules of a set are ORed.

What the rules see is exactly what the backend receives: the path normalized as Envoy does
(`normalize_path`), hop-by-hop headers removed, an upgrade offer shown only as it is forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httptools
import re2

from .protocol import L7Protocol, RuleSetView, SetVerdict
from .regex import OPTIONS, compile_regex


@dataclass(frozen=True)
class HttpFlow:
    """What a flow record says about one HTTP request and the answer it got."""

    method: str  # "" when the request could not be parsed
    url: str  # http://<host><path>
    path: str  # the request target as the rules matched it and as it was forwarded
    protocol: str  # "HTTP/1.1"
    code: int  # the status code sent to the client; 0 when none was sent
    # The request's headers as the rules saw them (`recorded_headers` bounds them); () in
    # records written before headers were recorded.
    headers: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.url, "path": self.path, "protocol": self.protocol,
                "code": self.code, "headers": [[name, value] for name, value in self.headers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HttpFlow":
        return cls(str(data.get("method", "")), str(data.get("url", "")), str(data.get("path", "")),
                   str(data.get("protocol", "")), int(data.get("code", 0)),
                   tuple((str(h[0]), str(h[1])) for h in data.get("headers") or () if len(h) == 2))


# A record keeps at most this many headers, each value cut to this many characters: a request
# may carry up to MAX_HEADERS (proxy/http.py) lines of up to 60 KiB, and one record per request
# must stay one small line of the events file.
RECORDED_HEADERS = 32
RECORDED_HEADER_VALUE = 256


def recorded_headers(headers: dict[str, str] | list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The headers a record keeps: the first RECORDED_HEADERS, values cut to
    RECORDED_HEADER_VALUE characters (a cut value ends with "...")."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return tuple((name, value if len(value) <= RECORDED_HEADER_VALUE else value[:RECORDED_HEADER_VALUE - 3] + "...")
                 for name, value in items[:RECORDED_HEADERS])


# ---------------------------------------------------------------------------- tokens and values

# An HTTP token (RFC 9110 section 5.6.2): what a header name and a method must be. The proxy
# answers 400 Bad Request to a header line whose name is not one (proxy/http.py _TOKEN).
_HEADER_NAME_RE = re2.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", options=OPTIONS)
HTTP_TOKEN_CHARS = "letters, digits and !#$%&'*+-.^_`|~"


def is_http_token(text: str) -> bool:
    """True when `text` is an HTTP token: a valid header name or method."""
    return _HEADER_NAME_RE.fullmatch(text) is not None


def is_header_value(text: str) -> bool:
    """True when `text` has only the characters a header value may carry (HTAB, SP, VCHAR,
    obs-text: any byte of a non-ASCII character); the proxy answers 400 to any other."""
    return all(c == "\t" or " " <= c <= "~" or ord(c) >= 0x80 for c in text)


# ---------------------------------------------------------------------------- normalization
# The request target and headers as the rules see them; the proxy's wire parser calls these,
# and the oracle calls them through `view_request`.

HOST_RE = re.compile(r"(?:[A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,;=:@/%")

# Hop-by-hop headers (RFC 9110 7.6.1) and framing headers: never forwarded as received; the
# proxy writes its own framing and connection management. HTTP2-Settings belongs to an h2c
# upgrade (RFC 7540 3.2), which is never forwarded, so it is never forwarded either.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "content-length", "upgrade", "trailer", "http2-settings"})

# The only protocols an upgrade is forwarded to (compared by protocol name, any letter case).
# After the backend's 101 the connection is a byte tunnel the rules cannot see into, so an
# upgrade is forwarded only where that is the accepted price: WebSocket (Envoy forwards an
# upgrade only for the types its configuration enables). Never h2c: every HTTP/2 request after
# the switch would reach the backend unchecked; like Envoy's HTTP/1 codec, the proxy removes the
# h2c offer and the request goes on as a plain HTTP/1.1 request. See docs/proxy.md "Upgrades".
FORWARDED_UPGRADES = frozenset({"websocket"})


class HttpError(Exception):
    """A message the proxy refuses; `status` is what to answer (the connection is then closed)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason



def hop_by_hop(connection: list[str]) -> frozenset[str]:
    """The standard hop-by-hop set plus every header the Connection header names (RFC 9110
    7.6.1): they concern this hop only, so they are neither forwarded nor seen by the rules."""
    return HOP_BY_HOP | {t.lower() for t in connection}


def upgrade_protocol_name(token: str) -> str:
    """`websocket` of `WebSocket/13`: an Upgrade protocol token's name, lower case."""
    return token.split("/", 1)[0].strip().lower()


def forwarded_upgrade(value: str) -> str:
    """The part of an Upgrade header the proxy forwards: the offered protocols that are in
    FORWARDED_UPGRADES, as sent, in order; "" when none is (the request is then a plain one)."""
    kept = [t.strip() for t in value.split(",") if upgrade_protocol_name(t) in FORWARDED_UPGRADES]
    return ", ".join(kept)


def headers_seen_by_rules(headers: Mapping[str, str], version: str = "1.1") -> dict[str, str]:
    """The part of a request's headers the L7 rules see, as `parse_request` + `match_headers`
    leave it (for the policy oracle, which judges requests it never parses): hop-by-hop headers
    and the headers Connection names are gone; an upgrade offer is shown only as the proxy
    forwards it (`Connection: Upgrade` + the WebSocket part of Upgrade), so an h2c offer is not
    seen at all. Framing headers stay as given (the proxy writes equivalent ones)."""
    connection = [t for name, value in headers.items() if name.lower() == "connection" for t in header_tokens(value)]
    hidden = hop_by_hop(connection) - {"content-length", "transfer-encoding"}
    out = {name: value for name, value in headers.items() if name.lower() not in hidden}
    offer = next((value for name, value in headers.items() if name.lower() == "upgrade"), "")
    forwarded = forwarded_upgrade(offer) if "upgrade" in connection and version == "1.1" else ""
    if forwarded:
        out.update({"Connection": "Upgrade", "Upgrade": forwarded})
    return out


def header_tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def request_path(method: str, target: str, host: str) -> str:
    """The normalized path+query from the request target (origin, absolute, authority, asterisk)."""
    if "#" in target:
        raise HttpError(400, "fragment in request target")
    if method == "CONNECT":
        if not HOST_RE.fullmatch(target) or ":" not in target.rsplit("]", 1)[-1]:
            raise HttpError(400, "CONNECT needs an authority-form target host:port")
        return target
    if target == "*":
        if method != "OPTIONS":
            raise HttpError(400, "asterisk-form is for OPTIONS only")
        return target
    if target.startswith("/"):
        path, sep, query = target.partition("?")
        return normalize_path(path) + sep + query
    if target[:7].lower() == "http://":
        try:
            url = httptools.parse_url(target.encode("ascii"))
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "invalid absolute-form target") from None
        if url.userinfo or url.fragment or not url.host:
            raise HttpError(400, "absolute-form target with userinfo, fragment or no host")
        authority = target[7:].split("/", 1)[0].split("?", 1)[0]
        if authority.lower() != host.lower():
            # RFC 9112 3.2.2 lets the URI win over Host; a proxy that matched on one and a backend
            # that routes on the other is a bypass, so a mismatch is refused.
            raise HttpError(400, f"absolute-form authority {authority!r} differs from Host {host!r}")
        path = (url.path or b"/").decode("ascii")
        query = url.query.decode("ascii") if url.query is not None else None
        return normalize_path(path) + ("?" + query if query is not None else "")
    raise HttpError(400, f"unsupported request target {target[:60]!r}")


def normalize_path(path: str) -> str:
    """Envoy's default-on normalizations, strictly.

    1. characters outside RFC 3986 pchar and "/" -> 400; backslash -> 400
    2. percent-decoding of unreserved characters (%2e -> ".", %7E -> "~"); other escapes kept
       with uppercase hex; %2F and %5C (escaped slashes) -> 400 (Envoy's REJECT_REQUEST action:
       backends disagree on whether they separate segments, so we refuse rather than guess);
       a "%" not followed by two hex digits -> 400
    3. dot-segment removal (RFC 3986 5.2.4), then merging of repeated slashes (Envoy's order);
       "..;x" / ".;x" segments -> 400 (servlet path parameters; stricter than Envoy)
    """
    if "\\" in path:
        raise HttpError(400, "backslash in path")
    bad = set(path) - _PATH_CHARS
    if bad:
        raise HttpError(400, f"character(s) {''.join(sorted(bad))!r} not allowed in a path")
    if "%" in path:
        pieces = path.split("%")
        out = [pieces[0]]
        for piece in pieces[1:]:
            hx = piece[:2]
            if len(hx) < 2 or not set(hx) <= _HEX:
                raise HttpError(400, "invalid percent-encoding in path")
            char = chr(int(hx, 16))
            if char in "/\\":
                raise HttpError(400, "escaped slash or backslash (%2F/%5C) in path")
            out.append((char if char in _UNRESERVED else "%" + hx.upper()) + piece[2:])
        path = "".join(out)
    segments = path.split("/")[1:]
    if any(seg.startswith((".;", "..;")) for seg in segments):
        # Servlet containers treat "..;x" as ".." (path parameters): "/public/..;/private" would
        # be "/private" to Tomcat but "/public/..;/private" to the rules. Stricter than Envoy.
        raise HttpError(400, "dot segment with path parameters")
    kept: list[str] = []
    for i, seg in enumerate(segments):
        if seg in (".", ".."):
            if seg == ".." and kept:
                kept.pop()
            if i == len(segments) - 1:
                kept.append("")  # "/a/b/.." -> "/a/": a trailing dot segment leaves a directory
        else:
            kept.append(seg)
    path = "/" + "/".join(kept)
    return re.sub("/{2,}", "/", path)




@dataclass(frozen=True)
class HttpRequestView:
    """An HTTP request as the rules see it: the normalized path+query, and the headers the
    backend receives (duplicates joined with ",", as Envoy does)."""

    method: str
    path: str
    headers: Mapping[str, str]

    @property
    def host(self) -> str:
        return next((v for k, v in self.headers.items() if k.lower() == "host"), "")


def view_request(method: str, target: str, headers: Mapping[str, str],
                 default_host: str = "") -> tuple[HttpRequestView, list[str]]:
    """The request the proxy would judge for one the oracle never parses, with notes saying how
    the proxy changes it on the way (normalized path, hidden hop-by-hop headers, upgrades).
    `default_host` is the Host a client sends when none is given. Raises HttpError for a target
    the proxy rejects."""
    given = dict(headers)
    if not any(k.lower() == "host" for k in given) and default_host:
        given["Host"] = default_host
    host = next((v for k, v in given.items() if k.lower() == "host"), "")
    path = request_path(method, target, host)
    notes = []
    if path != target:
        notes.append(f"the proxy normalizes {target} to {path}")
    seen = headers_seen_by_rules(given)
    kept = {k.lower() for k in seen}
    removed = [k for k in given if k.lower() not in kept]
    if removed:
        notes.append(f"hop-by-hop headers are not forwarded and the rules do not see them: {', '.join(removed)}")
    offered = next((v for k, v in given.items() if k.lower() == "upgrade"), None)
    if "Upgrade" in seen and seen["Upgrade"] != offered:
        notes.append(f"the upgrade is forwarded (and seen by the rules) as Connection: Upgrade, "
                     f"Upgrade: {seen['Upgrade']}")
    elif any(k.lower() == "upgrade" for k in removed):
        notes.append("no upgrade is forwarded (only WebSocket is, never h2c): the request goes on as a plain request")
    return HttpRequestView(method, path, seen), notes


# ---------------------------------------------------------------------------- rules


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


# ---------------------------------------------------------------------------- the decision


def match(rule_set: RuleSetView, request: HttpRequestView) -> SetVerdict:
    """The set's HTTP rules against one request: allowed by an allow without L7 rules, or by
    the first HTTP rule that matches."""
    rules = rule_set.rules_for(PROTOCOL.name)
    if rule_set.allow_all:
        return SetVerdict(True, "an allow without L7 rules covers this peer and port: every request passes",
                          tuple(rule_set.allow_all_rule_ids), ())
    for rule, rule_id in rules:
        if rule.matches(request.method, request.path, request.headers):
            return SetVerdict(True, f"matches HTTP rule {rule}", (rule_id,), tuple(i for _, i in rules))
    tried = "; ".join(str(r) for r, _ in rules) or "none"
    return SetVerdict(False, f"matches no HTTP rule (tried: {tried})", (), tuple(i for _, i in rules))


def judge(rule_set: RuleSetView, request: HttpRequestView) -> SetVerdict:
    """One HTTP request against one rule set. A set that holds only another protocol's rules
    (a DNS-only set on a TCP port) lets a request through only if it is allow-all."""
    others = [name for name in rule_set.protocols_with_rules() if name != PROTOCOL.name]
    if others and not rule_set.rules_for(PROTOCOL.name):
        titles = "/".join(name.upper() for name in others)
        return SetVerdict(rule_set.allow_all, f"{titles}-only rule set" + (" (allow-all)" if rule_set.allow_all else ""),
                          (), ())
    return match(rule_set, request)


PROTOCOL = L7Protocol("http", "HTTP", ("TCP",), "denied", HttpRule.from_json, judge,
                      lambda request: f"{request.method} {request.path}", "the proxy answers 403 Access denied")
