"""Upgrades on real redirected connections: the h2c bypass is closed, WebSocket tunnels work.

The backend pod runs, besides its own server (HTTP and WebSocket on 8080), two servers started
in its namespace by this test (tests/support/upgrade_backends.py):
    8081  hypercorn, which really honours `Upgrade: h2c` (checked directly from the pod itself);
          the L7 rule allows only `GET /allowed` there
    8082  a WebSocket server that writes its 101 and its first message in one write
Every connection is opened inside the frontend pod's namespace; the datapath assigns it in the
kernel to the lab's L7 proxy. What a backend received is read from its own log.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wsproto.events import AcceptConnection, RejectConnection, TextMessage

from dataplane import topology
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.http import WebSocketClient, h2_after_upgrade
from tests.support.l7_lab import IO_TIMEOUT, L7_PORT, L7Lab, assert_denied, close_l7_lab, open_l7_lab
from tests.support.upgrade_backends import GREETING

pytestmark = pytest.mark.kernel

H2C_PORT = 8081
FAST_WS_PORT = 8082
START_TIMEOUT = scaled(30.0)  # a Python server starting on a loaded machine

UPGRADE_POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: backend-l7, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: backend}}}}
  ingress:
    - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]
      toPorts:
        - ports: [{{port: "{H2C_PORT}", protocol: TCP}}]
          rules:
            http:
              - {{method: GET, path: /allowed}}
        - ports: [{{port: "{L7_PORT}", protocol: TCP}}, {{port: "{FAST_WS_PORT}", protocol: TCP}}]
          rules:
            http:
              - {{method: GET, path: /ws}}
"""


class PodBackend:
    """A tests/support/upgrade_backends.py server in a pod's namespace, bound to the pod's address."""

    def __init__(self, netns: str, kind: str, ip: str, port: int, log: Path) -> None:
        self.log = log
        log.touch()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.upgrade_backends",
                                      kind, ip, str(port), str(log)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
            line = self.proc.stdout.readline() if ready else ""
            assert line.strip() == "READY", f"{kind} backend did not start: {line!r}"
        except BaseException:
            self.stop()
            raise

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def lab(datapath, tmp_path_factory) -> Iterator[tuple[L7Lab, PodBackend, PodBackend]]:  # noqa: ANN001
    l7 = open_l7_lab(datapath, unique_lab("l7u"), (UPGRADE_POLICY,))
    backends: list[PodBackend] = []
    try:
        tmp = tmp_path_factory.mktemp("upgrades")
        ns, ip = l7.netns("shop/backend"), l7.ip("shop/backend")
        backends.append(PodBackend(ns, "h2c", ip, H2C_PORT, tmp / "h2c.log"))
        backends.append(PodBackend(ns, "fast-websocket", ip, FAST_WS_PORT, tmp / "ws.log"))
        yield l7, backends[0], backends[1]
    finally:
        for backend in backends:
            backend.stop()
        close_l7_lab(l7)


def h2c_upgrade(path: str, settings: bytes, version: str = "1.1") -> bytes:
    return (f"GET {path} HTTP/{version}\r\nHost: backend\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            f"Upgrade: h2c\r\nHTTP2-Settings: {settings.decode()}\r\n\r\n").encode()


def wait_for_line(backend: PodBackend, line: str, timeout: float = IO_TIMEOUT) -> bool:
    deadline = time.monotonic() + scaled(timeout)
    while line not in backend.lines():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_h2c_backend_honours_h2c_when_reached_directly(lab) -> None:
    """From the backend pod itself (no policy, no proxy): 101, and the HTTP/2 request is served.
    Without this, the test below would prove nothing."""
    l7, h2c, _ = lab
    settings, frames = h2_after_upgrade("DELETE", "/direct-check")
    sock = topology.socket_in(l7.netns("shop/backend"))
    sock.setblocking(True)
    sock.settimeout(scaled(IO_TIMEOUT))
    with sock:
        sock.connect((l7.ip("shop/backend"), H2C_PORT))
        sock.sendall(h2c_upgrade("/allowed", settings) + frames)
        assert sock.recv(12) == b"HTTP/1.1 101"
        assert wait_for_line(h2c, "DELETE /direct-check HTTP/2")


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@pytest.mark.parametrize("one_write", [True, False], ids=["frames-with-the-upgrade", "frames-after-the-answer"])
def test_h2c_upgrade_through_the_proxy_is_a_plain_get(lab, version: str, one_write: bool) -> None:
    l7, h2c, _ = lab
    tag = f"/secret-{version}-{one_write}"
    settings, frames = h2_after_upgrade("DELETE", tag)
    before = len(h2c.lines())
    with l7.client(port=H2C_PORT) as c:
        if one_write:
            c.send(h2c_upgrade("/allowed", settings, version) + frames)
            resp = c.read_response()
        else:
            c.send(h2c_upgrade("/allowed", settings, version))
            resp = c.read_response()
            c.send_tolerant(frames)
        assert resp.status == 200 and resp.body == b"seen GET /allowed", resp  # no 101
        rest = c.rest_until_closed()
    # HTTP/1.1 keeps the connection: the preface is read as the next request and refused.
    assert rest == b"" if version == "1.0" else rest.startswith(b"HTTP/1.1 400 "), rest[:80]
    new = h2c.lines()[before:]
    assert new == ["GET /allowed HTTP/1.1"]  # the backend got the plain GET, and nothing else


def test_h2c_upgrade_of_a_denied_request_is_denied(lab) -> None:
    l7, h2c, _ = lab
    settings, frames = h2_after_upgrade("DELETE", "/secret-denied")
    before = len(h2c.lines())
    with l7.client(port=H2C_PORT) as c:
        c.send(h2c_upgrade("/other", settings) + frames)
        assert_denied(c.read_response())
    assert h2c.lines()[before:] == []


@pytest.mark.parametrize("port", [L7_PORT, FAST_WS_PORT], ids=["pod-server", "one-write-backend"])
def test_websocket_frames_both_ways_through_the_proxy(lab, port: int) -> None:
    l7, _, fast = lab
    with WebSocketClient(l7.client(port=port)) as ws:
        ws.handshake("/ws")
        assert isinstance(ws.next_event(), AcceptConnection)
        greeting = ws.next_event()
        assert isinstance(greeting, TextMessage)
        if port == FAST_WS_PORT:
            assert greeting.data == GREETING
        else:
            assert '"endpoint": "shop/backend"' in greeting.data
        for i in range(5):  # every frame after the handshake arrives and is echoed
            ws.send_text(f"frame {i} on {port}")
            echo = ws.next_event()
            assert isinstance(echo, TextMessage) and echo.data == f"frame {i} on {port}"
    if port == FAST_WS_PORT:
        assert all(wait_for_line(fast, f"MESSAGE frame {i} on {port}") for i in range(5))


def test_websocket_handshake_on_a_denied_path_is_denied(lab) -> None:
    l7, _, _ = lab
    before = len(l7.backend_requests())
    with WebSocketClient(l7.client(port=L7_PORT)) as ws:
        ws.handshake("/private")
        event = ws.next_event()
        assert isinstance(event, RejectConnection) and event.status_code == 403
    assert l7.backend_requests()[before:] == []
