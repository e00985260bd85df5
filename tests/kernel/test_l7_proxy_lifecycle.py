"""The lab's L7 proxy as a process on a real lab (issue 5): killed mid-run it fails closed (the
kernel drops redirected SYNs with PROXY_SOCKET_MISSING, nothing reaches the backend, plain flows
are untouched) and enforcement resumes once it is started again; its events file has one record
per request matching the kernel's REDIRECT event for the flow; a policy change reaches it.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from dataplane.flowrecord import Endpoint, Flow
from dataplane.abi import PROXY_PORT
from dataplane.policy import PolicyEngine
from dataplane.abi import DropReason, FlowVerdict
from dataplane.timescale import scaled
from tests.conftest import unique_lab
from tests.support.http import request_bytes
from tests.support.l7_lab import (CONNECT_DROP_TIMEOUT, IO_TIMEOUT, L7_POLICY_NAME, L7_PORT, PLAIN_POLICY,
                                  PLAIN_PORT, L7Lab, assert_denied, backend_json, close_l7_lab, l7_policy,
                                  make_scenario, open_l7_lab)

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def l7(datapath) -> Iterator[L7Lab]:  # noqa: ANN001 - fixture
    lab = open_l7_lab(datapath, unique_lab("l7p"))
    try:
        yield lab
    finally:
        close_l7_lab(lab)


def records_on(l7: L7Lab, port: int) -> list[dict]:
    return [r for r in l7.backend_requests() if r["server_port"] == port]


def test_l7_proxy_killed_fails_closed_then_recovers(l7: L7Lab) -> None:
    tag = uuid.uuid4().hex[:8]
    with l7.client() as c:
        c.send(request_bytes("GET", f"/public/{tag}/before"))
        assert backend_json(c.read_response())["path"] == f"/public/{tag}/before"
    held = l7.client()  # an established redirected connection, open while the proxy dies
    held.send(request_bytes("GET", f"/public/{tag}/held"))
    backend_json(held.read_response())
    l7.datapath.poll_events()
    before = records_on(l7, L7_PORT)

    l7.lab.stop_proxy(signal.SIGKILL)
    try:
        # A new redirected connection: the SYN is dropped in the kernel (fail closed), so the
        # connect times out; it is never refused by, nor answered from, the backend.
        with pytest.raises((TimeoutError, socket.timeout)):
            l7.client(connect_timeout=CONNECT_DROP_TIMEOUT)
        # The held connection died with the proxy; nothing sent on it reaches the backend.
        try:
            held.send(request_bytes("GET", f"/public/{tag}/after-kill"))
            assert held.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
        events = l7.events_for(l7.datapath.poll_events(timeout_ms=200), "shop/frontend", "shop/backend", L7_PORT)
        assert events, "no kernel event for the redirected flow without a proxy"
        assert {(e.verdict, e.reason) for e in events} == {(FlowVerdict.DROP, DropReason.PROXY_SOCKET_MISSING)}
        assert records_on(l7, L7_PORT) == before  # nothing reached the backend

        # Flows that are not redirected do not need the proxy.
        with l7.client(port=PLAIN_PORT) as c:
            c.send(request_bytes("GET", f"/metrics/{tag}"))
            got = backend_json(c.read_response())
            assert (got["path"], got["server_port"]) == (f"/metrics/{tag}", PLAIN_PORT)
        plain = l7.events_for(l7.datapath.poll_events(timeout_ms=200), "shop/frontend", "shop/backend", PLAIN_PORT)
        assert plain and all(e.verdict == FlowVerdict.FORWARD for e in plain)
    finally:
        held.close()
        l7.lab.start_proxy()

    # Enforcement resumes: allowed -> backend, denied -> 403.
    with l7.client() as c:
        c.send(request_bytes("GET", f"/public/{tag}/restarted"))
        assert backend_json(c.read_response())["path"] == f"/public/{tag}/restarted"
        c.send(request_bytes("GET", f"/private/{tag}"))
        assert_denied(c.read_response())
    assert [r["path"] for r in records_on(l7, L7_PORT)[len(before):]] == [f"/public/{tag}/restarted"]
    events = l7.events_for(l7.datapath.poll_events(timeout_ms=200), "shop/frontend", "shop/backend", L7_PORT)
    assert events and {e.verdict for e in events} == {FlowVerdict.REDIRECT}


def test_l7_events_one_record_per_request_and_kernel_redirect(l7: L7Lab) -> None:
    tag = uuid.uuid4().hex[:8]
    host = f"backend-{tag}"  # no rule here looks at Host: it only tells this test's records apart
    l7.datapath.poll_events()
    sent = [("GET", f"/public/{tag}", b"", 200, "forwarded"),
            ("GET", f"/private/{tag}", b"", 403, "denied"),
            ("POST", "/upload", tag.encode(), 200, "forwarded"),
            ("DELETE", "/upload", b"", 403, "denied")]
    with l7.client() as c:
        for method, path, body, status, _ in sent:
            c.send(request_bytes(method, path, body=body, host=host))
            assert c.read_response().status == status
    with l7.client() as c:  # a protocol error inside an allowed request's body is recorded too
        c.send(request_bytes("POST", "/upload", host=host, headers={"Transfer-Encoding": "chunked"})
               + b"0x5\r\nhello\r\n0\r\n\r\n")
        assert c.read_response().status == 400

    def mine() -> list[Flow]:
        return [r for r in l7.proxy_events() if r.http.url.startswith(f"http://{host}/")]

    deadline = time.monotonic() + scaled(IO_TIMEOUT)  # records are written once a response is done
    while len(mine()) < len(sent) + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    records = mine()
    assert len(records) == len(sent) + 1, records
    # in order within a connection; the two connections' records may interleave
    records = [r for r in records if r.verdict != "error"] + [r for r in records if r.verdict == "error"]

    state = l7.engine.map_state()

    def who(ep: Endpoint) -> tuple:
        return ep.ip, ep.name, ep.identity, ep.labels.get("app")
    src = (l7.ip("shop/frontend"), "shop/frontend", l7.identity("shop/frontend"), "frontend")
    dst = (l7.ip("shop/backend"), "shop/backend", l7.identity("shop/backend"), "backend")
    assert src[2] >= 256 and dst[2] >= 256 and src[2] != dst[2]
    for rec, (method, path, _, status, verdict) in zip(records, sent):
        assert (rec.http.method, rec.http.path, rec.http.code, rec.verdict) == (method, path, status, verdict)
        assert rec.http.url == f"http://{host}{path}" and rec.http.protocol == "HTTP/1.1"
        assert who(rec.source) == src and who(rec.destination) == dst and rec.destination.port == L7_PORT
        assert rec.policy.policies == (L7_POLICY_NAME,), rec
        if verdict == "forwarded":
            assert rec.policy.rule_ids and all(state.rules[i].policy == L7_POLICY_NAME for i in rec.policy.rule_ids)
        else:
            assert rec.policy.rule_ids == () and "no HTTP rule" in rec.summary
    bad = records[-1]
    assert (bad.http.method, bad.http.path, bad.http.code, bad.verdict) == ("POST", "/upload", 400, "error")
    assert who(bad.source) == src and who(bad.destination) == dst

    # The kernel's side of the same flows: REDIRECT to the proxy port, attributed to the policy.
    events = l7.events_for(l7.datapath.poll_events(timeout_ms=200), "shop/frontend", "shop/backend", L7_PORT)
    assert events
    assert {(e.verdict, e.proxy_port) for e in events} == {(FlowVerdict.REDIRECT, PROXY_PORT)}
    assert all(state.rules[e.rule_id].policy == L7_POLICY_NAME for e in events)
    assert {(e.src_identity, e.dst_identity) for e in events} == {(src[2], dst[2])}


def test_l7_policy_change_reaches_the_proxy(l7: L7Lab) -> None:
    original = l7.engine
    tag = uuid.uuid4().hex[:8]
    old = l7.client()  # opened under the old rules
    try:
        old.send(request_bytes("GET", f"/public/{tag}/old"))
        backend_json(old.read_response())

        changed = PolicyEngine(make_scenario(l7.lab.name, (
            l7_policy('- {method: GET, path: "/v2/.*"}', name="backend-l7-v2"), PLAIN_POLICY)))
        l7.lab.policy = changed
        l7.lab.sync_policy(changed.map_state())
        start = len(l7.proxy_events())
        before = len(l7.backend_requests())

        with l7.client() as c:  # a NEW connection follows the new rules
            c.send(request_bytes("GET", f"/v2/{tag}"))
            assert backend_json(c.read_response())["path"] == f"/v2/{tag}"
            c.send(request_bytes("GET", f"/public/{tag}/new"))
            assert_denied(c.read_response())
        # ... and so does the next request of a connection opened before the change
        old.send(request_bytes("GET", f"/public/{tag}/old-again"))
        assert_denied(old.read_response())
        old.send(request_bytes("GET", f"/v2/{tag}/old"))
        assert backend_json(old.read_response())["path"] == f"/v2/{tag}/old"

        assert [r["path"] for r in l7.backend_requests()[before:]] == [f"/v2/{tag}", f"/v2/{tag}/old"]
        expected = [(f"/v2/{tag}", "forwarded"), (f"/public/{tag}/new", "denied"),
                    (f"/public/{tag}/old-again", "denied"), (f"/v2/{tag}/old", "forwarded")]
        paths = {p for p, _ in expected}
        records = [r for r in l7.wait_proxy_events(start + 4)[start:] if r.http.path in paths]
        assert sorted((r.http.path, r.verdict) for r in records) == sorted(expected)
        assert {p for r in records for p in r.policy.policies} == {"CiliumNetworkPolicy shop/backend-l7-v2"}
    finally:
        old.close()
        l7.lab.policy = original
        l7.lab.sync_policy(original.map_state())

    with l7.client() as c:  # and back
        c.send(request_bytes("GET", f"/public/{tag}/restored"))
        assert backend_json(c.read_response())["path"] == f"/public/{tag}/restored"
        c.send(request_bytes("GET", f"/v2/{tag}"))
        assert_denied(c.read_response())
