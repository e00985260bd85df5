"""Rule enforcement through a real proxy and backend: per-rule allow/deny, agreement with the
oracle, keep-alive, pipelining, fail closed, events."""

from __future__ import annotations

import pytest

from dataplane.mapstate import MapState
from dataplane.policy import Flow
from dataplane.scenario import HttpRequest
from proxy.state import Snapshot

from tests.support.http import Client

# (method, path, extra headers, host) -> expected
CASES = [
    ("GET", "/public", {}, "backend", 200),
    ("GET", "/public/a/b", {}, "backend", 200),
    ("HEAD", "/public", {}, "backend", 200),
    ("GET", "/publicx", {}, "backend", 403),  # full match
    ("POST", "/public", {}, "backend", 403),  # method
    ("get", "/public", {}, "backend", 403),  # case-sensitive method
    ("GET", "/PUBLIC", {}, "backend", 403),  # case-sensitive path
    ("GET", "/private", {}, "backend", 403),
    ("GET", "/search?q=abc", {}, "backend", 200),  # query is part of the path
    ("GET", "/search?q=ABC", {}, "backend", 403),
    ("GET", "/search", {}, "backend", 403),
    ("GET", "/search?q=abc&x=1", {}, "backend", 403),
    ("GET", "/host", {}, "backend:8080", 200),  # host with port
    ("GET", "/host", {}, "backend", 403),
    ("GET", "/host", {}, "Backend:8080", 403),
    ("GET", "/token", {"X-Token": "s3cret"}, "backend", 200),  # header exact value
    ("GET", "/token", {"x-token": "s3cret"}, "backend", 200),  # names case-insensitive
    ("GET", "/token", {"X-Token": "S3cret"}, "backend", 403),
    ("GET", "/token", {}, "backend", 403),
    ("GET", "/flag", {"X-Flag": ""}, "backend", 200),  # header presence
    ("GET", "/flag", {"X-Flagx": "1"}, "backend", 403),
]


@pytest.mark.parametrize("method,path,headers,host,expected", CASES)
def test_rules(fresh, method, path, headers, host, expected):
    c = fresh.client()
    try:
        r = c.request(method, path, headers, host=host)
    finally:
        c.close()
    assert r.status == expected
    if expected == 403:
        assert r.body == b"Access denied\r\n"
        assert r.headers["content-length"] == "15" and r.headers["content-type"] == "text/plain"
        assert fresh.backend.requests == []
    else:
        assert [(s.method, s.url) for s in fresh.backend.requests] == [(method, path)]


def _oracle(lab, source: str, method: str, path: str, headers: dict, host: str) -> str:
    pod = lab.engine.scenario.pods["shop/backend"]
    flow = Flow(source, pod.ip, "TCP", lab.backend.port, HttpRequest(method, path, {"Host": host, **headers}), "",
                "backend")
    return lab.engine.verdict(flow).outcome


def test_proxy_agrees_with_the_oracle(fresh):
    """Same requests to the oracle and through the proxy: forwarded <=> oracle allowed."""
    rows = [(src, m, p, h, host) for src in ("shop/frontend", "shop/stranger") for m, p, h, host, _ in CASES]
    addresses = {"shop/frontend": "127.0.0.2", "shop/stranger": "127.0.0.4"}
    for src, method, path, headers, host in rows:
        expected = _oracle(fresh, src, method, path, headers, host)
        c = Client(fresh.proxy.port, addresses[src])
        try:
            status = c.request(method, path, headers, host=host).status
        finally:
            c.close()
        assert (status == 200) == (expected == "allowed"), (src, method, path, headers, host, expected, status)
        if expected != "allowed":
            assert status == 403
    assert all(r.headers and r.method for r in fresh.backend.requests)


def test_keep_alive_alternating(fresh):
    c = fresh.client()
    statuses = [c.request("GET", p).status for p in ["/public", "/private", "/public/2", "/x", "/public/3"]]
    c.close()
    assert statuses == [200, 403, 200, 403, 200]
    assert [s.url for s in fresh.backend.requests] == ["/public", "/public/2", "/public/3"]
    assert len(fresh.backend.conns) == 1  # the upstream connection was reused


def test_pipelining_answers_in_order(fresh):
    c = fresh.client()
    paths = ["/public/1", "/private", "/public/2", "/search?q=z", "/admin"]
    c.send(b"".join(f"GET {p} HTTP/1.1\r\nHost: backend\r\n\r\n".encode() for p in paths))
    responses = [c.read_response() for _ in paths]
    c.close()
    assert [r.status for r in responses] == [200, 403, 200, 200, 403]
    assert responses[0].body == b"ok GET /public/1" and responses[3].body == b"ok GET /search?q=z"
    assert [s.url for s in fresh.backend.requests] == ["/public/1", "/public/2", "/search?q=z"]


def test_denied_body_is_discarded_and_connection_stays_usable(fresh):
    c = fresh.client()
    c.send(b"POST /private HTTP/1.1\r\nHost: backend\r\nContent-Length: 40\r\n\r\n"
           b"GET /private HTTP/1.1\r\nHost: backend\r\n\r\n")  # 40-byte body that looks like a request
    assert c.read_response().status == 403
    assert c.request("GET", "/public").status == 200
    c.close()
    assert [s.url for s in fresh.backend.requests] == ["/public"]


def test_connection_close_is_honoured(fresh):
    c = fresh.client()
    r = c.request("GET", "/public", {"Connection": "close"})
    assert r.status == 200 and r.headers.get("connection") == "close"
    assert c.closed()
    c.close()


def test_stranger_is_refused_fail_closed(fresh):
    """L3/L4 would drop stranger -> backend; if such a connection reached the proxy: 403."""
    c = fresh.client("127.0.0.4")
    assert c.request("GET", "/public").status == 403
    c.close()
    assert fresh.backend.raw == b""


def test_unknown_source_is_world_and_refused(fresh):
    c = fresh.client("127.0.0.9")
    assert c.request("GET", "/public").status == 403
    c.close()
    assert fresh.backend.raw == b""
    assert fresh.proxy.events.records[-1].source.identity == 2  # world


def test_state_without_rules_denies_everything(fresh):
    old = fresh.proxy.snapshot
    try:
        empty = MapState.from_json({**fresh.state.to_json(), "l7": [], "policy": []})
        fresh.proxy.reload(Snapshot(empty))
        c = fresh.client()
        assert c.request("GET", "/public").status == 403
        c.close()
        fresh.proxy.reload(Snapshot.empty())
        c = fresh.client()
        assert c.request("GET", "/public").status == 403
        c.close()
    finally:
        fresh.proxy.reload(old)
    assert fresh.backend.raw == b""


def test_reload_applies_to_the_next_request_on_an_open_connection(fresh):
    old = fresh.proxy.snapshot
    c = fresh.client()
    try:
        assert c.request("GET", "/public").status == 200
        fresh.proxy.reload(Snapshot(MapState.from_json({**fresh.state.to_json(), "l7": []})))
        assert c.request("GET", "/public").status == 403
        fresh.proxy.reload(old)
        assert c.request("GET", "/public").status == 200
    finally:
        fresh.proxy.reload(old)
        c.close()


def test_events(fresh):
    c = fresh.client()
    c.request("GET", "/public/e")
    c.request("GET", "/nope")
    c.close()
    ok, denied = list(fresh.proxy.events.records)
    assert ok.http is not None and ok.l7 is not None and ok.l7.latency_ms >= 0
    assert (ok.verdict, ok.http.code, ok.http.method, ok.http.path, ok.http.protocol) == ("forwarded", 200, "GET", "/public/e", "HTTP/1.1")
    assert ok.http.url == "http://backend/public/e"
    assert ok.source.name == "shop/frontend" and ok.destination.name == "shop/backend"
    assert ok.source.labels["app"] == "frontend" and ok.destination.labels["app"] == "backend"
    assert ok.direction == "ingress" and ok.trace_point == "proxy" and ok.l4.protocol == "TCP"
    assert ok.source.identity == fresh.engine.identities.pod_identity["shop/frontend"]
    assert ok.policy.policies == ("CiliumNetworkPolicy shop/backend-l7",) and ok.policy.rule_ids
    assert all(r.startswith("CiliumNetworkPolicy shop/backend-l7 ingress[") for r in ok.policy.rules)
    assert (denied.verdict, denied.http.code) == ("denied", 403)
    assert denied.policy.policies == ("CiliumNetworkPolicy shop/backend-l7",) and denied.policy.rule_ids == ()
    assert ok.l7.latency_ms >= 0


def test_connection_to_the_proxy_port_itself_is_refused(fresh):
    """Without an original-destination override, a connection addressed to the proxy's own
    port (not a redirected flow) would make the proxy connect to itself: refused."""
    from proxy.events import EventLog
    from proxy.server import ProxyServer
    proxy = ProxyServer(fresh.proxy.snapshot, "127.0.0.1", 0, transparent=False, mark=False, events=EventLog())
    fresh.loop.run(proxy.start())
    try:
        c = Client(proxy.port)
        c.send(b"GET /public HTTP/1.1\r\nHost: backend\r\n\r\n")
        with pytest.raises((ConnectionError, OSError)):
            c.read_response()
        c.close()
    finally:
        fresh.loop.run(proxy.stop())
    assert fresh.backend.raw == b"" and not proxy.events.records
