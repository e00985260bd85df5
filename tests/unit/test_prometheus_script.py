"""scripts/prometheus.sh: Debian's Prometheus on loopback scraping a lab's metrics endpoint (here
the agent's metrics server serving a snapshot, no lab needed), found through the URL it prints;
stopped, it leaves neither a process nor its temporary directory; a bad address is refused."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane.hubblemetrics import HubbleCounters
from dataplane.metrics import LabCollector, LabCounters, MetricsServer, MetricsSnapshot
from tests.conftest import IN_CI, REPO
from tests.support.cli_lab import free_loopback_port
from tests.support.prometheus import PrometheusAPI
from tests.support.wait import wait_for

SCRIPT = REPO / "scripts" / "prometheus.sh"


def require_prometheus() -> None:
    if shutil.which("prometheus") is None:
        message = "prometheus (Debian's package) is missing: scripts/setup.sh --test installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def a_lab_endpoint() -> Iterator[str]:
    counters = LabCounters(HubbleCounters())
    counters.hubble.process({"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENIED", "event_type": {"type": 1},
                             "l4": {"TCP": {"destination_port": 8080}},
                             "destination": {"namespace": "retail", "pod_name": "inventory-api"}})
    snapshot = MetricsSnapshot.take(counters, {}, policies=2, proxy_up=True, proxy_restarts=0)
    server = MetricsServer(("127.0.0.1", 0))
    server.serve(LabCollector("retail", lambda: snapshot))
    try:
        yield f"127.0.0.1:{server.sock.getsockname()[1]}"
    finally:
        server.close()


def test_it_scrapes_the_lab_and_cleans_up(tmp_path: Path) -> None:
    require_prometheus()
    port = free_loopback_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with a_lab_endpoint() as target:
        proc = subprocess.Popen(["bash", str(SCRIPT), target, str(port)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            url = re.search(r"Prometheus at (http://127\.0\.0\.1:\d+)", line)
            assert url and url[1] == f"http://127.0.0.1:{port}", line
            prom = PrometheusAPI(url[1])
            wait_for("prometheus to answer", lambda: _answers(prom), every=0.2)
            wait_for("a scrape of the lab", lambda: prom.values('hubble_drop_total{reason="POLICY_DENIED"}',
                                                                "destination_pod") == {("inventory-api",): 1.0},
                     every=0.5)
            assert [p.name for p in tmp_path.iterdir()][0].startswith("l7lab-prometheus.")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C would stop it, the whole group
            proc.wait(timeout=20)
    assert list(tmp_path.iterdir()) == []  # its configuration and data went with it
    assert subprocess.run(["pgrep", "-f", f"web.listen-address=127.0.0.1:{port}"]).returncode == 1


def _answers(prom: PrometheusAPI) -> bool:
    try:
        return prom.targets_up()
    except OSError:
        return False


@pytest.mark.parametrize("args, message", [
    (["192.0.2.1:9464"], "must be a loopback HOST:PORT"),
    (["127.0.0.1:9464", "http"], "PROMETHEUS_PORT must be a port number"),
    ([], "usage:"),
])
def test_a_bad_argument_is_a_usage_error(args: list[str], message: str) -> None:
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out
