"""The request-smuggling / normalization corpus of the proxy's loopback tests
(`tests.support.attacks.CORPUS`), sent through a real lab: from the frontend pod
to backend:8080, redirected in the kernel to the lab's proxy, forwarded to the backend pod's own
HTTP server (aiohttp, not the loopback harness' recording backend).

Per case: the first answer is the corpus' expected protocol answer (400/431 and the connection
closed, 403 `Access denied`, or the backend's own 200 for requests normalized into allowed ones),
never a hang beyond the socket timeout; a request the rules deny (GET /private) follows every
case on the same connection and must never reach the backend. Afterwards the backend's requests
log is judged against the policy with the oracle's own matcher (`L7RuleSet.match_http` over
`engine.map_state().l7`): nothing the rules deny ever reached it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.conftest import unique_lab
from tests.support.attacks import CORPUS, SMUGGLED
from tests.support.l7_lab import ACCESS_DENIED, L7Lab, close_l7_lab, open_l7_lab

pytestmark = pytest.mark.kernel

DENIED_PATHS = ("/private", "/admin")
RAN: list[str] = []  # corpus cases run in this module (the whole-run check counts their 200s)


@pytest.fixture(scope="module")
def l7(datapath) -> Iterator[L7Lab]:  # noqa: ANN001 - fixture
    lab = open_l7_lab(datapath, unique_lab("l7c"))
    try:
        yield lab
    finally:
        close_l7_lab(lab)


def test_l7_corpus_policy_is_the_loopback_one(l7: L7Lab) -> None:
    """Sanity: the corpus keeps its meaning here (same rules, judged by the oracle's matcher)."""
    rules = l7.backend_rules()
    assert rules is not None and not rules.allow_all
    h = {"Host": "backend"}
    assert rules.match_http("GET", "/public/x", h)[0]
    assert rules.match_http("POST", "/upload", h)[0]
    assert not rules.match_http("GET", "/private", h)[0]
    assert not rules.match_http("GET", "/PUBLIC", h)[0]


@pytest.mark.parametrize("name", list(CORPUS))
def test_l7_attack_corpus_through_the_lab(l7: L7Lab, name: str) -> None:
    data, expected = CORPUS[name]
    before = len(l7.backend_requests())
    RAN.append(name)
    with l7.client() as c:
        c.send_tolerant(data + SMUGGLED.encode())  # a request that must be denied follows every case
        try:
            first = c.read_response()
        except socket.timeout:
            pytest.fail(f"{name}: no answer within the timeout (hang)")
        assert first.status == expected, (name, first)
        if expected in (400, 431):
            assert first.headers.get("connection") == "close", (name, first)
            assert c.closed(), f"{name}: connection left open after {expected}"
        else:
            if expected == 403:
                assert first.body == ACCESS_DENIED, (name, first)
            else:
                assert first.headers.get("x-l7lab-backend") == "shop/backend", (name, first)
            # the connection is still in sync: the trailing GET /private is answered 403
            second = c.read_response()
            assert second.status == 403 and second.body == ACCESS_DENIED, (name, second)
    new = l7.backend_requests()[before:]
    for rec in new:
        assert l7.rules_allow(rec), (name, rec)
        assert rec["path"].split("?")[0] not in DENIED_PATHS, (name, rec)
    if expected == 200:
        assert len(new) == 1, (name, new)
    else:
        assert new == [], (name, new)


def test_l7_attack_corpus_backend_log_never_has_a_denied_request(l7: L7Lab) -> None:
    """Whole-run check (catches a request that reached the backend after its case ended)."""
    records = l7.backend_requests()
    denied = [r for r in records if not l7.rules_allow(r)]
    assert denied == []
    assert all(r["path"].split("?")[0] not in DENIED_PATHS for r in records)
    # Each forwarded request came through the proxy (node address), with a head it re-serialized.
    assert all(r["http_version"] == "1.1" for r in records)
    assert len(records) == sum(1 for n in RAN if CORPUS[n][1] == 200)
