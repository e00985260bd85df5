"""The fuzz targets: one harness per parser, each with its oracle of "correct".

A harness takes the raw fuzz bytes and returns normally when the parser behaved; anything else
(an exception other than the module's own clean error, or a failed property, raised as
`FuzzFailure`) is a finding. Hangs are caught by the driver's timeout (libFuzzer `-timeout`).

* `http_request` -- `proxy.http.parse_request` over one request head, and `normalize_path`.
  Clean: `HttpError` with 400 or 431. Properties: an accepted head re-serializes (the head the
  backend receives) into a head that parses again to the same method, path, host, headers,
  framing and upgrade; a normalized path is a fixed point of `normalize_path`.
* `chunked_body` -- `proxy.stream.BufferedStream.body("chunked")` (so `parse_chunk_size` and
  `validate_trailer`) fed from an in-memory `asyncio.StreamReader`. Clean: `HttpError` 400/431
  or `PeerClosed` (the stream ended inside the body). Properties: the re-encoded body decodes to
  the same data with nothing left over; the bytes after the body are left untouched; the answer
  is the same however the bytes are split across reads.
* `dns_query` -- `proxy.dns.DnsProxy` deciding on one datagram (drop, FORMERR, REFUSED or
  forward) under the policy of `scenarios/dns-policy.yaml`. Clean: one of those decisions and
  never "internal error"; an answer is a DNS response to the query; only a standard query with
  one question that the rules allow is forwarded.
* `policy_yaml` -- what `l7lab validate`/`apply`/`run` do with a file: `load_documents`, then a
  scenario (`parse_scenario`, then `PolicyEngine`) or policy manifests (`parse_documents`, then
  the resolver through `PolicyEngine`). Clean: `SourceError` or `ErrorList`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode

from dataplane.errors import ErrorList, SourceError
from dataplane.abi import PROTO_UDP
from dataplane.policy import PolicyEngine, parse_documents
from dataplane.scenario import PolicySource, Scenario, load_scenario, parse_scenario
from dataplane.yamlsource import Budget, load_documents
from proxy.dns import DnsProxy
from l7.http import HttpError, normalize_path
from proxy.http import Request, parse_request
from proxy.state import Snapshot
from proxy.stream import LAST_CHUNK, BufferedStream, PeerClosed

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


class FuzzFailure(AssertionError):
    """A property the parser must keep was broken (the message says which and how)."""


class KnownDefect(FuzzFailure):
    """A failure of a kind already found and kept as a strict xfail regression test
    (`tests/unit/fuzz_corpus_xfail/`): the long campaign counts these and keeps going, so that
    it can look for other findings. Remove its check here once the defect is fixed."""

    def __init__(self, defect: str, message: str) -> None:
        super().__init__(f"known defect {defect}: {message}")
        self.defect = defect


# The defects fuzzing found that are not fixed yet, each with the test that keeps it (none now:
# "connection-names-host" and "chunk-line-limit-split" were fixed, and their inputs are replayed
# from tests/unit/fuzz_corpus/).
KNOWN_DEFECTS: dict[str, str] = {}


def _clean_http_error(exc: HttpError, allowed: tuple[int, ...] = (400, 431)) -> None:
    if exc.status not in allowed:
        raise FuzzFailure(f"HttpError with status {exc.status} ({exc.reason}); expected one of {allowed}")


# ------------------------------------------------------------------ (a) request heads and paths


def _visible(req: Request) -> tuple:
    """What the rules check and the backend receives of a request."""
    return req.method, req.path, req.host, req.match_headers(), req.body, req.length, req.codings, req.upgrade


def http_request(data: bytes) -> None:
    end = data.find(b"\r\n\r\n")
    head = data[:end + 4] if end >= 0 else data + b"\r\n\r\n"
    try:
        req = parse_request(head)
    except HttpError as exc:
        _clean_http_error(exc)
    else:
        sent = req.serialize()
        try:
            again = parse_request(sent)
        except HttpError as exc:
            raise FuzzFailure(f"the head sent upstream does not parse again ({exc}): {sent!r}") from None
        if _visible(again) != _visible(req):
            raise FuzzFailure(f"re-serialized head parses differently:\n  first  {_visible(req)!r}\n"
                              f"  second {_visible(again)!r}\n  head sent upstream {sent!r}")
    path = data.decode("latin-1")
    path = path if path.startswith("/") else "/" + path
    try:
        normal = normalize_path(path)
    except HttpError as exc:
        _clean_http_error(exc, (400,))
        return
    if not normal.startswith("/") or normalize_path(normal) != normal:
        raise FuzzFailure(f"normalize_path is not idempotent: {path!r} -> {normal!r} -> "
                          f"{normalize_path(normal)!r}")


# ------------------------------------------------------------------ (b) chunked bodies

# Read sizes for the split delivery: the first input byte picks one, the rest is the stream.
READ_SIZES = (1, 2, 3, 5, 7, 16, 64, 1000, 4095, 4096, 4097, 8192)
_loop: asyncio.AbstractEventLoop | None = None


class _TrickleReader(asyncio.StreamReader):
    """A StreamReader whose reads return at most `step` bytes: the network splitting a stream."""

    def __init__(self, step: int) -> None:
        super().__init__(limit=2 ** 20)
        self.step = step

    async def read(self, n: int = -1) -> bytes:
        return await super().read(n if n < 0 else min(n, self.step))


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop


async def _decode(stream_bytes: bytes, step: int, framed: bool) -> tuple[Any, bytes, bytes]:
    """(outcome, body bytes, bytes left after the body); outcome "ok", "closed" or the status."""
    reader = _TrickleReader(step)
    reader.feed_data(stream_bytes)
    reader.feed_eof()
    stream = BufferedStream(reader, None)  # type: ignore[arg-type] - never written to
    out = bytearray()
    last = False
    try:
        async for piece in stream.body("chunked", framed=framed):
            if last:
                raise FuzzFailure("the decoder yielded data after the last chunk")
            last = piece is LAST_CHUNK
            out += piece
    except HttpError as exc:
        _clean_http_error(exc)
        return exc.status, bytes(out), b""
    except PeerClosed:
        return "closed", bytes(out), b""
    if framed and not last:
        raise FuzzFailure("a re-encoded body ended without the last chunk")
    rest = bytes(stream.buf) + await reader.read()
    return "ok", bytes(out), rest


def chunked_body(data: bytes) -> None:
    if not data:
        return
    step, stream_bytes = READ_SIZES[data[0] % len(READ_SIZES)], data[1:]
    run = _event_loop().run_until_complete
    whole = run(_decode(stream_bytes, len(stream_bytes) + 1, framed=True))
    split = run(_decode(stream_bytes, step, framed=True))
    if whole != split:
        raise FuzzFailure(f"the answer depends on how the bytes are split: in one read {whole[0]!r}, "
                          f"in reads of {step} {split[0]!r} (body {len(whole[1])}/{len(split[1])} bytes, "
                          f"left over {len(whole[2])}/{len(split[2])} bytes)")
    outcome, encoded, rest = whole
    if outcome != "ok":
        return
    if rest != stream_bytes[len(stream_bytes) - len(rest):]:
        raise FuzzFailure("the bytes after the body are not the input's own")
    decoded = run(_decode(stream_bytes, len(stream_bytes) + 1, framed=False))
    again = run(_decode(encoded, len(encoded) + 1, framed=False))
    if again[0] != "ok" or again[2] != b"" or again[1] != decoded[1]:
        raise FuzzFailure(f"the re-encoded body {encoded[:80]!r} does not decode to the same data "
                          f"({again[0]!r}, {len(again[1])} vs {len(decoded[1])} bytes, {len(again[2])} left over)")


# ------------------------------------------------------------------ (c) DNS datagrams


class _Events:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def emit(self, record: Any) -> None:
        self.records.append(record)


class _Server:
    """What DnsProxy needs of the proxy server: a snapshot and an event sink."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.events = _Events()
        self.transparent = False
        self.mark = False
        self.original_dst = None
        self.learner = None  # no FQDN learner: answers are released as they come


class _DecidingDnsProxy(DnsProxy):
    """DnsProxy with the network taken out: answers are kept, the server echoes the query."""

    def __init__(self, server: _Server) -> None:
        super().__init__(server)  # type: ignore[arg-type]
        self.answers: list[bytes] = []
        self.forwarded: list[bytes] = []

    def answer(self, src: tuple[str, int], client: tuple[str, int], data: bytes) -> None:
        self.answers.append(data)

    async def ask_upstream(self, cp: Any, dst: tuple[str, int], data: bytes, query_id: int) -> bytes | None:
        self.forwarded.append(data)
        reply = bytearray(data)
        if len(reply) > 2:
            reply[2] |= 0x80  # QR: the server "answers" with the query itself, whatever it holds
        return bytes(reply)


_dns: tuple[_DecidingDnsProxy, str, str] | None = None


def _dns_proxy() -> tuple[_DecidingDnsProxy, str, str]:
    """The proxy under scenarios/dns-policy.yaml; mediabot may ask kube-dns about *.example.com."""
    global _dns
    if _dns is None:
        scenario = load_scenario(SCENARIOS / "dns-policy.yaml")
        state = PolicyEngine(scenario).map_state()
        ips = {ep.name: ep.ip for ep in state.endpoints.values()}
        client = next(ip for name, ip in ips.items() if name.endswith("mediabot"))
        server = next(ip for name, ip in ips.items() if name.endswith("kube-dns"))
        _dns = (_DecidingDnsProxy(_Server(Snapshot(state))), client, server)
    return _dns


def dns_query(data: bytes) -> None:
    proxy, client, server = _dns_proxy()
    proxy.answers.clear()
    proxy.forwarded.clear()
    proxy.server.events.records.clear()
    _event_loop().run_until_complete(proxy.handle(data, (client, 40000), (server, 53)))
    records = proxy.server.events.records
    if len(records) != 1:
        raise FuzzFailure(f"expected one record per datagram, got {len(records)}")
    reason = records[0].summary
    if "internal error" in reason:
        raise FuzzFailure(f"the DNS proxy failed on a datagram: {reason}")
    if len(proxy.answers) > 1:
        raise FuzzFailure("more than one answer to one datagram")
    if proxy.forwarded:
        if proxy.forwarded != [data]:
            raise FuzzFailure("forwarded something other than the datagram received")
        query = dns.message.from_wire(data)  # it was checked: it must parse
        if query.flags & dns.flags.QR or query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            raise FuzzFailure("forwarded a datagram that is not a standard query with one question")
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        if not proxy.server.snapshot.judge_dns(
                proxy.server.snapshot.connection(client, server, 53, PROTO_UDP), name).allowed:
            raise FuzzFailure(f"forwarded a question the rules refuse: {name!r}")
    for answer in proxy.answers:
        reply = dns.message.from_wire(answer)
        if not reply.flags & dns.flags.QR or (proxy.answers and not proxy.forwarded and reply.rcode() not in
                                              (dns.rcode.FORMERR, dns.rcode.REFUSED)):
            raise FuzzFailure(f"the proxy's own answer is not FORMERR/REFUSED: rcode {reply.rcode()}")
        if int.from_bytes(answer[:2], "big") != int.from_bytes(data[:2], "big"):
            raise FuzzFailure("the answer's id is not the query's")


# ------------------------------------------------------------------ (d) scenario and policy YAML


def _is_scenario(docs: list) -> bool:
    """As `l7lab validate` tells a scenario from policy manifests."""
    return len(docs) == 1 and isinstance(docs[0].data, dict) and "apiVersion" not in docs[0].data \
        and "kind" not in docs[0].data


_policy_scenario: Scenario | None = None


def policy_yaml(data: bytes) -> None:
    global _policy_scenario
    try:
        text = data.decode("utf-8")  # read_source refuses other bytes before parsing
    except UnicodeDecodeError:
        return
    source = str(SCENARIOS / "fuzz-input.yaml")  # relative policy files resolve to scenarios/
    try:
        budget = Budget(what="a scenario and the policy files it names")
        docs = load_documents(text, source, budget)
        if _is_scenario(docs):
            PolicyEngine(parse_scenario(docs[0], Path(source), budget))
        else:
            policies = parse_documents(docs)
            if policies:  # resolve them as a lab would: the retail pods, these policies
                if _policy_scenario is None:
                    _policy_scenario = load_scenario(SCENARIOS / "retail.yaml")
                PolicyEngine(replace(_policy_scenario, policies=tuple(PolicySource(d) for d in docs))).map_state()
    except (SourceError, ErrorList):
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "http_request": http_request,
    "chunked_body": chunked_body,
    "dns_query": dns_query,
    "policy_yaml": policy_yaml,
}
