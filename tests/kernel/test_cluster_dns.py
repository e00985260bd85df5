"""The cluster DNS on a real lab: a pod labelled k8s-app=kube-dns answers on port 53 (UDP and
TCP) from the lab's zone, and every pod's resolv.conf names it with the kubelet's search path,
so the system resolver inside a pod (`l7lab exec`, /etc/netns applied) finds services and pods
by bare name, world hosts by their DNS names and aliases, and nothing else; the hosts files no
longer carry any of those names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from dataplane import topology
from dataplane.lab import NETNS_ETC, Lab, lab_dir, lab_prefix
from dataplane.logfiles import read_all, request_log
from dataplane.policy import PolicyEngine
from dataplane.scenario import load_scenario
from dataplane.timescale import scaled
from tests.conftest import unique_lab
from tests.support.cli_lab import l7lab

pytestmark = pytest.mark.kernel

SCENARIO = """\
name: cdns
namespaces:
  - name: kube-system
  - name: shop
pods:
  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}, {port: 53}]}
  - {name: web-1, namespace: shop, labels: {app: web}, ports: [{port: 8080}]}
  - {name: client, namespace: shop, labels: {app: client}}
world:
  - {name: www, address: 203.0.113.20, dnsNames: [www.example.com], aliases: [shop.example.com], ports: [{port: 80}]}
  - {name: mirror, address: 203.0.113.21, dnsNames: [www.example.com], ports: [{port: 80}]}
services:
  - {name: web, namespace: shop, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""

# Run by the pod's own Python through `l7lab exec`: the system resolver (glibc, reading the
# pod's /etc/resolv.conf and /etc/hosts) as any program in the pod uses it.
RESOLVE = textwrap.dedent("""\
    import json, socket, sys
    out = {}
    for name in sys.argv[1:]:
        try:
            out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})
        except socket.gaierror as exc:
            out[name] = exc.args[1]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def lab(datapath, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:  # noqa: ANN001 - session fixture
    path = tmp_path_factory.mktemp("cdns") / "cdns.yaml"
    path.write_text(SCENARIO)
    scenario = load_scenario(path).with_name(unique_lab("cdns"))
    with Lab(scenario, datapath=datapath, policy=PolicyEngine(scenario)) as lab:
        yield lab


def resolve_in_pod(lab: Lab, pod: str, *names: str) -> dict[str, object]:
    out = l7lab("exec", "--lab", lab.name, "--user", "nobody", pod, "--", "python3", "-c", RESOLVE, *names,
                timeout=120)
    assert out.returncode == 0, out
    return json.loads(out.stdout)


def test_the_system_resolver_in_a_pod_finds_cluster_and_world_names(lab: Lab) -> None:
    scenario = lab.scenario
    vip = scenario.services["shop/web"].cluster_ip
    web1 = scenario.pods["shop/web-1"].ip
    dns_pod = scenario.pods["kube-system/kube-dns"].ip
    found = resolve_in_pod(lab, "shop/client", "web", "web-1", "web-1.shop", "kube-dns.kube-system",
                           "web.shop.svc.cluster.local", "www.example.com", "shop.example.com", "nothing-here.example.com")
    assert found["web"] == [vip]  # a service by bare name, through the search path
    assert found["web-1"] == found["web-1.shop"] == [web1]  # a pod by bare name, and name.namespace
    assert found["kube-dns.kube-system"] == [dns_pod]
    assert found["web.shop.svc.cluster.local"] == [vip]
    assert found["www.example.com"] == ["203.0.113.20", "203.0.113.21"]  # a name two world hosts share
    assert found["shop.example.com"] == ["203.0.113.20", "203.0.113.21"]  # an alias: its CNAME's target
    assert isinstance(found["nothing-here.example.com"], str)  # an unknown name fails (gaierror)
    # The names of another namespace need the namespace: a bare name is resolved in the pod's own.
    assert isinstance(resolve_in_pod(lab, "kube-system/kube-dns", "web")["web"], str)
    # The DNS pod saw those questions, each on its log line.
    ns = lab.record.endpoints["kube-system/kube-dns"].netns.removeprefix(lab_prefix(lab.name))
    asked = {(r["dns"], r["rcode"]) for r in read_all(request_log(lab_dir(lab.name), ns)) if "dns" in r}
    assert ("web.shop.svc.cluster.local", "NOERROR") in asked and ("shop.example.com", "NOERROR") in asked
    assert ("nothing-here.example.com", "NXDOMAIN") in asked


def test_a_query_over_tcp_is_answered_by_the_dns_pod(lab: Lab) -> None:
    server = lab.scenario.pods["kube-system/kube-dns"].ip
    sock = topology.socket_in(lab.record.endpoints["shop/client"].netns)
    try:
        sock.settimeout(scaled(10))
        sock.connect((server, 53))
        first = dns.query.tcp(dns.message.make_query("shop.example.com", "A"), server, timeout=scaled(10), sock=sock)
        second = dns.query.tcp(dns.message.make_query("nothing.shop.svc.cluster.local", "A"), server, timeout=scaled(10),
                               sock=sock)  # the same connection: several queries per connection
    finally:
        sock.close()
    assert first.rcode() == dns.rcode.NOERROR
    assert [dns.rdatatype.to_text(r.rdtype) for r in first.answer] == ["CNAME", "A"]
    assert sorted(rd.address for rd in first.answer[1]) == ["203.0.113.20", "203.0.113.21"]
    assert second.rcode() == dns.rcode.NXDOMAIN and second.authority[0].name.to_text() == "cluster.local."
    ns = lab.record.endpoints["kube-system/kube-dns"].netns.removeprefix(lab_prefix(lab.name))
    over_tcp = [r for r in read_all(request_log(lab_dir(lab.name), ns)) if r.get("transport") == "TCP"]
    assert [r["dns"] for r in over_tcp][-2:] == ["shop.example.com", "nothing.shop.svc.cluster.local"]


def test_hosts_files_name_no_world_host_service_or_other_pod(lab: Lab) -> None:
    client = lab.record.endpoints["shop/client"]
    hosts = (NETNS_ETC / client.netns / "hosts").read_text()
    names = {name for line in hosts.splitlines() if line and not line.startswith("#") for name in line.split()[1:]}
    assert names == {"localhost", "node", "client"}
    for other in ("www", "www.example.com", "web", "web-1", "kube-dns"):
        assert other not in names
    resolv = (NETNS_ETC / client.netns / "resolv.conf").read_text().splitlines()
    assert resolv == ["search shop.svc.cluster.local svc.cluster.local cluster.local",
                      f"nameserver {lab.scenario.nameserver}", "options ndots:5"]
    # A world host is outside the cluster: its resolver names nobody.
    world = lab.record.endpoints["www"]
    assert "nameserver 127.0.0.1" in (NETNS_ETC / world.netns / "resolv.conf").read_text()
    assert "www.example.com" not in (NETNS_ETC / world.netns / "hosts").read_text()


def test_the_zone_file_lies_in_the_recorded_lab_directory(lab: Lab) -> None:
    zone = lab.zone_file
    assert zone.is_file() and zone.parent == lab_dir(lab.name)
    assert {"kind": "dir", "path": str(lab_dir(lab.name))} in lab.record.resources  # down and clean remove it
    assert json.loads(zone.read_text())["addresses"]["www.example.com"]["addresses"] == ["203.0.113.20", "203.0.113.21"]


def test_a_world_host_cannot_resolve_cluster_names(lab: Lab) -> None:
    world = lab.record.endpoints["www"]
    out = subprocess.run(["ip", "netns", "exec", world.netns, sys.executable, "-c",
                          "import socket, sys\ntry:\n    socket.gethostbyname(sys.argv[1])\nexcept OSError:\n"
                          "    print('unresolved')\n", "web.shop.svc.cluster.local"],
                         capture_output=True, text=True, timeout=scaled(60))
    assert out.stdout.strip() == "unresolved", out
