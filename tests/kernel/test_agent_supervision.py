"""The lab agent under trouble, on real traffic: slow clients on the metrics port do not hold
it; a change whose caller gave up is never applied; a dead L7 proxy is seen, recorded, shown
and restarted, and while none runs no change with L7 rules is reported as applied; a busy
metrics port fails `up` before anything is built."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane import lab as labmod
from dataplane import topology
from dataplane.flowrecord import ProxyEvent, record_from_json
from dataplane.abi import PROXY_PORT
from dataplane.timescale import scaled
from tests.conftest import unique_lab
from tests.support import wait
from tests.support.cli_lab import (AUDITOR_POLICY, L7LAB, READ_ONLY, RETAIL, agent_status, curl, free_loopback_port,
                                   l7lab, leftovers, nothing_left, observe, reaches, scrape)

pytestmark = pytest.mark.kernel

# Most checks here run `l7lab status` or read files: poll them at a gentle pace.
wait_for = functools.partial(wait.wait_for, every=0.1)

INVENTORY = "http://inventory-api:8080/api/inventory/1"
PAYMENTS_POST_ONLY = "CiliumNetworkPolicy retail/payments-post-only"

REPORTING_READS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: reporting-reads, namespace: retail}
spec:
  endpointSelector:
    matchLabels: {app: inventory-api}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: reporting}
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
          rules:
            http: [{method: GET, path: "/api/.*"}]
"""


@contextlib.contextmanager
def lab_up(*extra: str) -> Iterator[str]:
    name = unique_lab("sv")
    up = l7lab("up", str(RETAIL), "--name", name, *extra)
    assert up.returncode == 0, up.stderr
    try:
        yield name
    finally:
        assert l7lab("down", name).returncode == 0
        assert nothing_left(name), leftovers(name)


def proxy_pid(lab: str) -> int:
    proxy = agent_status(lab)["agent"]["proxy"]
    assert proxy["state"] == "running", proxy
    return int(proxy["pid"])


def proxy_records(lab: str) -> list[ProxyEvent]:
    out = l7lab("observe", lab, "--json")
    assert out.returncode == 0, out.stderr
    return [r for r in map(record_from_json, map(json.loads, out.stdout.splitlines())) if isinstance(r, ProxyEvent)]


def samples(url: str, lab: str) -> dict[str, float]:
    got = scrape(url)
    return {"up": got[f'l7lab_proxy_up{{lab="{lab}"}}'], "restarts": got[f'l7lab_proxy_restarts_total{{lab="{lab}"}}']}


# --------------------------------------------------------------------------- slow metrics clients


class SlowClients:
    """Connections to the metrics port that never complete a request: half trickle one byte of
    a request line every half second, half stay silent."""

    def __init__(self, port: int, count: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=scaled(5)) for _ in range(count)]
        self.stop = threading.Event()
        self.closed_by_server: set[int] = set()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000
        i = 0
        while not self.stop.wait(0.5):
            for n, sock in enumerate(self.socks[::2]):
                try:
                    sock.send(request[i % len(request):i % len(request) + 1])
                except OSError:
                    self.closed_by_server.add(2 * n)
            i += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def test_slow_metrics_clients_hold_neither_the_agent_nor_other_scrapes(tmp_path: Path) -> None:
    port = free_loopback_port()
    with lab_up("--metrics", f"127.0.0.1:{port}") as lab:
        url = f"http://127.0.0.1:{port}/metrics"
        policy = tmp_path / "auditors.yaml"
        policy.write_text(AUDITOR_POLICY)
        slow = SlowClients(port, 8)
        try:
            # status, changes and flow records all answer within their normal timeouts
            status = l7lab("status", lab, "--json", timeout=30)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)[0]["agent"]["running"], status.stdout
            out = l7lab("apply", "--lab", lab, str(policy), timeout=30)
            assert out.returncode == 0 and "applied CiliumNetworkPolicy retail/auditors-read" in out.stdout, out
            assert not reaches(lab, "reporting", INVENTORY, False)
            drops = observe(lab, lambda r: any(x.type == "L3_L4" and x.verdict == "DROP"
                                               and x.source.name == "retail/reporting" for x in r))
            assert any(r.type == "L3_L4" and r.verdict == "DROP" for r in drops), drops
            out = l7lab("delete", "cnp", "auditors-read", "-n", "retail", "--lab", lab, timeout=30)
            assert out.returncode == 0 and "deleted CiliumNetworkPolicy retail/auditors-read" in out.stdout, out
            # a well-behaved scraper still gets its metrics, with the changes just made
            # ... from the root namespace, where the listener lives: the node namespace, where the
            # agent itself lives, has nothing on that port
            inside = topology.socket_in(labmod.node_netns(lab))
            inside.setblocking(True)
            inside.settimeout(scaled(10))
            with inside, pytest.raises(ConnectionRefusedError):
                inside.connect(("127.0.0.1", port))
            got = wait_for("the applied changes in the metrics",
                           lambda: (s := scrape(url)).get(f'l7lab_policy_changes_total{{lab="{lab}",result="applied"}}',
                                                          0) >= 2 and s)
            assert got[f'l7lab_policies{{lab="{lab}"}}'] == 2
            # the slow clients are cut off in the end: the trickling ones by the deadline of an
            # exchange, the silent ones by the read timeout
            for n, sock in enumerate(slow.socks):
                if n % 2:
                    sock.settimeout(scaled(60))
                    with contextlib.suppress(ConnectionResetError):
                        assert sock.recv(1) == b"", "a silent client got an answer"
            wait_for("the trickling clients to be disconnected", lambda: len(slow.closed_by_server) == 4, timeout=60)
        finally:
            slow.close()


# --------------------------------------------------------------------------- a change that timed out


def test_a_change_whose_caller_gave_up_is_never_applied() -> None:
    with lab_up() as lab:
        agent = agent_status(lab)["agent"]["pid"]
        before = agent_status(lab)["agent"]["policies"]
        os.kill(agent, signal.SIGSTOP)  # the agent cannot answer while the client waits
        try:
            out = l7lab("delete", "cnp", "inventory-read-only", "-n", "retail", "--lab", lab, timeout=60)
        finally:
            os.kill(agent, signal.SIGCONT)
        assert out.returncode == 1 and "did not answer" in out.stderr and "not applied" in out.stderr, out
        # The agent, running again, finds the request its caller gave up on and refuses it.
        log = labmod.lab_dir(lab) / "agent.log"
        wait_for("the agent to refuse the late change", lambda: "change refused" in log.read_text())
        assert agent_status(lab)["agent"]["policies"] == before
        assert curl(lab, "frontend-app", INVENTORY, "-X", "DELETE").stdout.strip() == "Access denied"
        # A caller that hangs up before the answer is never told; the agent, which applied the
        # change, cannot deliver its reply and rolls it back.
        os.kill(agent, signal.SIGSTOP)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(labmod.lab_dir(lab) / "agent.sock"))
                delete = {"op": "change", "delete": [{"kind": "CiliumNetworkPolicy", "name": "inventory-read-only",
                                                      "namespace": "retail"}], "deadline": time.monotonic() + scaled(10)}
                sock.sendall(json.dumps(delete).encode() + b"\n")
        finally:
            os.kill(agent, signal.SIGCONT)
        wait_for("the agent to roll back the undelivered change",
                 lambda: "change rolled back: its reply could not be delivered" in log.read_text())
        assert agent_status(lab)["agent"]["policies"] == before
        assert curl(lab, "frontend-app", INVENTORY, "-X", "DELETE").stdout.strip() == "Access denied"
        # A change that is answered in time is confirmed and takes effect.
        out = l7lab("delete", "cnp", "inventory-read-only", "-n", "retail", "--lab", lab, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["removed"] == [READ_ONLY], out
        assert agent_status(lab)["agent"]["policies"] == [PAYMENTS_POST_ONLY]
        answer = curl(lab, "frontend-app", INVENTORY, "-X", "DELETE")  # no policy selects the inventory now
        assert json.loads(answer.stdout)["endpoint"] == "retail/inventory-api", answer


# --------------------------------------------------------------------------- a dead proxy


@contextlib.contextmanager
def proxy_port_taken(lab: str) -> Iterator[None]:
    """The proxy's port, bound (not listening) in the lab's node namespace: a new proxy cannot
    listen, and redirected flows find no socket (fail closed)."""
    sock = topology.socket_in(labmod.node_netns(lab))
    try:
        sock.bind(("0.0.0.0", PROXY_PORT))
        yield
    finally:
        sock.close()


def test_a_killed_proxy_is_seen_recorded_and_restarted(tmp_path: Path) -> None:
    port = free_loopback_port()
    with lab_up("--metrics", f"127.0.0.1:{port}") as lab:
        url = f"http://127.0.0.1:{port}/metrics"
        agent, pid = agent_status(lab)["agent"]["pid"], proxy_pid(lab)
        assert samples(url, lab) == {"up": 1, "restarts": 0}
        before = agent_status(lab)["agent"]["policies"]
        reads, auditors = tmp_path / "reporting-reads.yaml", tmp_path / "auditors.yaml"
        reads.write_text(REPORTING_READS)
        auditors.write_text(AUDITOR_POLICY)

        # The proxy dies, and while the agent is held its port is taken: no restart can succeed.
        taken = contextlib.ExitStack()
        os.kill(agent, signal.SIGSTOP)
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for("the proxy to die", lambda: not Path(f"/proc/{pid}").exists() or
                     Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
            taken.enter_context(proxy_port_taken(lab))
        finally:
            os.kill(agent, signal.SIGCONT)
        with taken:
            wait_for("a failed restart", lambda: any(r.event == "restart failed" for r in proxy_records(lab)))
            records = proxy_records(lab)
            assert records[0].event == "exited" and "killed by SIGKILL" in records[0].detail
            assert records[0].pid == pid
            failed = next(r for r in records if r.event == "restart failed")
            assert "before it was ready" in failed.detail
            proxy = agent_status(lab)["agent"]["proxy"]
            assert proxy["state"] in ("down", "starting") and proxy["restarts"] == 0, proxy
            text = l7lab("status", lab).stdout
            assert "proxy DOWN since" in text or "proxy RESTARTING" in text, text
            assert samples(url, lab) == {"up": 0, "restarts": 0}
            text = l7lab("observe", lab, "--type", "agent").stdout
            assert "AGENT_EVENT_UNKNOWN (type: proxy exited, notification: the L7 proxy killed by SIGKILL" in text, text

            # L7 traffic fails closed meanwhile; L3/L4 verdicts are unchanged.
            assert not reaches(lab, "frontend-app", INVENTORY, False)
            assert not reaches(lab, "reporting", INVENTORY, False)

            # A change with L7 rules no proxy can confirm is refused, and nothing changes.
            out = l7lab("apply", "--lab", lab, str(reads))
            assert out.returncode == 1 and "is not running" in out.stderr and "nothing changed" in out.stderr, out
            assert agent_status(lab)["agent"]["policies"] == before
            # A change that leaves the L7 rules as they are goes through, with a warning.
            out = l7lab("apply", "--lab", lab, str(auditors))
            assert out.returncode == 0 and "warning: the L7 proxy is not running" in out.stderr, out
            out = l7lab("delete", "cnp", "auditors-read", "-n", "retail", "--lab", lab)
            assert out.returncode == 0, out

        # With its port free again the proxy comes back on its own, with the policy in force.
        wait_for("the proxy to be restarted", lambda: agent_status(lab)["agent"]["proxy"]["state"] == "running",
                 timeout=90, every=0.5)
        proxy = agent_status(lab)["agent"]["proxy"]
        assert proxy["restarts"] == 1 and proxy["pid"] != pid
        assert json.loads(curl(lab, "frontend-app", INVENTORY).stdout)["endpoint"] == "retail/inventory-api"
        assert curl(lab, "frontend-app", INVENTORY, "-X", "DELETE").stdout.strip() == "Access denied"
        assert not reaches(lab, "reporting", INVENTORY, False)  # the refused L7 policy never took effect
        assert any(r.event == "restarted" and r.pid == proxy["pid"] for r in proxy_records(lab))
        assert wait_for("the restart in the metrics", lambda: samples(url, lab) == {"up": 1, "restarts": 1})
        # A change with L7 rules is confirmed by the restarted proxy.
        out = l7lab("apply", "--lab", lab, str(reads))
        assert out.returncode == 0 and "warning" not in out.stderr, out
        answer = curl(lab, "reporting", INVENTORY)
        assert json.loads(answer.stdout)["endpoint"] == "retail/inventory-api", answer


def test_run_keep_agent_restarts_the_proxy_it_did_not_start() -> None:
    name = unique_lab("sk")
    try:
        out = l7lab("run", str(RETAIL), "--name", name, "--keep", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["passed"], out.stderr
        pid = proxy_pid(name)
        os.kill(pid, signal.SIGKILL)
        wait_for("the proxy to be restarted", lambda: (p := agent_status(name)["agent"]["proxy"])["state"] == "running"
                 and p["pid"] != pid, timeout=60, every=0.2)
        assert json.loads(curl(name, "frontend-app", INVENTORY).stdout)["endpoint"] == "retail/inventory-api"
        assert curl(name, "frontend-app", INVENTORY, "-X", "DELETE").stdout.strip() == "Access denied"
        assert [r.event for r in proxy_records(name)] == ["exited", "restarted"]
    finally:
        assert l7lab("down", name).returncode == 0
    assert nothing_left(name), leftovers(name)


# --------------------------------------------------------------------------- a busy metrics port


def test_up_on_a_busy_metrics_port_fails_before_building_anything() -> None:
    name = unique_lab("sv")
    record = labmod.record_path(name)
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:  # the lab's record appears as soon as anything is built
        while not done.is_set():
            if record.exists() or labmod.lab_dir(name).exists():
                seen.append(True)
            time.sleep(0.005)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            out = subprocess.run([*L7LAB, "up", str(RETAIL), "--name", name, "--metrics", f"127.0.0.1:{port}"],
                                 capture_output=True, text=True, timeout=scaled(120))
        finally:
            done.set()
            watcher.join()
    assert out.returncode == 1, out
    assert f"--metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr, out.stderr
    assert not seen, "the lab was built before the busy port was noticed"
    assert nothing_left(name), leftovers(name)
