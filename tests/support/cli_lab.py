"""Labs driven the way a user drives them: the `l7lab` command in a subprocess (`up`, `exec`,
`observe`, `status`, `down`), curl inside pods, the agent's Prometheus endpoint, and the check
that a lab left nothing behind (namespaces, /etc/netns, records, processes). Every bound here is
an ordinary machine's seconds, scaled to this one (dataplane/timescale.py)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dataplane import lab as labmod
from dataplane import topology
from dataplane.flowrecord import Record, record_from_json
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab

L7LAB = [sys.executable, "-m", "dataplane.cli"]
RETAIL = REPO / "scenarios" / "retail.yaml"
READ_ONLY = "CiliumNetworkPolicy retail/inventory-read-only"

AUDITOR_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: auditors-read
  namespace: retail
spec:
  endpointSelector:
    matchLabels: {app: inventory-api}
  ingress:
    - fromEndpoints:
        - matchLabels: {role: auditor}
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
"""

def l7lab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*L7LAB, *args], cwd=REPO, capture_output=True, text=True, timeout=scaled(timeout))


def pin_name(lab: str, url: str) -> list[str]:
    """curl's `--resolve HOST:PORT:ADDRESS` for a URL naming a pod (`name` or `name.namespace`)
    of a lab without a cluster DNS (no pod labelled k8s-app=kube-dns): such a lab resolves no
    name, so the test gives curl the address while the URL, and the Host header, keep the name."""
    record = labmod.LabRecord.load(lab)
    assert record is not None, f"lab {lab} has no record"
    if any(ep.labels.get("k8s-app") == "kube-dns" for ep in record.endpoints.values()):
        return []  # the pod asks the cluster DNS, as in a cluster
    authority = url.split("//", 1)[1].split("/", 1)[0]
    host, _, port = authority.partition(":")
    port = port or ("443" if url.startswith("https:") else "80")
    for key, ep in record.endpoints.items():
        namespace, _, name = key.rpartition("/")
        if ep.kind == "pod" and host in (name, f"{name}.{namespace}"):
            return ["--resolve", f"{host}:{port}:{ep.ip}"]
    return []


def curl(lab: str, pod: str, url: str, *extra: str, max_time: str | None = None) -> subprocess.CompletedProcess[str]:
    """curl inside a pod; `max_time` as given, else a patient 10 s (scaled)."""
    max_time = max_time if max_time is not None else f"{scaled(10):g}"
    return l7lab("exec", "--lab", lab, pod, "--", "curl", "-s", "-m", max_time, *pin_name(lab, url), *extra, url)


def reaches(lab: str, pod: str, url: str, expect: bool) -> bool:
    """True if the backend itself answered; False if the connection timed out (dropped). A probe
    expected to pass gets a patient timeout (a loaded machine is slow, not dropping); one
    expected to be dropped waits one second."""
    out = curl(lab, pod, url, max_time=f"{scaled(10):g}" if expect else "1")
    if out.returncode == 28:
        return False
    assert out.returncode == 0, out
    host = url.split("//", 1)[1].split(":", 1)[0].split("/", 1)[0]
    assert json.loads(out.stdout)["endpoint"] == f"retail/{host}", out.stdout  # that server itself answered
    return True


def observe(lab: str, until: Callable[[list[Record]], bool], *args: str) -> list[Record]:
    """`observe --json` read back as flow records until they satisfy `until` (the agent writes
    flows within ~0.1 s; the deadline is for a loaded machine, where it may take seconds)."""
    deadline = time.monotonic() + scaled(30)
    while True:
        out = l7lab("observe", lab, "--json", *args)
        assert out.returncode == 0, out.stderr
        records = [record_from_json(json.loads(line)) for line in out.stdout.splitlines()]
        assert None not in records, out.stdout  # every line observe prints is a record
        if until(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def agent_status(lab: str) -> dict[str, Any]:
    out = l7lab("status", lab, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never via a proxy


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (samples only)."""
    with NO_PROXY.open(url, timeout=scaled(10)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def leftovers(name: str) -> dict[str, list[str]]:
    prefix = labmod.lab_prefix(name)
    return {
        "netns": topology.list_netns(prefix),
        "etc": sorted(p.name for p in labmod.NETNS_ETC.glob(prefix + "*")) if labmod.NETNS_ETC.is_dir() else [],
        "record": [str(p) for p in (labmod.record_path(name), labmod.lab_dir(name)) if p.exists()],
        # pod servers and the proxy (--lab NAME), and the lab agent (the forked `up`/`run --name NAME`)
        "processes": [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
                      if f"--lab {name} " in line or re.search(rf" (up|run) .*--name {re.escape(name)}( |$)", line)],
    }


def nothing_left(name: str, wait: float = 5.0) -> bool:
    """True once nothing of lab `name` is left (processes killed just now may take a moment to go)."""
    deadline = time.monotonic() + scaled(wait)
    while any(leftovers(name).values()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def up_lab(scenario: Path, prefix: str) -> Iterator[str]:
    """A lab of `scenario` brought up with `l7lab up` (so it has an agent), named with `prefix`;
    taken down, with nothing left behind, when the generator ends (`yield from` it in a fixture)."""
    name = unique_lab(prefix)
    up = l7lab("up", str(scenario), "--name", name)
    assert up.returncode == 0, up.stderr
    try:
        yield name
    finally:
        assert l7lab("down", name).returncode == 0
        assert nothing_left(name), leftovers(name)
