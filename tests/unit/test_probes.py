"""The probe engine's judgement of what came back, without a kernel."""

from __future__ import annotations

import json

from dataplane.errors import SourceLocation
from dataplane.probes import build_request, classify_http
from dataplane.scenario import Destination, HttpRequest, Probe


def probe(http: HttpRequest | None = None) -> Probe:
    return Probe("shop/web", Destination("pod", "shop/api", "10.200.0.3", 8080), "TCP", "allowed", http, 1.0,
                 SourceLocation("s.yaml", 3))


def test_request_carries_method_path_headers_and_body() -> None:
    raw = build_request(probe(HttpRequest("POST", "/pay?x=1", {"X-Secret": "s3"}, '{"a": 1}')))
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /pay?x=1 HTTP/1.1"
    assert "Host: api:8080" in lines and "X-Secret: s3" in lines and "Content-Length: 8" in lines
    assert body == b'{"a": 1}'


def test_default_request_is_get_root() -> None:
    assert build_request(probe()).startswith(b"GET / HTTP/1.1\r\n")


def test_backend_answer_is_allowed_only_from_the_destination() -> None:
    body = json.dumps({"endpoint": "shop/api", "path": "/"}).encode()
    seen = classify_http(probe(), 200, {"x-l7lab-backend": "shop/api"}, body, 0.01)
    assert seen.outcome == "allowed" and seen.body["path"] == "/"
    other = classify_http(probe(), 200, {"x-l7lab-backend": "shop/web"}, body, 0.01)
    assert other.outcome == "error" and "shop/web" in other.detail


def test_proxy_403_is_denied_but_a_backend_403_is_not() -> None:
    assert classify_http(probe(), 403, {}, b"Access denied\r\n", 0.0).outcome == "denied"
    assert classify_http(probe(), 403, {"x-l7lab-backend": "shop/api"}, b"{}", 0.0).outcome == "allowed"
    assert classify_http(probe(), 403, {}, b"Forbidden", 0.0).outcome == "error"
