"""Resource limits of the lab's L7 proxy on real traffic through the kernel redirect: one pod
cannot exhaust the proxy for the others. Two client pods of different identities reach the
backend through the proxy (frontend, and stranger by a policy of this module); each test restarts
the lab's proxy with short limits passed the way a user does (L7LAB_PROXY_LIMITS), then:

  * frontend opens connections up to its per-identity cap and holds them: its next one is
    answered 503 and closed, recorded as an error, while stranger is served; past the overall
    cap stranger is refused too; a closed connection frees its slot;
  * slowloris heads from frontend get 408 and are closed after the header timeout while
    stranger's requests succeed;
  * an idle keep-alive connection is closed after the idle timeout;
  * a client that stops reading a large answer is cut after the progress timeout, while a slow
    reader that keeps reading gets every byte.

Timings are never asserted beyond "closed eventually, within a generous deadline".
"""

from __future__ import annotations

import hashlib
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from dataplane.flowrecord import Flow
from dataplane.timescale import scaled
from tests.conftest import unique_lab
from tests.support.http import request_bytes
from tests.support.l7_lab import (L7_POLICY, PLAIN_POLICY, L7Lab, PodClient, backend_json, close_l7_lab,
                                  open_l7_lab)
from tests.support.wait import wait_for

pytestmark = pytest.mark.kernel

DEADLINE = 30.0  # "eventually" on a loaded machine (the helpers scale it); the limits under test are 1-2 s

STRANGER_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-l7-stranger, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: stranger}}]
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
          rules:
            http:
              - {method: GET, path: "/public(/.*)?"}
"""


@pytest.fixture(scope="module")
def l7(datapath) -> Iterator[L7Lab]:  # noqa: ANN001 - fixture
    lab = open_l7_lab(datapath, unique_lab("l7lim"), (L7_POLICY, PLAIN_POLICY, STRANGER_POLICY))
    try:
        yield lab
    finally:
        close_l7_lab(lab)


@pytest.fixture
def limits(l7: L7Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Restart the lab's proxy with the given L7LAB_PROXY_LIMITS; the defaults again afterwards."""
    def restart(spec: str) -> None:
        monkeypatch.setenv("L7LAB_PROXY_LIMITS", spec)
        l7.lab.stop_proxy(signal.SIGTERM)
        l7.lab.start_proxy()
    yield restart
    monkeypatch.delenv("L7LAB_PROXY_LIMITS", raising=False)
    l7.lab.stop_proxy(signal.SIGTERM)
    l7.lab.start_proxy()


def errors(l7: L7Lab, reason: str) -> list[Flow]:
    return [e for e in l7.proxy_events() if e.verdict == "error" and reason in e.summary]


def served(l7: L7Lab, pod: str, path: str) -> PodClient:
    """A connection of `pod` whose request the backend answered (so the proxy counts it)."""
    c = l7.client(pod)
    c.send(request_bytes("GET", path))
    assert backend_json(c.read_response())["path"] == path
    return c


def refused_503(l7: L7Lab, pod: str, path: str) -> None:
    with l7.client(pod, timeout=DEADLINE) as c:
        c.send_tolerant(request_bytes("GET", path))
        resp = c.read_response()
        assert (resp.status, resp.headers.get("connection")) == (503, "close"), resp
        assert "x-l7lab-backend" not in resp.headers
        assert c.closed_by_peer(DEADLINE)


def test_connection_caps_refuse_a_pod_past_its_share_while_others_are_served(l7: L7Lab, limits) -> None:  # noqa: ANN001
    limits("max-connections-per-identity=3,max-connections=5")
    tag = uuid.uuid4().hex[:8]
    held = [served(l7, "shop/frontend", f"/public/{tag}/held{i}") for i in range(3)]
    try:
        refused_503(l7, "shop/frontend", f"/public/{tag}/over")  # frontend is at its cap
        held.append(served(l7, "shop/stranger", f"/public/{tag}/other0"))  # another pod is served
        held.append(served(l7, "shop/stranger", f"/public/{tag}/other1"))  # 5 open: the proxy is full
        refused_503(l7, "shop/stranger", f"/public/{tag}/full")
        assert f"/public/{tag}/over" not in [r["path"] for r in l7.backend_requests()]
        frontend = l7.identity("shop/frontend")
        per_identity = wait_for("the per-identity refusal record",
                                lambda: errors(l7, "max-connections-per-identity 3"))
        assert per_identity[-1].http.code == 503
        source = per_identity[-1].source
        assert (source.ip, source.name, source.identity) == (l7.ip("shop/frontend"), "shop/frontend", frontend)
        assert f"identity {frontend} already has 3 connections open" in per_identity[-1].summary
        overall = wait_for("the overall refusal record", lambda: errors(l7, "(max-connections 5)"))
        assert overall[-1].source.name == "shop/stranger" and overall[-1].http.code == 503
        # The held connections still work, and a closed one frees its slot for its pod.
        held[0].send(request_bytes("GET", f"/public/{tag}/again"))
        assert backend_json(held[0].read_response())["path"] == f"/public/{tag}/again"
        held.pop(1).close()

        def frontend_served_again() -> bool:
            try:
                served(l7, "shop/frontend", f"/public/{tag}/freed").close()
            except (AssertionError, ConnectionError, OSError):
                return False
            return True
        wait_for("the frontend to be served again", frontend_served_again)
    finally:
        for c in held:
            c.close()


def test_slowloris_heads_are_closed_while_others_are_served(l7: L7Lab, limits) -> None:  # noqa: ANN001
    limits("header-timeout=1")
    tag = uuid.uuid4().hex[:8]
    head = request_bytes("GET", f"/public/{tag}/slowloris", headers={"X-Pad": "a" * 4000})
    slow = [l7.client("shop/frontend") for _ in range(4)]
    answers = [b""] * len(slow)
    others = 0
    try:
        deadline, sent = time.monotonic() + scaled(DEADLINE), 0
        while not all(answers) and time.monotonic() < deadline and sent < len(head) - 4:
            for i, c in enumerate(slow):  # one more byte each, never the whole head
                c.send_tolerant(head[sent:sent + 1])
                c.sock.setblocking(False)
                try:
                    answers[i] += c.sock.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    pass
                c.sock.setblocking(True)
            sent += 1
            with served(l7, "shop/stranger", f"/public/{tag}/other{others}"):  # another pod, meanwhile
                others += 1
        for i, c in enumerate(slow):
            c.buf = answers[i]
            c.sock.settimeout(scaled(DEADLINE))
            resp = c.read_response()
            assert (resp.status, resp.headers.get("connection")) == (408, "close"), resp
            assert c.closed_by_peer(DEADLINE)
    finally:
        for c in slow:
            c.close()
    assert others > 0
    assert f"/public/{tag}/slowloris" not in [r["path"] for r in l7.backend_requests()]
    timeouts = wait_for("the 408 records", lambda: len(errors(l7, "no complete request head in time")) >= 4 and
                        errors(l7, "no complete request head in time"))
    assert {e.source.name for e in timeouts} == {"shop/frontend"} and {e.http.code for e in timeouts} == {408}


def test_idle_keep_alive_connection_is_closed(l7: L7Lab, limits) -> None:  # noqa: ANN001
    limits("idle-timeout=1")
    tag = uuid.uuid4().hex[:8]
    c = served(l7, "shop/frontend", f"/public/{tag}/then-idle")
    try:
        assert c.closed_by_peer(DEADLINE)  # nothing more sent: the proxy closes it, without an answer
        assert c.buf == b""
    finally:
        c.close()
    with served(l7, "shop/frontend", f"/public/{tag}/new"):  # a new connection is served as ever
        pass


def test_a_pod_that_stops_reading_is_cut_and_a_slow_reader_is_not(l7: L7Lab, limits) -> None:  # noqa: ANN001
    limits("progress-timeout=2,idle-timeout=2")
    tag = uuid.uuid4().hex[:8]
    # A slow reader that keeps reading, for several progress timeouts: it gets every byte.
    size = 4 * 1024 * 1024
    with l7.client("shop/frontend", timeout=DEADLINE) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        c.send(request_bytes("GET", f"/public/{tag}/slow", headers={"X-L7lab-Response-Bytes": str(size)}))
        digest, got, started = hashlib.sha256(), 0, time.monotonic()

        def sink(piece: bytes) -> None:
            nonlocal got
            digest.update(piece)
            got += len(piece)
        resp = c.read_response(sink=sink, pace=(0.003, 4096))
        assert (resp.status, got, digest.hexdigest()) == (200, size, resp.headers["x-l7lab-body-sha256"])
        assert time.monotonic() - started > 2.5  # slower than the timeout, or the test means nothing
    assert not errors(l7, "progress timeout")
    # A client that asks for 512 MiB and never reads: the proxy ends the exchange.
    big = 512 * 1024 * 1024
    stuck = l7.client("shop/frontend")
    try:
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        stuck.send(request_bytes("GET", f"/public/{tag}/stuck", headers={"X-L7lab-Response-Bytes": str(big)}))
        (cut,) = wait_for("the progress timeout record", lambda: errors(l7, "progress timeout"))
        assert (cut.http.path, cut.source.name) == (f"/public/{tag}/stuck", "shop/frontend")
        with served(l7, "shop/stranger", f"/public/{tag}/other"):  # the proxy serves on
            pass
        assert stuck.count_until_closed(DEADLINE) < big
    finally:
        stuck.close()
