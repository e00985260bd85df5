"""A corpus of request-smuggling, framing and path-normalization attacks.

The corpus is tests.support.attacks.CORPUS; the rules are tests.support.loopback.POLICY:
GET|HEAD /public(/.*)?, POST|PUT /upload, ... ; /private, /admin are never allowed. Each case sends raw bytes and expects the proxy's first answer (400/403/431, or
200 when the request is normalized into an allowed one). Whatever the answer, the invariant is
checked on the backend's own record: every request the backend parsed (with llhttp, a lenient
real-world parser) is one the rules allow, and the proxy forwarded only heads it built itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.attacks import CORPUS, SMUGGLED
from tests.support.http import Pieces




def allowed_by_rules(lab, seen) -> bool:
    headers = {}
    for n, v in seen.headers:
        headers[n] = f"{headers[n]},{v}" if n in headers else v
    snap = lab.proxy.snapshot
    cp = snap.connection("127.0.0.2", lab.backend.host, lab.backend.port)
    return snap.judge(cp, seen.method, seen.url, headers).allowed


@pytest.mark.parametrize("name", list(CORPUS))
def test_attack(fresh, name):
    data, expected = CORPUS[name]
    c = fresh.client()
    try:
        c.send(data + SMUGGLED.encode())  # a request that must be denied follows every case
        first = c.read_response()
        assert first.status == expected, (name, first)
        if expected in (400, 431):
            assert first.headers.get("connection") == "close"
            assert c.closed()
        else:  # the connection is still in sync: the trailing /private is answered 403
            assert c.read_response().status == 403
    finally:
        c.close()
    for seen in fresh.backend.requests:
        assert allowed_by_rules(fresh, seen), (name, seen)
    assert all(s.url not in ("/private", "/admin") for s in fresh.backend.requests)
    # Every head the backend got was re-serialized by the proxy: canonical request line, no
    # framing header the client wrote verbatim unless we produced the same.
    for conn in fresh.backend.conns:
        assert conn.raw == b"" or conn.raw.split(b"\r\n", 1)[0].endswith(b" HTTP/1.1")
    if expected == 200:
        assert len(fresh.backend.requests) == 1


def test_slow_client_byte_by_byte(fresh):
    c = fresh.client()
    for b in b"GET /public/slow HTTP/1.1\r\nHost: backend\r\n\r\n":
        c.send(bytes([b]))
    assert c.read_response().status == 200
    for b in b"GET /public/../private HTTP/1.1\r\nHost: backend\r\n\r\n":
        c.send(bytes([b]))
    assert c.read_response().status == 403
    for b in b"GET /public HTTP/1.1\nHost: backend\n\n":  # bare LF: refused as soon as seen
        c.send(bytes([b]))
    assert c.read_response().status == 400
    c.close()
    assert [s.url for s in fresh.backend.requests] == ["/public/slow"]


def test_forwarded_head_is_canonical(fresh):
    c = fresh.client()
    c.send(b"GET /public/./a//b?x=%2e HTTP/1.1\r\nhost:backend\r\nX-A:   v  \r\nConnection: keep-alive, X-A\r\n"
           b"Keep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: x\r\n\r\n")
    assert c.read_response().status == 200
    c.close()
    # X-A is named by Connection: hop-by-hop, so neither forwarded nor seen by the rules.
    assert fresh.backend.raw == b"GET /public/a/b?x=%2e HTTP/1.1\r\nhost: backend\r\n\r\n"


def test_a_head_that_never_completes_gets_408_and_is_not_forwarded(fresh, monkeypatch):
    import dataclasses

    monkeypatch.setattr(fresh.proxy, "limits", dataclasses.replace(fresh.proxy.limits, header_timeout=0.3))
    c = fresh.client()
    c.send(b"GET /public/never HTTP/1.1\r\nHost: back")  # and then nothing
    r = c.read_response()
    assert r.status == 408 and r.headers.get("connection") == "close"
    c.close()
    assert "/public/never" not in [s.url for s in fresh.backend.requests]


# --------------------------------------------------------------------------- answered at once

@pytest.mark.parametrize("first_line", [b"GET /public", b"GET /public HTTP/0.9", b"PRI * HTTP/2.0",
                                        b"GET /public HTTP/1.1 x", b"HTTP/1.1 200 OK", b"GET  /public HTTP/1.1"])
@pytest.mark.parametrize("delivery", ["one write", "byte by byte", "with a header after it"])
def test_a_first_line_that_cannot_be_http1_is_answered_at_once(fresh, first_line, delivery):
    """HTTP/0.9's `GET /path` CRLF (and any first line that cannot start an HTTP/1.0 or 1.1
    request) gets its 400 as soon as the line is complete, not after the 60 s head timeout:
    no empty line ever follows here, so a proxy that waits for the end of the head hangs."""
    c = fresh.client()
    c.sock.settimeout(10)  # well below the 60 s head timeout
    data = first_line + b"\r\n" + (b"Host: backend\r\n" if delivery == "with a header after it" else b"")
    try:
        if delivery == "byte by byte":
            for b in data:
                c.send(bytes([b]))
        else:
            c.send(data)
        r = c.read_response()
        assert r.status == 400 and r.headers.get("connection") == "close"
        assert c.closed()
    finally:
        c.close()
    assert fresh.backend.raw == b""


class _ThenSilence:
    """A reader that hands out the given bytes and then nothing, without ever closing."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        if not self.data:
            await asyncio.Event().wait()  # a peer that keeps the connection open and says no more
        data, self.data = self.data[:n], self.data[n:]
        return data


@pytest.mark.parametrize("side, first_line, status", [
    ("request", b"GET /public", 400), ("request", b"PRI * HTTP/2.0", 400), ("request", b"HTTP/1.1 200 OK", 400),
    ("response", b"SSH-2.0-OpenSSH_9.2", 502), ("response", b"HTTP/2 200", 502), ("response", b"GET / HTTP/1.1", 502),
])
def test_the_first_line_is_judged_without_waiting_for_the_rest_of_the_head(side, first_line, status):
    """Both sides: a first line that cannot start an HTTP/1.x message is refused as soon as its
    CRLF is in, while the peer still holds the connection open (no end of head, no close)."""
    from l7.http import HttpError
    from proxy.stream import BufferedStream

    async def first_answer() -> int:
        stream = BufferedStream(_ThenSilence(first_line + b"\r\nX: y\r\n"), None)
        with pytest.raises(HttpError) as exc:
            await asyncio.wait_for(stream.read_head(400 if side == "request" else 502), 10)
        return exc.value.status

    assert asyncio.run(first_answer()) == status


# --------------------------------------------------------------------------- line limits, however split

def test_a_64k_chunk_extension_is_refused_in_one_write(fresh):
    """The chunk-size line limit (4 KiB) holds when the line's CRLF arrives in the same read."""
    c = fresh.client()
    try:
        c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;a=" + b"x" * 65536 + b"\r\nhello\r\n0\r\n\r\n")
        r = c.read_response()
        assert r.status == 400 and r.headers.get("connection") == "close"
        assert c.closed()
    finally:
        c.close()
    assert fresh.backend.requests == []  # the backend never saw a complete request


def test_an_overlong_request_line_is_refused_when_its_crlf_arrives(fresh):
    """A request line over 16 KiB gets 431 once its CRLF is in, not when (if ever) the head ends."""
    c = fresh.client()
    c.sock.settimeout(10)
    try:
        c.send(b"GET /public/" + b"a" * (17 * 1024) + b" HTTP/1.1\r\nHost: backend\r\n")  # no end of head
        r = c.read_response()
        assert r.status == 431 and c.closed()
    finally:
        c.close()
    assert fresh.backend.raw == b""


async def _read(kind: str, pieces: list[bytes]):
    """What the proxy makes of these bytes: ("head", head), ("body", decoded body, rest) or
    (status, reason) for a refusal, "closed" for a message cut short."""
    from l7.http import HttpError
    from proxy.http import parse_request
    from proxy.stream import BufferedStream, PeerClosed

    stream = BufferedStream(Pieces(pieces), None)
    try:
        if kind in ("head", "response"):
            head = await stream.read_head(400 if kind == "head" else 502)
            if head is not None and kind == "head":
                parse_request(head)
            return ("head", head, bytes(stream.buf))
        body = b"".join([piece async for piece in stream.body("chunked", framed=False)])
        return ("body", body, bytes(stream.buf))
    except HttpError as exc:
        return (exc.status, exc.reason)
    except PeerClosed:
        return "closed"


def outcome(kind: str, pieces: list[bytes]):
    return asyncio.run(_read(kind, pieces))


def splits(data: bytes, points: set[int]) -> dict[str, list[bytes]]:
    """The same bytes in one write, byte by byte, and cut in two at each of `points`."""
    out = {"one write": [data], "byte by byte": [data[i:i + 1] for i in range(len(data))]}
    for p in sorted(points):
        if 0 < p < len(data):
            out[f"cut at {p}"] = [data[:p], data[p:]]
    return out


def _around(*positions: int) -> set[int]:
    return {p + d for p in positions for d in (-1, 0, 1, 2)}


def _limit_cases() -> dict[str, tuple[str, bytes, object, set[int]]]:
    """name -> (what is read, bytes, expected outcome, where to cut): each limit exactly met and
    exceeded by one byte; cuts around the limited line's CRLF and around the limit itself."""
    from proxy.http import MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_REQUEST_LINE

    cases = {}
    start = b"GET / HTTP/1.1\r\nHost: b\r\n"
    for extra, ok in ((0, True), (1, False)):
        line = b"GET /" + b"a" * (MAX_REQUEST_LINE + extra - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
        cases[f"request line of {len(line)} bytes"] = (
            "head", line + b"\r\nHost: b\r\n\r\n", "head" if ok else 431, _around(len(line), MAX_REQUEST_LINE))
        data = start + b"X: " + b"v" * (MAX_HEAD + extra - len(start) - 3 - 4) + b"\r\n\r\n"
        cases[f"head of {len(data)} bytes"] = ("head", data, "head" if ok else 431,
                                               _around(len(data) - 4, MAX_HEAD - 4))
        last = len(start) + sum(len(b"X-%d: v\r\n" % i) for i in range(MAX_HEADERS - 1))
        data = start + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 1 + extra)) + b"\r\n"
        cases[f"{MAX_HEADERS + extra} header fields"] = ("head", data, "head" if ok else 431,
                                                          _around(last, len(data) - 2))

        line = b"5;a=" + b"x" * (MAX_CHUNK_LINE + extra - 4)
        cases[f"chunk-size line of {len(line)} bytes"] = (
            "chunked", line + b"\r\nhello\r\n0\r\n\r\n", "body" if ok else 400, _around(len(line), MAX_CHUNK_LINE))
        trailer = b"X: " + b"t" * (MAX_HEAD + extra - 3 - 4)  # the section: trailer CRLF CRLF
        cases[f"trailer section of {len(trailer) + 4} bytes"] = (
            "chunked", b"0\r\n" + trailer + b"\r\n\r\n", "body" if ok else 431,
            _around(3 + len(trailer), 3 + MAX_HEAD - 4))
        fields = b"".join(b"T-%d: v\r\n" % i for i in range(MAX_HEADERS + extra))
        last = 3 + sum(len(b"T-%d: v\r\n" % i) for i in range(MAX_HEADERS))
        cases[f"{MAX_HEADERS + extra} trailer fields"] = (
            "chunked", b"0\r\n" + fields + b"\r\n", "body" if ok else 431, _around(last, 3 + len(fields)))
    cases["64 KiB chunk extension"] = ("chunked", b"5;a=" + b"x" * 65536 + b"\r\nhello\r\n0\r\n\r\n", 400,
                                       _around(4 + 65536, MAX_CHUNK_LINE))
    return cases


LIMIT_CASES = _limit_cases()


@pytest.mark.parametrize("name", list(LIMIT_CASES))
def test_line_limits_hold_however_the_bytes_are_split(name):
    """Request line, header lines, chunk-size lines and trailers: the same answer for the same
    bytes in one write, byte by byte, and cut at every boundary around the CRLF and the limit."""
    kind, data, expected, points = LIMIT_CASES[name]
    results = {how: outcome(kind, pieces) for how, pieces in splits(data, points).items()}
    first = results["one write"]
    assert (first[0] if isinstance(first, tuple) else first) == expected, first
    different = {how: r for how, r in results.items() if r != first}
    assert not different, (first, different)


_FRAGMENTS = [b"GET / HTTP/1.1", b"HTTP/1.1 200 OK", b"Host: b", b"X: v", b"\r\n", b"\r", b"\n", b"\x00", b"a",
              b"aaaaaaa", b" ", b"\t", b":", b"5", b"0", b"ff", b";", b"=", b"\"", b"\\", b"x=\"y\"", b"hello"]


@settings(max_examples=200, deadline=None, database=None)
@given(kind=st.sampled_from(["head", "response", "chunked"]),
       data=st.lists(st.sampled_from(_FRAGMENTS), max_size=30).map(b"".join),
       cuts=st.sets(st.integers(min_value=1, max_value=200), max_size=6))
def test_any_bytes_get_the_same_answer_however_split(kind, data, cuts):
    """With small limits (so generated messages reach them), every verdict -- accepted, refused
    (status and reason) or cut short -- is the same in one write, byte by byte and cut anywhere."""
    import proxy.http
    import proxy.stream

    small = {"MAX_HEAD": 48, "MAX_REQUEST_LINE": 20, "MAX_HEADERS": 2, "MAX_CHUNK_LINE": 10}
    with contextlib.ExitStack() as stack:
        for module in (proxy.http, proxy.stream):
            for name, value in small.items():
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, value))
        one = outcome(kind, [data])
        points = sorted(p for p in cuts if p < len(data))
        pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
        assert outcome(kind, pieces) == one
        assert outcome(kind, [data[i:i + 1] for i in range(len(data))]) == one
