"""toFQDNs on real traffic, as a user meets it through `l7lab up`, `exec` and `fqdn cache`:
an FQDN-allowed host is unreachable before its name is looked up, reachable right after (the
DNS proxy holds the answer until the policy allows its address), unreachable again once the
TTL has passed with no connection open; an open connection keeps the address allowed past its
TTL, and closing it lets the address go; an endpoint keeps at most the cap of addresses per
name. (Without a DNS rule nothing is learned: scenarios/allow-only-google.yaml.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from dataplane.timescale import scaled
from tests.conftest import REPO, require_kernel
from tests.support.cli_lab import L7LAB, l7lab, up_lab

pytestmark = pytest.mark.xdist_group("fqdn-learning")

API = "203.0.113.20"
# Short, so expiry comes soon; an ordinary machine's seconds scaled to this one, so that on a slow
# machine the entry is still there when `fqdn cache` (a process start) looks right after the lookup.
API_TTL = math.ceil(scaled(3))
SCENARIO = f"""\
name: fqdn-learning
settings:
  probeTimeout: 0.5
  toFQDNsMaxIPsPerHostname: 2
namespaces:
  - name: kube-system
  - name: shop
pods:
  - {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}, ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]}}
  - {{name: client, namespace: shop, labels: {{app: client}}}}
world:
  - {{name: api, address: {API}, dnsNames: [api.example.com], ttl: {API_TTL}, ports: [{{port: 80}}]}}
  - {{name: other, address: 198.51.100.30, dnsNames: [www.example.org], ports: [{{port: 80}}]}}
  - {{name: many-1, address: 203.0.113.31, dnsNames: [many.example.com], ttl: 300, ports: [{{port: 80}}]}}
  - {{name: many-2, address: 203.0.113.32, dnsNames: [many.example.com], ttl: 300, ports: [{{port: 80}}]}}
  - {{name: many-3, address: 203.0.113.33, dnsNames: [many.example.com], ttl: 300, ports: [{{port: 80}}]}}
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: client-egress, namespace: shop}}
    spec:
      endpointSelector: {{matchLabels: {{app: client}}}}
      egress:
        - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}}}]
          toPorts: [{{ports: [{{port: "53", protocol: ANY}}], rules: {{dns: [{{matchPattern: "*"}}]}}}}]
        - toFQDNs: [{{matchName: api.example.com}}, {{matchName: many.example.com}}]
          toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"""

# A client that resolves and connects as the pod's programs do, then holds the connection open
# until its standard input closes.
HOLD = """\
import socket, sys
s = socket.create_connection(("api.example.com", 80), timeout=10)
print("connected", flush=True)
sys.stdin.read()
s.close()
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_kernel()
    path = tmp_path_factory.mktemp("fqdn") / "fqdn-learning.yaml"
    path.write_text(SCENARIO)
    yield from up_lab(path, "fq")


def curl(lab: str, url: str, expect_answer: bool) -> int:
    """curl's exit code: 0 the server answered, 28 no connection in time (dropped), 6 the name
    did not resolve. A request expected to pass gets a patient timeout (a loaded machine is slow,
    not dropping)."""
    out = l7lab("exec", "--lab", lab, "client", "--", "curl", "-s", "-o", "/dev/null", "-m",
                "10" if expect_answer else "1", url)
    return out.returncode


def cache(lab: str) -> list[dict]:
    out = l7lab("fqdn", "cache", lab, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["entries"]


def wait_until(check, what: str, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_reachable_only_between_lookup_and_expiry(lab: str) -> None:
    assert curl(lab, f"http://{API}/", expect_answer=False) == 28  # no lookup yet: dropped
    assert [e for e in cache(lab) if e["name"] == "api.example.com"] == []

    assert curl(lab, "http://api.example.com/", expect_answer=True) == 0  # looked up, then allowed at once
    entries = [e for e in cache(lab) if e["name"] == "api.example.com"]
    assert [(e["endpoint"], e["address"], e["ttl"], e["selectors"]) for e in entries] == [
        ("shop/client", API, API_TTL, ["FQDN matchName api.example.com"])]
    assert entries[0]["query"] == "api.example.com"
    assert curl(lab, f"http://{API}/", expect_answer=True) == 0  # by address too, while the entry lives

    # A name the policy's selectors do not match resolves (the DNS rule allows every name) but
    # teaches nothing that allows it.
    assert curl(lab, "http://www.example.org/", expect_answer=False) == 28

    wait_until(lambda: not [e for e in cache(lab) if e["name"] == "api.example.com"], "the TTL to pass", 60)
    assert curl(lab, f"http://{API}/", expect_answer=False) == 28  # expired, no connection open: dropped


def test_an_open_connection_keeps_an_expired_address_until_it_closes(lab: str) -> None:
    hold = subprocess.Popen([*L7LAB, "exec", "--lab", lab, "client", "--", sys.executable, "-c", HOLD],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout is not None and hold.stdout.readline().strip() == "connected"

        def zombie() -> bool:
            return any(e["name"] == "api.example.com" and e["zombie"] for e in cache(lab))
        wait_until(zombie, "the entry to expire and be kept for the open connection", 60)
        assert curl(lab, f"http://{API}/", expect_answer=True) == 0  # still allowed: a connection is open
    finally:
        assert hold.stdin is not None
        hold.stdin.close()
        hold.wait(timeout=scaled(30))
    # The open connection of the curl just above closes too: the entry goes once none is open.
    wait_until(lambda: not [e for e in cache(lab) if e["name"] == "api.example.com"], "the entry to go", 60)
    assert curl(lab, f"http://{API}/", expect_answer=False) == 28


def test_an_endpoint_keeps_at_most_the_cap_of_addresses_per_name(lab: str) -> None:
    # many.example.com has three addresses; the lab keeps two per name and endpoint (settings).
    # curl connects to the answer's first address, which is among those kept.
    assert curl(lab, "http://many.example.com/", expect_answer=True) == 0
    kept = {e["address"] for e in cache(lab) if e["name"] == "many.example.com"}
    assert len(kept) == 2 and kept < {"203.0.113.31", "203.0.113.32", "203.0.113.33"}, kept
    (over,) = {"203.0.113.31", "203.0.113.32", "203.0.113.33"} - kept
    for address in sorted(kept):
        assert curl(lab, f"http://{address}/", expect_answer=True) == 0
    assert curl(lab, f"http://{over}/", expect_answer=False) == 28  # over the cap: not learned
