"""Bodies both ways (Content-Length, chunked, close-delimited, large), HEAD, Expect, upgrades,
CONNECT, HTTP/1.0 clients and upstream failures."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.http import pattern_bytes

MB = 1024 * 1024


def test_large_upload_content_length(fresh):
    body = pattern_bytes(20 * MB)
    c = fresh.client()
    c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.send(body)
    r = c.read_response()
    assert r.status == 200
    assert r.body.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    assert c.request("GET", "/public").status == 200  # still in sync
    c.close()


def test_large_upload_chunked(fresh):
    body = pattern_bytes(3 * MB + 17)
    c = fresh.client()
    c.send(b"PUT /upload HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(body), 100_003):
        piece = body[i:i + 100_003]
        c.send(b"%x;n=%d\r\n%b\r\n" % (len(piece), i, piece))
    c.send(b"0\r\nX-Checksum: 1\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.body.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    c.close()
    head = fresh.backend.raw.split(b"\r\n\r\n", 1)[0]
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert b";n=" not in fresh.backend.raw  # extensions are dropped


def test_denied_large_upload_is_discarded(fresh):
    body = pattern_bytes(5 * MB)
    c = fresh.client()
    c.send(b"POST /private HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert c.read_response().status == 403
    assert c.request("GET", "/public").status == 200
    c.close()
    assert sum(conn.total for conn in fresh.backend.conns) < 1000  # the 5 MB never went upstream
    assert [s.url for s in fresh.backend.requests] == ["/public"]


def test_large_download_content_length_streamed(fresh):
    n = 20 * MB
    got = [0]
    c = fresh.client()
    c.send(b"GET /big/%d HTTP/1.1\r\nHost: backend\r\n\r\n" % n)
    r = c.read_response(sink=lambda piece: got.__setitem__(0, got[0] + len(piece)))
    assert r.status == 200 and r.headers["content-length"] == str(n) and got[0] == n
    assert c.request("GET", "/public").status == 200
    c.close()


def test_chunked_download(fresh):
    c = fresh.client()
    r = c.request("GET", "/chunked/300000")
    assert r.status == 200 and r.headers["transfer-encoding"] == "chunked" and len(r.body) == 300000
    assert c.request("GET", "/public").status == 200
    c.close()


def test_close_delimited_response_is_rechunked_for_http11(fresh):
    c = fresh.client()
    r = c.request("GET", "/close/70000")
    assert r.status == 200 and r.headers["transfer-encoding"] == "chunked" and len(r.body) == 70000
    assert c.request("GET", "/public").status == 200  # the client connection survives
    c.close()


def test_http10_client(fresh):
    c = fresh.client()
    c.send(b"GET /chunked/1000 HTTP/1.0\r\nHost: backend\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and len(r.body) == 1000 and "transfer-encoding" not in r.headers
    c.close()
    c = fresh.client()
    c.send(b"GET /public HTTP/1.0\r\nHost: backend\r\nConnection: keep-alive\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.headers["connection"] == "keep-alive"
    c.send(b"GET /public/2 HTTP/1.0\r\nHost: backend\r\n\r\n")
    assert c.read_response().status == 200
    assert c.closed()
    c.close()


def test_head(fresh):
    c = fresh.client()
    r = c.request("HEAD", "/public")
    assert r.status == 200 and r.headers["content-length"] == str(len(b"ok HEAD /public"))
    assert c.request("GET", "/public").status == 200
    c.close()


def test_expect_continue(fresh):
    c = fresh.client()
    c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello")
    assert c.read_response().status == 200
    c.close()
    c = fresh.client()
    c.send(b"POST /private HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    r = c.read_response()
    assert r.status == 403 and r.headers["connection"] == "close" and r.body == b"Access denied\r\n"
    assert c.closed()
    c.close()


def test_upgrade_becomes_a_tunnel(fresh):
    c = fresh.client()
    c.send(b"GET /upgrade HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    r = c.read_response()
    assert r.status == 101 and r.headers["upgrade"] == "websocket"
    c.send(b"hello tunnel")
    got = b""
    while len(got) < 12:
        got += c.sock.recv(100)
    assert got == b"HELLO TUNNEL"
    c.close()


def test_upgrade_is_checked_like_any_request(fresh):
    c = fresh.client()
    c.send(b"GET /private HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert c.read_response().status == 403
    c.close()
    assert fresh.backend.raw == b""


def test_connect_is_checked_like_any_method(fresh):
    c = fresh.client("127.0.0.4")  # stranger: refused
    c.send(b"CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\n\r\n")
    assert c.read_response().status == 403
    c.close()
    c = fresh.client()
    c.send(b"CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\n\r\n")
    assert c.read_response(head_only=True).status == 200  # a 2xx to CONNECT has no body
    c.send(b"abc")
    got = b""
    while len(got) < 3:
        got += c.sock.recv(10)
    assert got == b"ABC"
    c.close()


def test_upstream_unreachable_allowed_request_is_503(fresh):
    """Allowed request, backend gone: 503, nothing crashes, the event says error."""
    fresh.loop.run(fresh.backend.stop())
    try:
        c = fresh.client()
        r = c.request("GET", "/public")
        assert r.status == 503
        c.close()
        assert fresh.proxy.events.records[-1].verdict == "error"
    finally:
        fresh.loop.run(fresh.backend.restart())


VALID_CHUNK_EXTENSIONS = [
    b';name="a \\"b\\" \\\\ c"',  # quoted-string with escaped quotes and an escaped backslash
    b' ;a=b',  # BWS before ";" (RFC 9112 7.1.1)
    b'\t; a = b',  # BWS around ";" and "="
    b' ; a = "x;y=\\"z\\"" ; b ;c="" ',  # several, one quoted value holding ";" and "="
]


@pytest.mark.parametrize("ext", VALID_CHUNK_EXTENSIONS, ids=lambda e: e.decode())
def test_valid_chunk_extensions_are_accepted_and_dropped(fresh, ext):
    """RFC 9112 7.1.1 chunk extensions are accepted; the backend gets the same chunks with no
    extension (re-framed from the validated sizes), so it never has to parse them itself."""
    ext = ext.rstrip(b" ")  # nothing may follow the last extension
    c = fresh.client()
    c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5" + ext + b"\r\nhello\r\n6" + ext + b"\r\n world\r\n0\r\n\r\n")
    r = c.read_response()
    assert r.status == 200
    assert r.body.decode() == f"11 {hashlib.sha256(b'hello world').hexdigest()}"
    assert c.request("GET", "/public").status == 200  # still in sync
    c.close()
    body = fresh.backend.raw.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")


@pytest.mark.parametrize("line", [
    b"5;a=\"x", b"5;a=\"x\\\"", b"5;a=\"x\x01\"", b"5;a=\"\\\x01\"", b"5;a=\"x\x7f\"", b"5;a ", b"5 ", b" 5",
    b"5 5", b"5;", b"5;=a", b"5;a=", b"5;a b", b"5;a=b c", b"5\x0b;a", b"0x5", b"+5", b"10000000000000005", b"g",
])
def test_ambiguous_chunk_size_lines_are_refused(line):
    from l7.http import HttpError
    from proxy.http import parse_chunk_size

    with pytest.raises(HttpError) as exc:
        parse_chunk_size(line)
    assert exc.value.status == 400
