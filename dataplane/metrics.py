"""Prometheus exposition of a lab's counters, served by the lab agent (`l7lab up --metrics`).

The agent owns the numbers: the datapath's per-CPU counters (packets and bytes by verdict, drop
reason and direction), the flow events it drained, the proxy's L7 records it has read, the
policy changes it applied and the state of the L7 proxy it supervises. It gathers them on its
own loop, about once a second, into an immutable `MetricsSnapshot`; `LabCollector` turns the
latest snapshot into metric families at scrape time. Nothing a scrape runs touches the agent's
state or the BPF maps, so scrapes need no lock and cannot slow the agent down.

`MetricsServer` answers `GET /metrics` with prometheus_client's own WSGI application in a thread
of its own, off the agent's control path: each connection gets its own short-lived thread, a
socket timeout per read and a deadline for the whole exchange, and at most `MAX_CONNECTIONS`
are served at once (more are closed at once), so slow or idle clients can neither hold the
agent nor starve the server. The listening socket is bound by `l7lab up` before anything is
built (a busy port fails at once) and before the agent moves into the lab's node namespace, so
it lives in the root namespace, where a local Prometheus can reach it. Only loopback addresses
are accepted: the lab never listens on the machine's real interfaces.

    l7lab_datapath_packets_total{lab,verdict,reason,direction}
    l7lab_datapath_bytes_total{lab,verdict,reason,direction}
    l7lab_flow_events_total{lab,verdict}          kernel flow records written to flows.jsonl
    l7lab_l7_records_total{lab,protocol,verdict}  proxy records (HTTP requests, DNS queries)
    l7lab_policies{lab}                           policies in force
    l7lab_policy_changes_total{lab,result}        changes applied / rolled back or refused
    l7lab_proxy_up{lab}                           1 while the L7 proxy runs, else 0
    l7lab_proxy_restarts_total{lab}               restarts of the L7 proxy by the agent

and, beside them, Hubble's metrics with Hubble's names and labels (`hubble_flows_processed_total`,
`hubble_drop_total`, `hubble_http_requests_total`, ...) and `l7lab_policy_drops_total`, counted
from the Hubble flows of every record by `dataplane/hubblemetrics.py`; docs/metrics.md lists them all.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import L7LabError
from .hubblemetrics import HubbleCounters, HubbleSnapshot, families

READ_TIMEOUT = 5.0  # seconds a client may stay silent in the middle of a request
CONNECTION_DEADLINE = 10.0  # seconds for a whole exchange, however slowly the client trickles
MAX_CONNECTIONS = 32  # served at once; more are closed at once


def parse_listen(text: str, flag: str = "--metrics") -> tuple[str, int]:
    """'127.0.0.1:9464' (or 'localhost:9464', '[::1]:9464') -> (host, port); loopback only.
    `flag` names the option in the error (`l7lab ui --listen` takes the same form)."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise L7LabError(f"{flag} expects HOST:PORT on loopback, e.g. 127.0.0.1:9464; got {text!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise L7LabError(f"{flag}: {host!r} is not a loopback address; the lab listens on loopback only "
                         "(127.0.0.0/8 or ::1)")
    return host, int(port_text)


class LabCounters:
    """What the agent counts itself; touched only on the agent's loop."""

    def __init__(self, hubble: HubbleCounters | None = None) -> None:
        self.flow_events: Counter[str] = Counter()
        self.l7_records: Counter[tuple[str, str]] = Counter()
        self.changes: Counter[str] = Counter()
        self.hubble = hubble if hubble is not None else HubbleCounters()


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every number a scrape reports, copied on the agent's loop; never changed afterwards, so
    the server's threads read it without a lock (the agent swaps in a new one)."""

    datapath: Mapping[tuple[Any, Any, Any], tuple[int, int]] = field(default_factory=dict)
    flow_events: Mapping[str, int] = field(default_factory=dict)
    l7_records: Mapping[tuple[str, str], int] = field(default_factory=dict)
    changes: Mapping[str, int] = field(default_factory=dict)
    policies: int = 0
    proxy_up: bool = False
    proxy_restarts: int = 0
    hubble: HubbleSnapshot = field(default_factory=HubbleSnapshot)

    @classmethod
    def take(cls, counters: LabCounters, datapath: Mapping[tuple[Any, Any, Any], tuple[int, int]], *,
             policies: int, proxy_up: bool, proxy_restarts: int) -> "MetricsSnapshot":
        return cls(dict(datapath), dict(counters.flow_events), dict(counters.l7_records), dict(counters.changes),
                   policies, proxy_up, proxy_restarts, counters.hubble.snapshot())


class LabCollector(Collector):
    """Metric families of the latest snapshot `latest()` returns (called in the server's threads)."""

    def __init__(self, lab: str, latest: Callable[[], MetricsSnapshot]) -> None:
        self.lab, self.latest = lab, latest

    def collect(self) -> Iterator[Any]:
        snap = self.latest()
        packets = CounterMetricFamily("l7lab_datapath_packets", "Packets seen by the lab's tc programs",
                                      labels=["lab", "verdict", "reason", "direction"])
        octets = CounterMetricFamily("l7lab_datapath_bytes", "Bytes seen by the lab's tc programs",
                                     labels=["lab", "verdict", "reason", "direction"])
        for (verdict, reason, direction), (pkts, nbytes) in sorted(snap.datapath.items()):
            labels = [self.lab, verdict.name, reason.name, direction.name.lower()]
            packets.add_metric(labels, pkts)
            octets.add_metric(labels, nbytes)
        yield packets
        yield octets
        yield self._counter("l7lab_flow_events", "Kernel flow records written to flows.jsonl", ["verdict"],
                            [((k,), v) for k, v in snap.flow_events.items()])
        yield self._counter("l7lab_l7_records", "L7 proxy records (HTTP requests, DNS queries)",
                            ["protocol", "verdict"], snap.l7_records.items())
        yield self._counter("l7lab_policy_changes", "Policy changes sent to the agent", ["result"],
                            [((k,), v) for k, v in snap.changes.items()])
        gauge = GaugeMetricFamily("l7lab_policies", "Policies in force", labels=["lab"])
        gauge.add_metric([self.lab], snap.policies)
        yield gauge
        up = GaugeMetricFamily("l7lab_proxy_up", "1 while the lab's L7 proxy runs, else 0", labels=["lab"])
        up.add_metric([self.lab], 1 if snap.proxy_up else 0)
        yield up
        restarts = CounterMetricFamily("l7lab_proxy_restarts", "Restarts of the L7 proxy by the lab agent",
                                       labels=["lab"])
        restarts.add_metric([self.lab], snap.proxy_restarts)
        yield restarts
        yield from families(snap.hubble, self.lab)

    def _counter(self, name: str, documentation: str, labels: list[str],
                 samples: Iterable[tuple[tuple[str, ...], int]]) -> CounterMetricFamily:
        family = CounterMetricFamily(name, documentation, labels=["lab", *labels])
        for key, count in sorted(samples):
            family.add_metric([self.lab, *key], count)
        return family


class _QuietHandler(WSGIRequestHandler):
    """One exchange; a silent client times out after READ_TIMEOUT (StreamRequestHandler applies
    `timeout` to the socket). Nothing is logged per request."""

    timeout = READ_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS at once, each closed at its deadline."""

    daemon_threads = True  # never keeps the agent from exiting
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this client is turned away, nobody waits for it
            return
        with self._lock:
            self._open[request] = time.monotonic() + CONNECTION_DEADLINE
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever between polls: cut off exchanges past their deadline (a client
        that trickles a byte now and then never trips the per-read timeout)."""
        now = time.monotonic()
        with self._lock:
            late = [conn for conn, deadline in self._open.items() if deadline <= now]
        for conn in late:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or hung up; nothing the agent's log needs


class MetricsServer:
    """GET /metrics on a loopback address, served from a daemon thread.

    The constructor binds and listens (raising L7LabError at once if the address is taken);
    `serve(collector)` starts the thread; `close()` stops it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        try:
            self.httpd = _BoundedServer(address)
        except OSError as exc:
            raise L7LabError(f"--metrics: cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        self.thread: threading.Thread | None = None

    @property
    def sock(self) -> socket.socket:
        return self.httpd.socket

    def serve(self, collector: Collector) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"try /metrics\n"]
            return metrics_app(environ, start_response)

        self.httpd.set_app(app)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                       name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=5)
        self.httpd.server_close()
