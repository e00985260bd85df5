"""Pure units: JSON round trip of MapState and the L7 types, marks, path normalization and
request-head parsing."""

from __future__ import annotations

import pytest

from dataplane.mapstate import MapState
from l7.dns import DnsRule
from l7.http import HeaderMatch, HttpRule
from l7.ruleset import L7Policy, L7RuleSet
from l7.http import HttpError, normalize_path
from proxy.http import parse_request
from dataplane.abi import MARK_MAGIC_FROM_PROXY, from_proxy_mark, identity_of_mark

from tests.support.loopback import engine


def test_l7_types_round_trip():
    rs = L7RuleSet(False, [(HttpRule("GET", "/a.*", "h", (HeaderMatch("X"), HeaderMatch("Y", "v"))), 3)],
                   [(DnsRule(match_pattern="*.example.com"), 4), (DnsRule(match_name="a.b"), 5)], [7])
    pol = L7Policy({(256, 80): rs, (0, 8080): L7RuleSet(allow_all=True, allow_all_rule_ids=[9])})
    again = L7Policy.from_json(pol.to_json())
    assert again == pol
    assert HeaderMatch.from_json(HeaderMatch("X").to_json()) == HeaderMatch("X")
    assert again.lookup(256, 80).match_http("GET", "/ab", {"host": "h", "X": "", "y": "v"})[0]


def test_map_state_round_trip_from_the_resolver():
    eng = engine(8080)
    state = eng.map_state()
    again = MapState.from_json(state.to_json())
    assert again.ipcache == state.ipcache and again.endpoints == state.endpoints
    assert again.policy == state.policy and again.rules == state.rules
    assert again.l7 == state.l7 and state.l7  # L7 sets survive


def test_map_state_rejects_unknown_format():
    with pytest.raises(ValueError, match="format"):
        MapState.from_json({"format": 2})


@pytest.mark.parametrize("identity", [1, 2, 256, 65535, 65536, (1 << 24) - 1])
def test_marks(identity):
    mark = from_proxy_mark(identity)
    assert mark & 0xF00 == MARK_MAGIC_FROM_PROXY
    assert identity_of_mark(mark) == identity
    assert identity_of_mark(0x200) is None


def test_mark_layout_matches_common_h():
    assert from_proxy_mark(0x123456) == 0x3456_0A12


@pytest.mark.parametrize("raw,normal", [
    ("/", "/"), ("/a/b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/../a", "/a"), ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"), ("//a///b", "/a/b"), ("/a//../b", "/a/b"), ("/%61%2D%7e", "/a-~"), ("/%2e%2E/x", "/x"),
    ("/a%20b", "/a%20b"), ("/a%3fb", "/a%3Fb"), ("/%25", "/%25"), ("/a:b@c;d=e", "/a:b@c;d=e"),
])
def test_normalize_path(raw, normal):
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", ["/a%2fb", "/a%5Cb", "/a\\b", "/a%", "/a%g0", "/a<b", "/a\"b", "/a{b", "/..;/x"])
def test_normalize_path_rejects(raw):
    with pytest.raises(HttpError) as exc:
        normalize_path(raw)
    assert exc.value.status == 400


def test_parse_request_fields():
    r = parse_request(b"POST /a/../b?q=1 HTTP/1.1\r\nHost: h:1\r\nX: 1\r\nx: 2\r\nContent-Length: 3\r\n"
                      b"Connection: close\r\n\r\n")
    assert (r.method, r.path, r.host, r.body, r.length, r.keep_alive) == ("POST", "/b?q=1", "h:1", "length", 3, False)
    assert r.match_headers() == {"Host": "h:1", "X": "1,2", "Content-Length": "3"}
    assert r.serialize() == b"POST /b?q=1 HTTP/1.1\r\nHost: h:1\r\nX: 1\r\nx: 2\r\nContent-Length: 3\r\n\r\n"


def test_parse_request_transfer_codings():
    r = parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n")
    assert (r.body, r.codings) == ("chunked", ("gzip",))
    assert b"Transfer-Encoding: gzip, chunked\r\n" in r.serialize()
