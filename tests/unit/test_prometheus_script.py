"""scripts/prometheus.sh: Debian's Prometheus on loopback scraping a lab's metrics endpoint (here
the agent's metrics server serving a snapshot, no lab needed), found through the URL it prints;
stopped, it leaves neither a process nor its temporary directory; a bad address is refused. With
--listen (or L7LAB_PROMETHEUS_LISTEN, which the Vagrant VM sets under VirtualBox) it listens on the
one address given, and refuses all addresses (0.0.0.0) and addresses this machine does not have."""

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
    env = {**script_env(), "TMPDIR": str(tmp_path)}
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


def script_env(**extra: str) -> dict[str, str]:
    """The environment without a listen address of the caller's (a VirtualBox VM's login shell sets one)."""
    return {**{k: v for k, v in os.environ.items() if k != "L7LAB_PROMETHEUS_LISTEN"}, **extra}


@pytest.mark.parametrize("how", ["--listen", "--listen=", "L7LAB_PROMETHEUS_LISTEN"])
def test_it_listens_where_it_is_told(tmp_path: Path, how: str) -> None:
    require_prometheus()
    port = free_loopback_port()
    address = "127.0.0.2"  # loopback, yet not the default: the option is what put it there
    args = {"--listen": ["--listen", address], "--listen=": [f"--listen={address}"]}.get(how, [])
    env = script_env(TMPDIR=str(tmp_path), **({how: address} if how.startswith("L7LAB") else {}))
    with a_lab_endpoint() as target:
        proc = subprocess.Popen(["bash", str(SCRIPT), *args, target, str(port)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith(f"Prometheus at http://{address}:{port} "), line
            wait_for("prometheus to answer", lambda: _answers(PrometheusAPI(f"http://{address}:{port}")), every=0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, env, message", [
    (["--listen", "0.0.0.0"], {}, "--listen: Prometheus listens on one address, never on all of them (0.0.0.0)"),
    (["--listen", "192.0.2.1"], {}, "--listen: the listen address must be an address of this machine"),
    (["--listen=127.1"], {}, "--listen: the listen address must be an IPv4 address such as 127.0.0.1, got '127.1'"),
    (["--listen", "256.0.0.1"], {}, "must be an IPv4 address"),
    ([], {"L7LAB_PROMETHEUS_LISTEN": "::1"}, "L7LAB_PROMETHEUS_LISTEN: the listen address must be an IPv4 address"),
    (["--listen"], {}, "usage:"),  # the address taken for the option's: no LAB_METRICS_ADDRESS left
])
def test_a_bad_listen_address_is_a_usage_error(args: list[str], env: dict[str, str], message: str) -> None:
    out = subprocess.run(["bash", str(SCRIPT), *args, "127.0.0.1:9464"], capture_output=True, text=True, timeout=30,
                         env=script_env(**env))
    assert out.returncode == 2 and message in out.stderr, out


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
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, env=script_env())
    assert out.returncode == 2 and message in out.stderr, out
