"""Prometheus exposition of a lab's counters, served by the lab agent (`l7lab up --metrics`).

The agent owns the numbers: the datapath's per-CPU counters (packets and bytes by verdict, drop
reason and direction), the flow events it drained, the proxy's L7 records it has read, and the
policy changes it applied. `LabCollector` turns them into metric families at scrape time;
`MetricsListener` answers `GET /metrics` on a loopback address of the machine (the socket is
made before the agent moves into the lab's node namespace, so it lives in the root namespace,
where a local Prometheus can reach it). Only loopback addresses are accepted: the lab never
listens on the machine's real interfaces.

    l7lab_datapath_packets_total{lab,verdict,reason,direction}
    l7lab_datapath_bytes_total{lab,verdict,reason,direction}
    l7lab_flow_events_total{lab,verdict}          kernel flow records written to flows.jsonl
    l7lab_l7_records_total{lab,protocol,verdict}  proxy records (HTTP requests, DNS queries)
    l7lab_policies{lab}                           policies in force
    l7lab_policy_changes_total{lab,result}        changes applied / rolled back or refused
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import L7LabError

MAX_REQUEST_HEAD = 8192


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9464' (or 'localhost:9464', '[::1]:9464') -> (host, port); loopback only."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise L7LabError(f"--metrics expects HOST:PORT on loopback, e.g. 127.0.0.1:9464; got {text!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise L7LabError(f"--metrics: {host!r} is not a loopback address; the lab listens on loopback only "
                         "(127.0.0.0/8 or ::1)")
    return host, int(port_text)


class LabCounters:
    """What the agent counts itself (the datapath's own counters are read at scrape time)."""

    def __init__(self) -> None:
        self.flow_events: Counter[str] = Counter()
        self.l7_records: Counter[tuple[str, str]] = Counter()
        self.changes: Counter[str] = Counter()


class LabCollector(Collector):
    def __init__(self, lab: str, counters: LabCounters, datapath_metrics: Callable[[], dict],
                 policies: Callable[[], int]) -> None:
        self.lab, self.counters = lab, counters
        self.datapath_metrics, self.policies = datapath_metrics, policies

    def collect(self) -> Iterator[Any]:
        packets = CounterMetricFamily("l7lab_datapath_packets", "Packets seen by the lab's tc programs",
                                      labels=["lab", "verdict", "reason", "direction"])
        octets = CounterMetricFamily("l7lab_datapath_bytes", "Bytes seen by the lab's tc programs",
                                     labels=["lab", "verdict", "reason", "direction"])
        for (verdict, reason, direction), (pkts, nbytes) in sorted(self.datapath_metrics().items()):
            labels = [self.lab, verdict.name, reason.name, direction.name.lower()]
            packets.add_metric(labels, pkts)
            octets.add_metric(labels, nbytes)
        yield packets
        yield octets
        events = CounterMetricFamily("l7lab_flow_events", "Kernel flow records written to flows.jsonl",
                                     labels=["lab", "verdict"])
        for verdict, count in sorted(self.counters.flow_events.items()):
            events.add_metric([self.lab, verdict], count)
        yield events
        l7 = CounterMetricFamily("l7lab_l7_records", "L7 proxy records (HTTP requests, DNS queries)",
                                 labels=["lab", "protocol", "verdict"])
        for (protocol, verdict), count in sorted(self.counters.l7_records.items()):
            l7.add_metric([self.lab, protocol, verdict], count)
        yield l7
        changes = CounterMetricFamily("l7lab_policy_changes", "Policy changes sent to the agent",
                                      labels=["lab", "result"])
        for result, count in sorted(self.counters.changes.items()):
            changes.add_metric([self.lab, result], count)
        yield changes
        gauge = GaugeMetricFamily("l7lab_policies", "Policies in force", labels=["lab"])
        gauge.add_metric([self.lab], self.policies())
        yield gauge


class MetricsListener:
    """A non-blocking listener the agent polls in its own loop: one short answer per connection."""

    def __init__(self, address: tuple[str, int], collector: LabCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(16)
            self.sock.setblocking(False)
        except OSError as exc:
            self.sock.close()
            raise L7LabError(f"--metrics: cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None

    def accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    head += piece
                parts = head.split(b"\r\n", 1)[0].split()
                if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                    conn.sendall(_response(405, b"text/plain", b"GET /metrics\n"))
                elif parts[1].split(b"?")[0] != b"/metrics":
                    conn.sendall(_response(404, b"text/plain", b"try /metrics\n"))
                else:
                    body = generate_latest(self.registry)
                    conn.sendall(_response(200, CONTENT_TYPE_LATEST.encode(), body if parts[0] == b"GET" else b"",
                                           len(body)))
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def _response(status: int, content_type: bytes, body: bytes, length: int | None = None) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}[status]
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, reason, content_type, len(body) if length is None else length)) + body
