"""L7 enforcement on real redirected connections (issue 5): keep-alive with allowed and denied
requests interleaved, pipelining, large and chunked bodies both ways, slow clients and readers.

Every connection is opened inside the frontend pod's namespace to backend:8080; the datapath
assigns it in the kernel to the lab's L7 proxy. What the backend really received is read from
its own requests log, never inferred from the answers.
"""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane.abi import DropReason, FlowVerdict
from tests.conftest import unique_lab
from tests.support.http import Resp, request_bytes
from tests.support.l7_lab import (ACCESS_DENIED, CONNECT_DROP_TIMEOUT, L7_PORT, L7Lab, assert_denied,
                                  backend_json, close_l7_lab, open_l7_lab)

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def l7(datapath) -> Iterator[L7Lab]:  # noqa: ANN001 - fixture
    lab = open_l7_lab(datapath, unique_lab("l7t"))
    try:
        yield lab
    finally:
        close_l7_lab(lab)


def new_records(l7: L7Lab, before: int) -> list[dict]:
    return l7.backend_requests()[before:]


def test_l7_keepalive_alternating_allowed_and_denied(l7: L7Lab) -> None:
    tag = uuid.uuid4().hex[:8]
    before = len(l7.backend_requests())
    sequence = [  # (method, path, body, allowed)
        ("GET", f"/public/{tag}/1", b"", True),
        ("GET", f"/private/{tag}", b"", False),
        ("POST", "/upload", b"first-" + tag.encode(), True),
        ("GET", f"/admin/{tag}", b"", False),
        ("POST", f"/private/{tag}", b"x" * 100_000, False),  # denied with a body: body discarded
        ("DELETE", "/upload", b"", False),  # right path, wrong method
        ("GET", f"/public/{tag}/2?q=1", b"", True),
        ("HEAD", f"/public/{tag}/3", b"", True),
        ("PUT", "/upload", b"second-" + tag.encode(), True),
    ]
    with l7.client() as c:
        for method, path, body, allowed in sequence:
            c.send(request_bytes(method, path, body=body))
            resp = c.read_response(head_only=method == "HEAD")
            if not allowed:
                assert_denied(resp)
                assert resp.headers.get("connection") != "close"
            elif method == "HEAD":
                assert resp.status == 200 and resp.headers.get("x-l7lab-backend") == "shop/backend"
            else:
                got = backend_json(resp)
                assert (got["method"], got["path"], got["body_length"]) == (method, path, len(body))
    seen = [(r["method"], r["path"], r["body_length"]) for r in new_records(l7, before)]
    assert seen == [(m, p, len(b)) for m, p, b, ok in sequence if ok]
    # Every request of this connection reached the backend over ONE upstream connection: the
    # proxy's (node) address and source port are the same in every record.
    assert len({r["client"] for r in new_records(l7, before)}) == 1


def test_l7_pipelined_requests_answered_in_order(l7: L7Lab) -> None:
    tag = uuid.uuid4().hex[:8]
    before = len(l7.backend_requests())
    batch = [("GET", f"/public/{tag}/a", True), ("GET", f"/private/{tag}", False),
             ("POST", "/upload", True), ("GET", f"/admin/{tag}", False), ("GET", f"/public/{tag}/b", True)]
    data = b"".join(request_bytes(m, p, body=(tag.encode() if m == "POST" else b"")) for m, p, _ in batch)
    with l7.client() as c:
        c.send(data)  # all five in one send
        for method, path, allowed in batch:
            resp = c.read_response()
            if allowed:
                got = backend_json(resp)
                assert (got["method"], got["path"]) == (method, path)
            else:
                assert_denied(resp)
        # still usable afterwards
        c.send(request_bytes("GET", f"/public/{tag}/after"))
        assert backend_json(c.read_response())["path"] == f"/public/{tag}/after"
    assert [(r["method"], r["path"]) for r in new_records(l7, before)] == \
        [(m, p) for m, p, ok in batch if ok] + [("GET", f"/public/{tag}/after")]


def test_l7_large_request_bodies(l7: L7Lab) -> None:
    """8 MB allowed upload (Content-Length), 2 MB denied upload (discarded, connection usable),
    then 3 MB in chunks; the backend's JSON says how many body bytes it received."""
    size = 8 * 1024 * 1024
    before = len(l7.backend_requests())
    with l7.client(timeout=30) as c:
        c.send(request_bytes("POST", "/upload", body=bytes(range(256)) * (size // 256)))
        got = backend_json(c.read_response())
        assert (got["method"], got["path"], got["body_length"]) == ("POST", "/upload", size)

        c.send(request_bytes("POST", "/private", body=b"p" * (2 * 1024 * 1024)))
        assert_denied(c.read_response())

        chunks = [b"c" * 65536] * 40 + [b"tail" * 1000] + [b"z"]
        chunked = b"".join(b"%x\r\n%b\r\n" % (len(ch), ch) for ch in chunks) + b"0\r\n\r\n"
        c.send(request_bytes("PUT", "/upload", headers={"Transfer-Encoding": "chunked"}) + chunked)
        got = backend_json(c.read_response())
        assert (got["method"], got["body_length"]) == ("PUT", sum(map(len, chunks)))
        # The backend got the body re-encoded chunked by the proxy (no length header of ours).
        assert got["headers"].get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in got["headers"]
    recs = new_records(l7, before)
    assert [(r["method"], r["path"], r["body_length"]) for r in recs] == \
        [("POST", "/upload", size), ("PUT", "/upload", sum(map(len, chunks)))]


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def read_big(c, headers: dict[str, str], slow: bool = False) -> tuple[Resp, int, str]:  # noqa: ANN001
    """GET an allowed path asking the backend for a large body; returns (response without its
    body, body length, body SHA-256). `slow`: read in small pieces with pauses (a slow reader)."""
    digest, size = hashlib.sha256(), 0

    def sink(piece: bytes) -> None:
        nonlocal size
        digest.update(piece)
        size += len(piece)
    c.send(request_bytes("GET", "/public/big", headers=headers))
    if slow:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    resp = c.read_response(sink=sink, pace=(0.002, 8192) if slow else None)
    return resp, size, digest.hexdigest()


def test_l7_large_responses_streamed_unchanged(l7: L7Lab) -> None:
    """Large answers through the proxy: Content-Length and chunked, a slow reader, and an upload
    and a download in one exchange. Every byte arrives (the backend's SHA-256 of what it sent
    equals the client's of what it got), and the proxy's peak memory grows by far less than the
    bytes it relayed: bodies are streamed, never held whole."""
    proxy_pid = l7.lab.proxy_process.pid
    rss_before = peak_rss_bytes(proxy_pid)
    relayed = 0
    with l7.client(timeout=60) as c:
        for size, chunked in ((48 * 1024 * 1024, False), (24 * 1024 * 1024 + 13, True)):
            resp, got, sha = read_big(c, {"X-L7lab-Response-Bytes": str(size),
                                          "X-L7lab-Response-Chunked": "yes" if chunked else "no"})
            assert resp.status == 200 and resp.headers["x-l7lab-backend"] == "shop/backend"
            assert (got, sha) == (size, resp.headers["x-l7lab-body-sha256"])
            if chunked:
                assert resp.headers["transfer-encoding"] == "chunked" and "content-length" not in resp.headers
            else:
                assert resp.headers["content-length"] == str(size)
            relayed += size
        # A slow reader: the proxy must wait for it (backpressure), not buffer or give up.
        size = 6 * 1024 * 1024
        resp, got, sha = read_big(c, {"X-L7lab-Response-Bytes": str(size)}, slow=True)
        assert (resp.status, got, sha) == (200, size, resp.headers["x-l7lab-body-sha256"])
        # Both directions in one exchange: 8 MB up, 8 MB down.
        up = bytes(range(256)) * (8 * 1024 * 4)
        c.send(request_bytes("POST", "/upload", headers={"X-L7lab-Response-Bytes": str(len(up))}, body=up))
        digest = hashlib.sha256()
        resp = c.read_response(sink=digest.update)
        assert resp.status == 200 and digest.hexdigest() == resp.headers["x-l7lab-body-sha256"]
        # The connection is still in sync: a denied request, then an allowed one.
        c.send(request_bytes("GET", "/private"))
        assert_denied(c.read_response())
        c.send(request_bytes("GET", "/public/after-big"))
        assert backend_json(c.read_response())["path"] == "/public/after-big"
    assert l7.backend_requests()[-1]["path"] == "/public/after-big"
    assert next(r for r in reversed(l7.backend_requests()) if r["method"] == "POST")["body_length"] == len(up)
    growth = peak_rss_bytes(proxy_pid) - rss_before
    print(f"proxy peak memory grew by {growth} bytes while relaying {relayed}")
    assert growth < relayed // 8, f"proxy peak memory grew by {growth} bytes while relaying {relayed}"


def test_l7_chunked_request_body_small_chunks_and_trailer(l7: L7Lab) -> None:
    before = len(l7.backend_requests())
    body = b"4;name=v\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n"
    with l7.client() as c:
        c.send(request_bytes("POST", "/upload", headers={"Transfer-Encoding": "chunked"}) + body)
        got = backend_json(c.read_response())
        assert got["body_length"] == len(b"wikipedia in\r\n\r\nchunks.")
        # Denied chunked request: the body is read per its framing and the next request works.
        c.send(request_bytes("POST", "/admin", headers={"Transfer-Encoding": "chunked"}) + body)
        assert_denied(c.read_response())
        c.send(request_bytes("GET", "/public/after-chunked"))
        assert backend_json(c.read_response())["path"] == "/public/after-chunked"
    assert [(r["method"], r["path"]) for r in new_records(l7, before)] == \
        [("POST", "/upload"), ("GET", "/public/after-chunked")]


def dribble(c, data: bytes, step: int = 3) -> None:  # noqa: ANN001 - PodClient
    """Send `data` a few bytes per segment (TCP_NODELAY is on), with a tiny pause between; stop
    if the proxy has closed the connection (it refuses a bad head before it is complete)."""
    for i in range(0, len(data), step):
        try:
            c.send(data[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            return
        time.sleep(0.001)


def test_l7_slow_client_head_in_small_pieces(l7: L7Lab) -> None:
    before = len(l7.backend_requests())
    with l7.client() as c:
        dribble(c, request_bytes("GET", "/public/slow", headers={"X-Pad": "a" * 40}))
        assert backend_json(c.read_response())["path"] == "/public/slow"
        dribble(c, request_bytes("GET", "/public/../private"))  # normalized to /private: denied
        assert_denied(c.read_response())
        dribble(c, request_bytes("POST", "/upload", body=b"0123456789" * 5))  # the body dribbles too
        assert backend_json(c.read_response())["body_length"] == 50
        dribble(c, b"GET /public HTTP/1.1\nHost: backend\n\n")  # bare LF: refused as soon as seen
        resp = c.read_response()
        assert resp.status == 400 and resp.headers.get("connection") == "close"
        assert c.closed()
    assert [(r["method"], r["path"]) for r in new_records(l7, before)] == \
        [("GET", "/public/slow"), ("POST", "/upload")]


def test_l7_request_line_without_a_version_is_answered_at_once(l7: L7Lab) -> None:
    """The HTTP/0.9 form (`GET /path` and a line end, nothing more): 400 and a close as soon as
    the line is complete, not a timeout's 408 (nor a wait for a blank line that never comes)."""
    before = len(l7.backend_requests())
    for line in (b"GET /public\r\n", b"GET /public HTTP/0.9\r\n"):
        with l7.client() as c:
            c.send(line)
            resp = c.read_response()
            assert resp.status == 400 and resp.headers.get("connection") == "close", line
            assert c.closed()
    assert new_records(l7, before) == []


def test_l7_denied_body_is_access_denied_exactly(l7: L7Lab) -> None:
    """The raw bytes of a denial: what a curl user sees."""
    with l7.client() as c:
        c.send(request_bytes("GET", "/private"))
        resp = c.read_response()
    assert resp.status == 403 and resp.body == ACCESS_DENIED
    assert resp.headers["content-length"] == "15" and resp.headers["content-type"] == "text/plain"
    assert "x-l7lab-backend" not in resp.headers  # the proxy's answer, nothing from the backend


def test_l7_expect_continue_and_http10(l7: L7Lab) -> None:
    before = len(l7.backend_requests())
    with l7.client() as c:  # allowed: the backend's 100 Continue is relayed, then its answer
        c.send(b"POST /upload HTTP/1.1\r\nHost: backend\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert c.read_response().status == 100
        c.send(b"hello")
        assert backend_json(c.read_response())["body_length"] == 5
        # denied with Expect: 403 and close (the client may never send the body)
        c.send(b"POST /private HTTP/1.1\r\nHost: backend\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        resp = c.read_response()
        assert_denied(resp)
        assert resp.headers.get("connection") == "close" and c.closed()
    with l7.client() as c:  # HTTP/1.0 keep-alive: allowed, denied, allowed on one connection
        for path, ok in (("/public/ten", True), ("/private", False), ("/public/ten-again", True)):
            c.send(f"GET {path} HTTP/1.0\r\nHost: backend\r\nConnection: keep-alive\r\n\r\n".encode())
            resp = c.read_response()
            if ok:
                assert backend_json(resp)["http_version"] == "1.1"  # forwarded as HTTP/1.1
            else:
                assert_denied(resp)
    assert [(r["method"], r["path"]) for r in new_records(l7, before)] == \
        [("POST", "/upload"), ("GET", "/public/ten"), ("GET", "/public/ten-again")]


def test_l7_peer_without_rights_is_dropped_in_the_kernel(l7: L7Lab) -> None:
    """stranger has no policy to backend:8080: its SYN is dropped at L3/L4 and never reaches
    the proxy (no L7 record, nothing in the backend's log)."""
    before, events_before = len(l7.backend_requests()), len(l7.proxy_events())
    l7.datapath.poll_events()
    with pytest.raises(TimeoutError):
        l7.client(src="shop/stranger", connect_timeout=CONNECT_DROP_TIMEOUT)
    drops = l7.events_for(l7.datapath.poll_events(timeout_ms=200), "shop/stranger", "shop/backend", L7_PORT)
    assert drops and {(e.verdict, e.reason) for e in drops} == {(FlowVerdict.DROP, DropReason.POLICY_DENIED)}
    assert len(l7.backend_requests()) == before
    assert all(r.source.ip != l7.ip("shop/stranger") for r in l7.proxy_events()[events_before:])
