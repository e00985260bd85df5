"""Services in scenarios: the `services` section loads into typed objects (ClusterIPs fixed or
allocated from the service range, targetPort by number or name), every mistake is an error
naming the field, probes reach services by name, namespace/name or DNS name, the hosts files
the cluster DNS answers the service names, and the oracle judges a flow to a service against the backend it
reaches (recomputed when pods are relabeled)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dataplane.abi import PROTO_TCP
from dataplane.clusterdns import zone_from_scenario
from dataplane.errors import ErrorList, SourceError
from dataplane.policy import Flow, PolicyEngine, parse_documents
from dataplane.policy.api import ServicePeer
from dataplane.policy.selectors import LabelSelector
from dataplane.scenario import PolicySource, Relabel, Step, load_scenario
from dataplane.yamlsource import load_documents
from dataplane.services import pick_backend, probe_backend, source_port_for
from tests.support.scenario_files import scenario_errors as errors_of, write_scenario as write

BASE = """\
name: svc
namespaces:
  - name: shop
  - name: other
pods:
  - {name: web-1, namespace: shop, labels: {app: web}, ports: [{port: 8080, name: http}]}
  - {name: web-2, namespace: shop, labels: {app: web}, ports: [{port: 9090, name: http}]}
  - {name: db, namespace: shop, labels: {app: db}, ports: [{port: 5432}]}
  - {name: client, namespace: shop, labels: {app: client}}
  - {name: outsider, namespace: other, labels: {app: client}}
  - {name: coredns, namespace: other, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}]}
world:
  - {name: partner, address: 203.0.113.10, ports: [{port: 443}]}
services:
  - name: web
    namespace: shop
    selector: {app: web}
    ports: [{name: http, port: 80, targetPort: http}, {name: alt, port: 81, targetPort: 8080}]
  - {name: db, namespace: other, clusterIP: 10.96.0.200, selector: {app: db}, ports: [{port: 5432}]}
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web-2-only-client, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "9090"}]}]
steps:
  - name: probes
    probes:
      - {from: client, to: web, expect: allowed}
      - {from: client, to: web.shop.svc.cluster.local:81, expect: dropped}
      - {from: client, to: shop/web:80, backend: web-2, expect: allowed}
"""


def test_services_load_with_allocated_and_fixed_cluster_ips(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, BASE))
    web, db = s.services["shop/web"], s.services["other/db"]
    assert (web.cluster_ip, db.cluster_ip) == ("10.96.0.1", "10.96.0.200")
    assert [(p.port, p.target_port, p.name) for p in web.ports] == [(80, "http", "http"), (81, 8080, "alt")]
    # targetPort by name resolves per pod, as Kubernetes resolves it per endpoint.
    assert [web.ports[0].backend_port(s.pods[k]) for k in ("shop/web-1", "shop/web-2")] == [8080, 9090]
    probes = s.steps[0].probes
    assert [(p.destination.kind, p.destination.name, p.destination.ip, p.destination.port, p.destination.backend)
            for p in probes] == [("service", "shop/web", "10.96.0.1", 80, ""),
                                 ("service", "shop/web", "10.96.0.1", 81, ""),
                                 ("service", "shop/web", "10.96.0.1", 80, "shop/web-2")]


def test_service_names_resolve_through_the_cluster_dns_bare_only_in_their_namespace(tmp_path: Path) -> None:
    """A pod's resolver tries a name with each suffix of its search path (ndots:5: every lab name
    has fewer dots), then as written: the bare name finds the service only from its namespace."""
    s = load_scenario(write(tmp_path, BASE))
    zone = zone_from_scenario(s)

    def lookup(name: str, namespace: str) -> tuple[str, ...]:
        for candidate in [f"{name}.{suffix}" for suffix in s.search_path(namespace)] + [name]:
            answer = zone.resolve(candidate, "A")
            if answer.addresses:
                return answer.addresses
        return ()

    for name in ("web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local"):
        assert lookup(name, "shop") == ("10.96.0.1",), name
    assert lookup("web", "other") == ()
    assert [lookup(n, "other") for n in ("web.shop", "web.shop.svc", "web.shop.svc.cluster.local")] == [("10.96.0.1",)] * 3


@pytest.mark.parametrize("change, fragment", [
    (("settings:\n  serviceCIDR: 10.200.0.0/16\n", ""), "overlaps the pod CIDR 10.200.0.0/24"),
    (("settings:\n  serviceCIDR: 8.8.8.0/24\n", ""), "expected a private IPv4 prefix"),
    (("settings:\n  serviceCIDR: 203.0.113.0/24\n", ""), "service range 203.0.113.0/24 holds world host 'partner'"),
    (("settings:\n  serviceCIDR: nonsense\n", ""), "settings.serviceCIDR: expected an IPv4 prefix"),
    (("clusterIP: 10.96.0.200", "clusterIP: 10.97.0.1"), "services[1].clusterIP: 10.97.0.1 is not a usable address"),
    (("{name: db, namespace: other,", "{name: db, namespace: nowhere,"), "services[1].namespace: namespace 'nowhere'"),
    (("{name: db, namespace: other,", "{name: client, namespace: shop,"), "a service and a pod of one namespace"),
    (("{name: http, port: 80, targetPort: http}, {name: alt,", "{port: 80, targetPort: http}, {name: alt,"),
     "services[0].ports[0].name: a service with several ports must name each"),
    (("port: 81, targetPort: 8080}", "port: 80, targetPort: 8080}"), "port 80/TCP is declared twice"),
    (("to: web.shop.svc.cluster.local:81", "to: web.shop.svc.cluster.local:82"),
     "service shop/web has no port 82/TCP (ports: 80/TCP, 81/TCP)"),
    (("backend: web-2", "backend: outsider"), "backend: expected a pod of namespace 'shop'"),
    (("{from: client, to: web, expect", "{from: client, to: partner, backend: web-1, expect"),
     "only a probe to a service names a backend"),
    (("targetPort: 8080}", "targetPort: 0}"), "services[0].ports[1].targetPort"),
])
def test_service_mistakes_name_the_field(tmp_path: Path, change: tuple[str, str], fragment: str) -> None:
    old, new = change
    if old.startswith("settings:"):
        text = BASE + old
    else:
        assert old in BASE
        text = BASE.replace(old, new)
    errors = errors_of(write(tmp_path, text))
    assert any(fragment in e and "s.yaml" in e for e in errors), errors


def test_cluster_ip_must_be_a_usable_address_of_the_range(tmp_path: Path) -> None:
    """The range's network and broadcast addresses are no ClusterIPs; two services cannot share one."""
    for ip in ("10.96.0.0", "10.96.0.255"):
        text = BASE.replace("selector: {app: web}\n", f"selector: {{app: web}}\n    clusterIP: {ip}\n")
        assert any(f"{ip} is not a usable address of the service range 10.96.0.0/24" in e
                   for e in errors_of(write(tmp_path, text)))
    text = BASE.replace("selector: {app: web}\n", "selector: {app: web}\n    clusterIP: 10.96.0.200\n")
    assert any("10.96.0.200 is already the ClusterIP of services[0]" in e for e in errors_of(write(tmp_path, text)))


def test_oracle_judges_the_backend_the_flow_reaches(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, BASE))
    engine = PolicyEngine(s)
    web = engine.map_state().services[("10.96.0.1", 80, PROTO_TCP)]
    assert [(b.pod, b.port) for b in web.backends] == [("shop/web-1", 8080), ("shop/web-2", 9090)]
    # web-1 is the first backend: its target port 8080 is not allowed by web's ingress policy.
    first = engine.verdict(Flow("shop/client", "10.96.0.1", "TCP", 80))
    assert first.outcome == "dropped"
    assert first.translation == "service shop/web 10.96.0.1:80/TCP -> pod shop/web-1 10.200.0.2:8080"
    assert first.trace[0].startswith(first.translation)
    pinned = engine.verdict(Flow("shop/client", "10.96.0.1", "TCP", 80, backend="shop/web-2"))
    assert (pinned.outcome, pinned.translation.split(" -> ")[1]) == ("allowed", "pod shop/web-2 10.200.0.3:9090")
    # Relabel web-1 out of the service: web-2 is the only (and first) backend now.
    engine.apply_step(Step(1, "relabel", relabel=(Relabel("pod", "shop/web-1", {"app": "gone"}),)))
    assert engine.verdict(Flow("shop/client", "10.96.0.1", "TCP", 80)).outcome == "allowed"
    with pytest.raises(ValueError, match="shop/web-1 is no backend of service shop/web"):
        engine.verdict(Flow("shop/client", "10.96.0.1", "TCP", 80, backend="shop/web-1"))
    # No backend at all: dropped (the datapath's REASON_NO_SERVICE_BACKEND).
    engine.apply_step(Step(2, "relabel", relabel=(Relabel("pod", "shop/web-2", {"app": "gone"}),)))
    empty = engine.verdict(Flow("shop/client", "10.96.0.1", "TCP", 80))
    assert empty.outcome == "dropped" and "no backend" in empty.trace[-1]


def test_source_port_search_lands_on_the_backend_it_asks_for(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, BASE))
    web = PolicyEngine(s).map_state().services[("10.96.0.1", 80, PROTO_TCP)]
    client = s.pods["shop/client"].ip
    for pod in ("shop/web-1", "shop/web-2"):
        sport = source_port_for(web, client, pod)
        assert sport is not None and pick_backend(web, client, sport).pod == pod  # type: ignore[union-attr]
    assert probe_backend(web, client).pod == "shop/web-1"  # type: ignore[union-attr]


def cnp_errors(egress: str) -> list[str]:
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: shop}\n"
            "spec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n" + textwrap.indent(egress, "    "))
    with pytest.raises((SourceError, ErrorList)) as info:
        parse_documents(load_documents(text, "p.yaml"))
    exc = info.value
    return [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])]


def test_to_services_parses_by_name_and_by_selector() -> None:
    text = textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
            - toServices:
                - k8sService: {serviceName: web}
                - k8sServiceSelector: {selector: {matchLabels: {tier: db}}, namespace: other}
        """)
    (policy,) = parse_documents(load_documents(text, "p.yaml"))
    peers = policy.specs[0].rules[0].peers
    assert peers == (ServicePeer("shop", name="web"),
                     ServicePeer("other", selector=LabelSelector((("tier", "db"),))))


@pytest.mark.parametrize("egress, fragment", [
    ("- toServices: [{k8sService: {serviceName: web}}]\n  toPorts: [{ports: [{port: '80'}]}]\n",
     "toServices cannot be combined with toPorts"),
    ("- toServices: [{k8sService: {serviceName: web}, k8sServiceSelector: {selector: {}}}]\n",
     "expected exactly one of k8sService or k8sServiceSelector"),
    ("- toServices: [{k8sService: {serviceName: Web_1}}]\n", "expected a service name"),
    ("- toServices: [{k8sService: {namespace: shop}}]\n", "serviceName"),
    ("- toServices: [{k8sServiceSelector: {selector: {matchLabels: {a: b}}, namespace: 7}}]\n",
     "expected a namespace name"),
])
def test_to_services_mistakes_name_the_field(egress: str, fragment: str) -> None:
    errors = cnp_errors(egress)
    assert any(fragment in e and "p.yaml" in e and "toServices" in e for e in errors), errors


def test_to_services_is_no_ingress_field() -> None:
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: shop}\n"
            "spec:\n  endpointSelector: {}\n  ingress:\n    - toServices: [{k8sService: {serviceName: web}}]\n")
    with pytest.raises((SourceError, ErrorList)) as info:
        parse_documents(load_documents(text, "p.yaml"))
    assert "toServices" in str(info.value)


def test_to_services_allows_the_backends_of_the_service(tmp_path: Path) -> None:
    """client may leave only to the backends of service web (by name), then of the services
    labelled tier=db (by selector): judged at the backend pod, following relabels."""
    text = BASE.replace("  - {name: db, namespace: other, clusterIP: 10.96.0.200,",
                        "  - {name: postgres, namespace: shop, labels: {tier: db}, clusterIP: 10.96.0.200,")
    text += textwrap.indent(textwrap.dedent("""\
          - name: egress by service
            apply:
              - apiVersion: cilium.io/v2
                kind: CiliumNetworkPolicy
                metadata: {name: client-to-web, namespace: shop}
                spec:
                  endpointSelector: {matchLabels: {app: client}}
                  egress:
                    - toServices: [{k8sService: {serviceName: web, namespace: shop}}]
        """), "  ")
    s = load_scenario(write(tmp_path, text))
    engine = PolicyEngine(s)
    engine.apply_step(s.steps[1])
    web2, db = s.pods["shop/web-2"], s.pods["shop/db"]
    assert engine.verdict(Flow("shop/client", web2.ip, "TCP", 9090)).outcome == "allowed"
    assert engine.verdict(Flow("shop/client", db.ip, "TCP", 5432)).outcome == "dropped"
    assert engine.verdict(Flow("shop/client", "10.96.0.1", "TCP", 80, backend="shop/web-2")).outcome == "allowed"
    # web-2 relabeled out of the service: no longer a backend, no longer allowed by toServices.
    engine.apply_step(Step(2, "relabel", relabel=(Relabel("pod", "shop/web-2", {"app": "gone"}),)))
    assert engine.verdict(Flow("shop/client", web2.ip, "TCP", 9090)).outcome == "dropped"
    by_label = Step(3, "by selector", apply=tuple(PolicySource(d) for d in load_documents(textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: client-to-db, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
            - toServices: [{k8sServiceSelector: {selector: {matchLabels: {tier: db}}}}]
        """), "p.yaml")))
    engine.apply_step(by_label)
    assert engine.verdict(Flow("shop/client", db.ip, "TCP", 5432)).outcome == "allowed"


def test_a_probe_pinned_to_a_pod_that_left_the_service_is_an_error(tmp_path: Path) -> None:
    from dataplane.runner import OracleExecutor, run_scenario  # noqa: PLC0415

    text = BASE + ("  - relabel: [{pod: shop/web-1, set: {app: gone}}]\n"
                   "  - probes:\n"
                   "      - {from: client, to: web, backend: web-1, expect: allowed}\n"
                   "      - {from: client, to: web, backend: web-2, expect: allowed}\n")
    s = load_scenario(write(tmp_path, text))
    report = run_scenario(s, OracleExecutor(PolicyEngine(s)), explain=True)
    gone, kept = report.results[-2:]
    assert gone.observed.outcome == "error" and "shop/web-1 is no backend of service shop/web" in gone.observed.detail
    assert kept.passed


@pytest.mark.parametrize("probe, fragment", [
    ("{from: partner, to: shop/web:80, expect: dropped}",
     "'shop/web' is a service: its ClusterIP is reachable from pods only, not from world host 'partner'"),
    ("{from: client, to: web, icmp: {type: echo}, expect: dropped}",
     "'web' is a service: a ClusterIP translates TCP and UDP ports and answers no ping"),
])
def test_a_service_is_no_target_for_a_world_host_or_a_ping(tmp_path: Path, probe: str, fragment: str) -> None:
    text = BASE.replace("      - {from: client, to: web, expect: allowed}\n", f"      - {probe}\n")
    errors = errors_of(write(tmp_path, text))
    assert any("steps[0].probes[0].to" in e and fragment in e for e in errors), errors
