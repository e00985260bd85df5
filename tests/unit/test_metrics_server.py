"""The metrics server on its own (no lab): it serves the agent's latest snapshot at /metrics,
cuts off clients that are silent or trickle, turns away connections beyond its cap without
keeping anyone else waiting, and fails at once on a busy port."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from dataplane import metrics
from dataplane.errors import L7LabError
from dataplane.metrics import LabCollector, LabCounters, MetricsServer, MetricsSnapshot
from dataplane.abi import Direction
from dataplane.abi import DropReason, FlowVerdict

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def served(snapshot: MetricsSnapshot) -> Iterator[str]:
    server = MetricsServer(("127.0.0.1", 0))
    server.serve(LabCollector("demo", lambda: snapshot))
    try:
        yield f"http://127.0.0.1:{server.sock.getsockname()[1]}/metrics"
    finally:
        server.close()


def a_snapshot() -> MetricsSnapshot:
    counters = LabCounters()
    counters.flow_events["DROP"] = 3
    counters.l7_records[("HTTP", "denied")] = 2
    counters.changes["applied"] = 1
    datapath = {(FlowVerdict.DROP, DropReason.POLICY_DENIED, Direction.INGRESS): (4, 240)}
    return MetricsSnapshot.take(counters, datapath, policies=2, proxy_up=False, proxy_restarts=5)


def get(url: str) -> str:
    with NO_PROXY.open(url, timeout=10) as resp:
        return resp.read().decode()


def test_the_snapshot_is_served_at_metrics_only() -> None:
    with served(a_snapshot()) as url:
        text = get(url)
        for line in ('l7lab_datapath_packets_total{direction="ingress",lab="demo",reason="POLICY_DENIED",verdict="DROP"} 4.0',
                     'l7lab_datapath_bytes_total{direction="ingress",lab="demo",reason="POLICY_DENIED",verdict="DROP"} 240.0',
                     'l7lab_flow_events_total{lab="demo",verdict="DROP"} 3.0',
                     'l7lab_l7_records_total{lab="demo",protocol="HTTP",verdict="denied"} 2.0',
                     'l7lab_policy_changes_total{lab="demo",result="applied"} 1.0',
                     'l7lab_policies{lab="demo"} 2.0',
                     'l7lab_proxy_up{lab="demo"} 0.0',
                     'l7lab_proxy_restarts_total{lab="demo"} 5.0'):
            assert line in text.splitlines(), (line, text)
        with pytest.raises(urllib.error.HTTPError) as info:
            get(url.replace("/metrics", "/"))
        assert info.value.code == 404


def test_silent_and_trickling_clients_are_cut_off_while_others_are_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics._QuietHandler, "timeout", 0.5)
    monkeypatch.setattr(metrics, "CONNECTION_DEADLINE", 1.5)
    with served(a_snapshot()) as url:
        port = int(url.split(":")[2].split("/")[0])
        silent = socket.create_connection(("127.0.0.1", port))
        trickling = socket.create_connection(("127.0.0.1", port))
        try:
            assert "l7lab_policies" in get(url)  # served beside them
            silent.settimeout(30)
            assert silent.recv(1) == b""  # the read timeout closed it
            cut = False
            deadline = time.monotonic() + 30
            while not cut and time.monotonic() < deadline:  # a byte every 0.1 s never trips the read timeout
                try:
                    trickling.send(b"G")
                    time.sleep(0.1)
                except OSError:
                    cut = True
            assert cut, "a trickling client was never cut off"
        finally:
            silent.close()
            trickling.close()


def test_connections_beyond_the_cap_are_turned_away_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)
    with served(a_snapshot()) as url:
        port = int(url.split(":")[2].split("/")[0])
        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            extra = socket.create_connection(("127.0.0.1", port))
            extra.settimeout(10)
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(1) == b""  # closed, not queued behind the holders
            extra.close()
        finally:
            for sock in holders:
                sock.close()
        deadline = time.monotonic() + 30
        while True:  # their slots come back once the server sees them gone
            try:
                assert "l7lab_policies" in get(url)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_a_busy_port_fails_at_once() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(L7LabError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            MetricsServer(("127.0.0.1", port))
