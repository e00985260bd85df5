"""HTTP/1.x message heads for the L7 proxy: strict parsing, validation, normalization, serialization.

The proxy's rule: *the request that is checked is exactly the request the backend receives.*
So a request head is parsed here into a `Request`, validated strictly (anything ambiguous is an
`HttpError` with the status to answer), normalized, and the head sent upstream is re-serialized
from the parsed form -- raw client bytes are never forwarded.

Why not httptools/llhttp for request heads: llhttp is lenient where Envoy is strict (it has
accepted obs-fold, some whitespace, and chunk extensions that others reject across versions), it
cannot be stopped at a message boundary when pipelined requests share a read (the next head would
be parsed before we validated it), and it knows nothing of HEAD when framing responses. The checks
are therefore our own, over the raw head bytes, with compiled regexes (C speed); httptools is used
for absolute-form URL parsing (`httptools.parse_url`, in `l7.http.request_path`). See docs/proxy.md
for every decision.

Request checks (all answer 400 unless noted): request line `method SP target SP HTTP/1.0|1.1`,
method a token; header lines `token ":" OWS value OWS` with value chars HTAB/SP/VCHAR/obs-text only,
so obs-fold, whitespace before the colon, bare CR, bare LF, NUL and other controls are rejected;
head over 60 KiB, request line over 16 KiB or more than 100 header fields -> 431;
Content-Length digits only (duplicates must be identical); Transfer-Encoding one header line whose
last coding is `chunked` (and only that one); both CL and TE; TE on HTTP/1.0; Host missing, empty,
duplicated or malformed; absolute-form whose authority differs from Host; fragments; and the path
rules of `normalize_path`.

Upgrades: only a WebSocket offer is forwarded (FORWARDED_UPGRADES); h2c and every other offer is
removed and the request goes on as a plain one, so a 101 can only ever switch to WebSocket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# What the rules see of a request is the `l7` seam's (shared with the policy oracle): the
# request target's normalization, the hop-by-hop and upgrade rules, and the error they raise.
from l7.http import FORWARDED_UPGRADES, HttpError, forwarded_upgrade, request_path
from l7.http import HOST_RE as _HOST
from l7.http import header_tokens as _tokens
from l7.http import hop_by_hop as _hop_by_hop
from l7.http import upgrade_protocol_name as _protocol_name


MAX_HEAD = 60 * 1024  # Envoy's default max_request_headers_kb
MAX_REQUEST_LINE = 16 * 1024
MAX_HEADERS = 100  # Envoy's default max_headers_count
MAX_CHUNK_LINE = 4096

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# Field value chars: HTAB, SP, VCHAR, obs-text. CR and LF are excluded, so this also rejects
# bare CR and bare LF inside a line; a line starting with SP/HTAB (obs-fold) fails the token.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):([\t\x20-\x7e\x80-\xff]*)")
# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ), and
# RFC 9110 5.6.4: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE, qdtext = HTAB / SP / "!" /
# %x23-5B / %x5D-7E / obs-text, quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text ). Nothing else:
# no whitespace inside or after the size, no control characters, no unterminated quotes. (No
# possessive `*+` here: CPython 3.11.2 mis-matches it, e.g. accepts `1;a;`. The line is at most
# MAX_CHUNK_LINE long before this runs, which bounds any backtracking to about a millisecond.)
_BWS = rb"[\t ]*"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:" + _BWS + rb";" + _BWS + _TOKEN +
                         rb"(?:" + _BWS + rb"=" + _BWS + rb"(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*")

REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 503: "Service Unavailable", 500: "Internal Server Error"}


@dataclass
class Request:
    method: str
    target: str  # as received (for logs only)
    version: str  # "1.0" | "1.1" as received; forwarded as HTTP/1.1
    path: str  # normalized path + query: what rules match and what the backend receives
    host: str
    headers: list[tuple[str, str]]  # end-to-end headers, original names, in order (Host included)
    body: str = "none"  # none | length | chunked
    length: int = 0
    codings: tuple[str, ...] = ()  # transfer codings before the final "chunked"
    keep_alive: bool = True
    upgrade: str = ""  # the offered upgrade protocols the proxy forwards (forwarded_upgrade); "" none
    expect_continue: bool = False

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    def framing_headers(self) -> list[tuple[str, str]]:
        if self.body == "length":
            return [("Content-Length", str(self.length))]
        if self.body == "chunked":
            return [("Transfer-Encoding", ", ".join((*self.codings, "chunked")))]
        return []

    def forwarded_headers(self) -> list[tuple[str, str]]:
        """Every header line the backend receives, in order."""
        out = list(self.headers) + self.framing_headers()
        if self.upgrade:
            out += [("Connection", "Upgrade"), ("Upgrade", self.upgrade)]
        return out

    def match_headers(self) -> dict[str, str]:
        """Headers as the rules see them: the forwarded ones, duplicates joined with "," (Envoy)."""
        out: dict[str, str] = {}
        lower: dict[str, str] = {}
        for name, value in self.forwarded_headers():
            key = lower.setdefault(name.lower(), name)
            out[key] = f"{out[key]},{value}" if key in out else value
        return out

    def serialize(self) -> bytes:
        """The head sent upstream, built from the parsed form only."""
        lines = [f"{self.method} {self.path} HTTP/1.1"]
        lines += [f"{n}: {v}" for n, v in self.forwarded_headers()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]  # end-to-end headers
    body: str = "none"  # none | length | chunked | close
    length: int = 0
    keep_alive: bool = True
    upgrade: str = ""
    content_length_header: str | None = None  # kept for HEAD/304 answers, which have no body
    extra: list[tuple[str, str]] = field(default_factory=list)


def _split_head(head: bytes, first_line_limit: int) -> tuple[bytes, list[tuple[str, str]]]:
    """Split a head ending in CRLFCRLF into its first line and validated (name, value) fields."""
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(400, "head does not end with CRLF CRLF")
    lines = head[:-4].split(b"\r\n")
    first = lines[0]
    if len(first) > first_line_limit:
        raise HttpError(431, "request line too long")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    fields = []
    for line in lines[1:]:
        m = _FIELD.fullmatch(line)
        if m is None:
            if line[:1] in (b" ", b"\t"):
                raise HttpError(400, "obsolete line folding")
            raise HttpError(400, f"malformed header line {line[:40]!r}")
        fields.append((m.group(1).decode("ascii"), m.group(2).strip(b" \t").decode("latin-1")))
    return first, fields


def upgrade_accepted(offered: str, switched_to: str) -> bool:
    """True if a 101's Upgrade names exactly one protocol, and one the forwarded request offered."""
    chosen = [t for t in switched_to.split(",") if t.strip()]
    offered_names = {_protocol_name(t) for t in offered.split(",") if t.strip()}
    return len(chosen) == 1 and _protocol_name(chosen[0]) in offered_names & FORWARDED_UPGRADES


def _content_length(values: list[str], status: int) -> int:
    if len(set(values)) != 1 or not values[0].isdigit() or not values[0].isascii() or len(values[0]) > 18:
        raise HttpError(status, f"invalid Content-Length {values!r}")
    return int(values[0])


def parse_request(head: bytes) -> Request:
    """Parse and validate a request head (ending in CRLFCRLF); raises HttpError."""
    first, fields = _split_head(head, MAX_REQUEST_LINE)
    method, target, version = parse_request_line(first)

    by_name: dict[str, list[str]] = {}
    for name, value in fields:
        by_name.setdefault(name.lower(), []).append(value)
    hosts = by_name.get("host", [])
    if len(hosts) != 1 or not _HOST.fullmatch(hosts[0]):
        # HTTP/1.0 allows no Host, but then host rules would see "" while the backend guesses:
        # we require Host on 1.0 too (documented deviation).
        raise HttpError(400, "missing, duplicate or malformed Host" if hosts else "missing Host header")
    host = hosts[0]

    req = Request(method, target, version, "", host, [])
    req.path = request_path(method, target, host)

    te, cl = by_name.get("transfer-encoding"), by_name.get("content-length")
    if te is not None:
        if version == "1.0":
            raise HttpError(400, "Transfer-Encoding on HTTP/1.0")
        if cl is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if len(te) != 1:
            raise HttpError(400, "more than one Transfer-Encoding header")
        codings = _tokens(te[0])
        if not codings or codings[-1] != "chunked" or "chunked" in codings[:-1] or \
                any(not re.fullmatch(_TOKEN.decode(), c) for c in codings):
            raise HttpError(400, f"unsupported Transfer-Encoding {te[0]!r}: the last coding must be chunked")
        req.body, req.codings = "chunked", tuple(codings[:-1])
    elif cl is not None:
        req.length = _content_length(cl, 400)
        req.body = "length" if req.length else "none"
        if req.length == 0:
            req.headers.append(("Content-Length", "0"))  # keep an explicit zero: some backends need it

    connection = [t for v in by_name.get("connection", []) for t in _tokens(v)]
    if "host" in (t.lower() for t in connection):
        # Connection would make Host hop-by-hop: the backend would get a request without the
        # Host the rules judged, and route it to whatever default it has. Envoy refuses it too.
        raise HttpError(400, "Connection names Host")
    req.keep_alive = ("close" not in connection) if version == "1.1" else ("keep-alive" in connection)
    upgrades = by_name.get("upgrade", [])
    if "upgrade" in connection and upgrades:
        if len(upgrades) != 1:
            raise HttpError(400, "more than one Upgrade header")
        # RFC 9110 7.8: an Upgrade in an HTTP/1.0 request is ignored; the proxy forwards as
        # HTTP/1.1, so it must drop it itself or the backend would honour it.
        req.upgrade = forwarded_upgrade(upgrades[0]) if version == "1.1" else ""
    expect = [t for v in by_name.get("expect", []) for t in _tokens(v)]
    req.expect_continue = "100-continue" in expect
    req.headers = [(n, v) for n, v in fields if n.lower() not in _hop_by_hop(connection)] + req.headers
    return req


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """Method, target and version ("1.0" | "1.1") of a request line (without CRLF); HttpError(400)
    for anything else. The stream checks every request line with this as soon as its CRLF
    arrives, so a line that cannot start an HTTP/1.x request (HTTP/0.9's `GET /path`, an HTTP/2
    preface, a response) is answered at once instead of waiting for a head that never ends."""
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise HttpError(400, f"malformed request line {line[:60]!r}")
    if (m.group(3), m.group(4)) not in ((b"1", b"0"), (b"1", b"1")):
        raise HttpError(400, "only HTTP/1.0 and HTTP/1.1 are served")
    return m.group(1).decode("ascii"), m.group(2).decode("ascii"), f"{m.group(3).decode()}.{m.group(4).decode()}"


def check_status_line(line: bytes) -> None:
    """HttpError(502) unless `line` is an HTTP/1.x status line (checked by the stream as soon as
    an upstream's first line is complete; parse_response parses it again with the head)."""
    if _STATUS_LINE.fullmatch(line) is None:
        raise HttpError(502, f"upstream sent a malformed status line {line[:60]!r}")


def parse_response(head: bytes, request: Request) -> Response:
    """Parse an upstream response head; ambiguous framing raises HttpError(502)."""
    try:
        first, fields = _split_head(head, MAX_HEAD)
    except HttpError as exc:
        raise HttpError(502, f"upstream sent a malformed head: {exc.reason}") from None
    m = _STATUS_LINE.fullmatch(first)
    if m is None:
        raise HttpError(502, f"upstream sent a malformed status line {first[:60]!r}")
    resp = Response("1." + m.group(1).decode(), int(m.group(2)), (m.group(3) or b"").decode("latin-1"), [])
    by_name: dict[str, list[str]] = {}
    for name, value in fields:
        by_name.setdefault(name.lower(), []).append(value)
    connection = [t for v in by_name.get("connection", []) for t in _tokens(v)]
    resp.keep_alive = ("close" not in connection) if resp.version == "1.1" else ("keep-alive" in connection)
    te, cl = by_name.get("transfer-encoding"), by_name.get("content-length")
    if cl is not None:
        resp.content_length_header = cl[0]
    if resp.status == 101:
        # Every Upgrade line, joined: a 101 naming more than one protocol is refused by the relay.
        resp.upgrade = ", ".join(by_name.get("upgrade", []))
    no_body = request.method == "HEAD" or resp.status < 200 or resp.status in (204, 304) or \
        (request.is_connect and 200 <= resp.status < 300)
    if no_body:
        resp.body = "none"
    elif te is not None:
        if cl is not None:
            raise HttpError(502, "upstream sent both Content-Length and Transfer-Encoding")
        codings = [t for v in te for t in _tokens(v)]
        if not codings or codings[-1] != "chunked" or "chunked" in codings[:-1]:
            # RFC 9112 6.3 would read such a body until close; no sane backend sends it, and
            # relaying it would need a second framing path: refuse it.
            raise HttpError(502, f"upstream sent Transfer-Encoding {te!r} without a final chunked")
        resp.body = "chunked"
        # Only "chunked" is decoded and re-encoded; other codings stay on the payload and are
        # announced again in front of our own "chunked".
        resp.extra = [("Transfer-Encoding", ", ".join(codings[:-1]))] if len(codings) > 1 else []
    elif cl is not None:
        resp.length = _content_length(cl, 502)
        resp.body = "length"
    else:
        resp.body = "close"
    resp.headers = [(n, v) for n, v in fields if n.lower() not in _hop_by_hop(connection)]
    return resp


def parse_chunk_size(line: bytes) -> int:
    """Size of a chunk-size line (without CRLF); extensions are validated and dropped."""
    m = _CHUNK_LINE.fullmatch(line)
    if m is None:
        raise HttpError(400, f"invalid chunk size line {line[:40]!r}")
    return int(m.group(1), 16)


def validate_trailer(line: bytes) -> None:
    if _FIELD.fullmatch(line) is None:
        raise HttpError(400, f"malformed trailer line {line[:40]!r}")


def response_head(version: str, status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/{version} {status} {reason}"] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


DENIED_BODY = b"Access denied\r\n"


def denied_response(close: bool = False) -> bytes:
    """Envoy's answer to a request the L7 rules deny (Cilium's "Access denied")."""
    headers = [("Content-Length", str(len(DENIED_BODY))), ("Content-Type", "text/plain")]
    if close:
        headers.append(("Connection", "close"))
    return response_head("1.1", 403, "Forbidden", headers) + DENIED_BODY


def error_response(status: int) -> bytes:
    """A protocol error answer; the connection is closed after it."""
    body = f"{REASONS.get(status, 'Error')}\r\n".encode()
    return response_head("1.1", status, REASONS.get(status, "Error"),
                         [("Content-Length", str(len(body))), ("Content-Type", "text/plain"),
                          ("Connection", "close")]) + body
