"""Scenario files: the valid ones load into typed objects; each invalid one gives an error that
names the file, the line and the field path, and says what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from dataplane.clusterdns import zone_from_scenario
from dataplane.scenario import load_scenario, schema
from tests.support.scenario_files import scenario_errors as errors_of, write_scenario as write

REPO = Path(__file__).resolve().parents[2]

BASE = """\
name: demo
namespaces:
  - name: shop
    labels: {team: shop}
pods:
  - name: web
    namespace: shop
    labels: {app: web}
    ports: [{port: 80, name: http}, {port: 53, protocol: UDP}]
  - name: api
    namespace: shop
    ports: [{port: 8080}]
world:
  - name: partner
    address: 203.0.113.10
    dnsNames: [api.partner.example.com]
    ports: [{port: 443}]
steps:
  - name: check
    probes:
      - {from: web, to: api:8080, expect: allowed}
"""


def test_valid_scenario_loads_into_typed_objects(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, BASE))
    assert s.name == "demo"
    assert set(s.pods) == {"shop/web", "shop/api"}
    web = s.pods["shop/web"]
    assert web.ip == "10.200.0.2" and s.pods["shop/api"].ip == "10.200.0.3"  # .1 is the node
    assert [(p.port, p.protocol, p.name) for p in web.ports] == [(80, "TCP", "http"), (53, "UDP", "")]
    probe = s.steps[0].probes[0]
    assert probe.source == "shop/web" and probe.destination.ip == "10.200.0.3" and probe.destination.port == 8080
    assert probe.location.line == 21
    assert zone_from_scenario(s).resolve("web.shop.svc.cluster.local", "A").addresses == ("10.200.0.2",)


def test_default_port_and_dns_destination(tmp_path: Path) -> None:
    dns_pod = "  - {name: coredns, namespace: shop, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}]}\nworld:"
    s = load_scenario(write(tmp_path, BASE.replace("to: api:8080", "to: api.partner.example.com")
                            .replace("world:", dns_pod)))
    dest = s.steps[0].probes[0].destination
    assert (dest.kind, dest.name, dest.ip, dest.port, dest.dns_name) == ("world", "partner", "203.0.113.10", 443, "api.partner.example.com")


def test_dns_probe_asks_over_udp_port_53_by_default(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, BASE.replace("{from: web, to: api:8080, expect: allowed}",
                                                   "{from: api, to: web, dns: {name: WWW.Example.COM.}, expect: refused}")))
    probe = s.steps[0].probes[0]
    assert (probe.protocol, probe.destination.port, probe.dns.name, probe.dns.type) == ("UDP", 53, "www.example.com", "A")
    assert probe.request_text == "DNS A www.example.com"


@pytest.mark.parametrize("change, line, path, fragment", [
    (("name: demo", "name: demo\ncolour: blue"), 2, "colour", "unknown field 'colour'"),
    (("    labels: {app: web}", "    labels: {app: web}\n    replicas: 2"), 9, "pods[0].replicas", "unknown field 'replicas'"),
    (("{port: 8080}", "{port: http}"), 12, "pods[1].ports[0].port", "expected integer, got string 'http'"),
    (("{port: 8080}", "{port: 70000}"), 12, "pods[1].ports[0].port", "70000 is out of range"),
    (("{port: 53, protocol: UDP}", "{port: 53, protocol: ICMP}"), 9, "pods[0].ports[1].protocol", "expected one of TCP, UDP"),
    (("expect: allowed", "expect: blocked"), 21, "steps[0].probes[0].expect", "expected one of allowed, audited, dropped, denied, refused"),
    (("address: 203.0.113.10", "address: 10.200.0.7"), 15, "world[0].address", "inside the pod CIDR 10.200.0.0/24 (settings.podCIDR)"),
    (("address: 203.0.113.10", "address: 10.200.0.1"), 15, "world[0].address", "an address of the lab node"),
    (("address: 203.0.113.10", "address: 169.254.1.1"), 15, "world[0].address", "the pods' gateway 169.254.1.1"),
    (("address: 203.0.113.10", "address: 127.0.0.53"), 15, "world[0].address", "127.0.0.53 is loopback (127.0.0.0/8)"),
    (("address: 203.0.113.10", "address: 0.1.2.3"), 15, "world[0].address", "'this network' (0.0.0.0/8)"),
    (("address: 203.0.113.10", "address: 224.0.0.251"), 15, "world[0].address", "multicast (224.0.0.0/4)"),
    (("address: 203.0.113.10", "address: 240.1.2.3"), 15, "world[0].address", "reserved (240.0.0.0/4)"),
    (("address: 203.0.113.10", "address: 255.255.255.255"), 15, "world[0].address", "the limited broadcast address"),
    (("address: 203.0.113.10", "address: 2001:db8::1"), 15, "world[0].address", "expected an IPv4 address written as four decimal numbers"),
    (("address: 203.0.113.10", "address: example.com"), 15, "world[0].address", "expected an IPv4 address like 203.0.113.10, got 'example.com'"),
    (("    ports: [{port: 443}]\n", "    ports: [{port: 443}]\n  - {name: twin, address: 203.0.113.10}\n"), 18, "world[1].address",
     "address 203.0.113.10 is already used by world[0] (partner)"),
    (("from: web,", "from: nobody,"), 21, "steps[0].probes[0].from", "world hosts: partner"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: partner, to: partner:443, expect: allowed}"), 21, "steps[0].probes[0].to",
     "a probe from world host 'partner' goes to a pod"),
    (("from: web,", "from: nobody,"), 21, "steps[0].probes[0].from", "unknown pod 'nobody'"),
    (("to: api:8080", "to: ghost:80"), 21, "steps[0].probes[0].to", "unknown destination 'ghost'"),
    (("to: api:8080", "to: api:99999"), 21, "steps[0].probes[0].to", "expected a port number 1-65535"),
    (("    namespace: shop\n    ports: [{port: 8080}]", "    namespace: store\n    ports: [{port: 8080}]"), 11, "pods[1].namespace", "namespace 'store' is not declared"),
    (("  - name: api\n", "  - name: web\n"), 10, "pods[1].name", "pod 'shop/web' is declared twice"),
    (("    probes:", "    apply: []\n    probes:"), 19, "steps[0]", "exactly one of apply, delete, relabel, audit, probes or expire"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: web, to: api:8080, protocol: UDP, http: {path: /}, expect: allowed}"), 21, "steps[0].probes[0].http", "needs protocol TCP"),
    (("name: demo", "name: Demo_Lab"), 1, "name", "invalid value 'Demo_Lab'"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: web, protocol: SCTP, dns: {name: a.example}, expect: allowed}"), 21, "steps[0].probes[0].protocol", "protocol must be UDP (the default) or TCP"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: web, protocol: TCP, dns: {name: a.example}, expect: allowed}"), 21, "steps[0].probes[0].to", "'web' serves no DNS over TCP: a DNS probe needs a destination declaring port 53/TCP"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: web, protocol: TCP, dns: {name: a.example}, expect: denied}"), 21, "steps[0].probes[0].expect", "a DNS probe expects allowed, audited, dropped or refused"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: web, dns: {name: 'bad name'}, expect: allowed}"), 21, "steps[0].probes[0].dns.name", "invalid value 'bad name'"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: web, dns: {name: a.example, type: BOGUS}, expect: allowed}"), 21, "steps[0].probes[0].dns.type", "expected one of A, AAAA"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: web, dns: {name: a.example}, expect: denied}"), 21, "steps[0].probes[0].expect", "a UDP probe expects allowed, audited, dropped or refused"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: web, to: api, dns: {name: a.example}, expect: allowed}"), 21, "steps[0].probes[0].to", "'api' serves no DNS over UDP: a DNS probe needs a destination declaring port 53/UDP"),
    (("{from: web, to: api:8080, expect: allowed}", "{from: api, to: 'web:5353', dns: {name: a.example}, expect: allowed}"), 21, "steps[0].probes[0].to", "listen on port 53 only, got port 5353"),
    (("{port: 80, name: http}", "{port: 80, name: http}, {port: 80}"), 9, "pods[0].ports[1]", "port 80/TCP is declared twice"),
    (("name: demo", "name: demo\nsettings: {ipBlockSelectsPods: 'yes'}"), 2, "settings.ipBlockSelectsPods", "expected boolean, got string 'yes'"),
    # per-endpoint audit and audit steps
    (("    labels: {app: web}", "    labels: {app: web}\n    audit: yes please"), 9, "pods[0].audit", "expected boolean, got string"),
    (("    labels: {team: shop}", "    labels: {team: shop}\n    audit: 1"), 5, "namespaces[0].audit", "expected boolean, got number 1"),
    (("    probes:\n      - {from: web, to: api:8080, expect: allowed}", "    audit: [{pod: nobody, enabled: true}]"), 20, "steps[0].audit[0].pod", "unknown pod 'nobody'; pods: shop/api, shop/web"),
    (("    probes:\n      - {from: web, to: api:8080, expect: allowed}", "    audit: [{namespace: store, enabled: true}]"), 20, "steps[0].audit[0].namespace", "unknown namespace 'store'; declared: shop"),
    (("    probes:\n      - {from: web, to: api:8080, expect: allowed}", "    audit: [{pod: web}]"), 20, "steps[0].audit[0]", "'enabled' is required"),
    (("    probes:\n      - {from: web, to: api:8080, expect: allowed}", "    audit: [{pod: web, enabled: off!}]"), 20, "steps[0].audit[0].enabled", "expected boolean"),
    (("    probes:\n      - {from: web, to: api:8080, expect: allowed}", "    audit: [{pod: web, namespace: shop, enabled: true}]"), 20, "steps[0].audit[0]", "at most one of pod or namespace"),
])
def test_invalid_scenario_names_file_line_and_field(tmp_path: Path, change: tuple[str, str], line: int, path: str, fragment: str) -> None:
    assert change[0] in BASE
    file = write(tmp_path, BASE.replace(change[0], change[1], 1))
    errors = errors_of(file)
    assert any(e.startswith(f"{file}:{line}: {path}: ") and fragment in e for e in errors), errors


def test_audit_per_endpoint_and_audit_steps_load(tmp_path: Path) -> None:
    """`audit: true` on a pod or a namespace, and audit steps naming a pod, a namespace or
    (neither) every endpoint."""
    from dataplane.scenario import AuditChange  # noqa: PLC0415

    text = BASE.replace("    labels: {team: shop}", "    labels: {team: shop}\n    audit: false") \
               .replace("    ports: [{port: 8080}]", "    ports: [{port: 8080}]\n    audit: true") \
               .replace("      - {from: web, to: api:8080, expect: allowed}\n",
                        "      - {from: web, to: api:8080, expect: audited}\n"
                        "  - audit: [{pod: api, enabled: false}, {namespace: shop, enabled: true}, {enabled: false}]\n")
    s = load_scenario(write(tmp_path, text))
    assert s.pods["shop/api"].audit and not s.pods["shop/web"].audit and not s.namespaces["shop"].audit
    assert s.steps[0].probes[0].expect == "audited"
    assert s.steps[1].kind == "audit"
    assert s.steps[1].audit == (AuditChange("pod", "shop/api", False), AuditChange("namespace", "shop", True),
                                AuditChange("all", "", False))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE.replace("{port: 8080}", "{port: 0}").replace("expect: allowed", "expect: maybe")
    errors = errors_of(write(tmp_path, text))
    assert len(errors) == 2
    assert any("pods[1].ports[0].port" in e for e in errors) and any("steps[0].probes[0].expect" in e for e in errors)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, "name: demo\npods:\n  - name: [unclosed\n"))
    assert errors[0].startswith(f"{tmp_path / 's.yaml'}:") and "invalid YAML" in errors[0]


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, BASE.replace("name: demo", "name: demo\nname: other")))
    assert errors == [f"{tmp_path / 's.yaml'}:2: name: duplicate key 'name'"]


def test_missing_policy_file_names_the_reference(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, BASE + "policies:\n  - file: nowhere.yaml\n"))
    assert errors[0].startswith(f"{tmp_path / 's.yaml'}:23: policies[0].file: cannot load policy file")
    assert "nowhere.yaml" in errors[0]


def test_ambiguous_pod_name_asks_for_the_namespace(tmp_path: Path) -> None:
    text = BASE.replace("pods:\n", "pods:\n  - name: api\n    ports: [{port: 1}]\n")
    errors = errors_of(write(tmp_path, text.replace("to: api:8080", "to: api")))
    assert any("ambiguous" in e and "default/api" in e and "shop/api" in e for e in errors), errors


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    assert "cannot read file" in errors_of(tmp_path / "absent.yaml")[0]


def test_shipped_scenarios_are_valid() -> None:
    files = sorted((REPO / "scenarios").glob("*.yaml"))
    assert files, "scenarios/ is empty"
    for file in files:
        load_scenario(file)


def test_one_schema_file_shipped_enforced_and_linked_from_the_docs() -> None:
    shipped = REPO / "dataplane" / "schema" / "scenario.schema.json"
    found = sorted(p for top in ("dataplane", "docs", "proxy", "l7", "scenarios", "tests")
                   for p in (REPO / top).rglob("*schema*.json"))
    assert found == [shipped]
    assert json.loads(shipped.read_text()) == schema()
    jsonschema.Draft202012Validator.check_schema(schema())
    assert "](../dataplane/schema/scenario.schema.json)" in (REPO / "docs" / "scenarios.md").read_text()
    assert "](dataplane/schema/scenario.schema.json)" in (REPO / "README.md").read_text()


def test_annotated_example_in_docs_matches_the_schema() -> None:
    import yaml

    text = (REPO / "docs" / "scenarios.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    jsonschema.Draft202012Validator(schema()).validate(yaml.safe_load(block))


def test_the_namespace_name_label_is_kept_as_kubernetes_keeps_it(tmp_path: Path) -> None:
    """kubernetes.io/metadata.name is the namespace's own name on every namespace: a scenario
    cannot declare it otherwise nor relabel it, and it always carries the real name."""
    changed = write(tmp_path, BASE.replace("labels: {team: shop}", "labels: {team: shop, kubernetes.io/metadata.name: store}"))
    (error,) = errors_of(changed)
    assert error.startswith(f"{changed}:4: namespaces[0].labels") and "keeps it so; got 'store'" in error, error
    relabel = BASE.replace("  - name: check\n", "  - name: rename\n    relabel:\n      - {namespace: shop, remove: [kubernetes.io/metadata.name]}\n"
                                                  "  - name: check\n")
    (error,) = errors_of(write(tmp_path, relabel, "r.yaml"))
    assert "steps[0].relabel[0]: kubernetes.io/metadata.name cannot be removed" in error, error
    same = load_scenario(write(tmp_path, BASE.replace("labels: {team: shop}", "labels: {team: shop, kubernetes.io/metadata.name: shop}"), "ok.yaml"))
    assert same.namespaces["shop"].labels["kubernetes.io/metadata.name"] == "shop"

    from dataplane.policy.selectors import NAMESPACE_LABELS_PREFIX, pod_identity_labels  # noqa: PLC0415

    labels = pod_identity_labels({"app": "web"}, "shop", {"kubernetes.io/metadata.name": "other"})
    assert labels[NAMESPACE_LABELS_PREFIX + "kubernetes.io/metadata.name"] == "shop"


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.7", "192.168.1.1", "172.16.5.4", "8.8.8.8",
                                     "100.64.0.1", "203.0.113.10", "198.51.100.7", "10.200.1.1"])
def test_world_hosts_may_have_any_unicast_address_outside_the_cluster(tmp_path: Path, address: str) -> None:
    """A world host lives in the lab's own namespace behind the node's world link: any unicast
    IPv4 address outside the pod CIDR and the node's addresses will do, link-local and private
    ranges included (the cloud metadata endpoint, a collector in 10.0.0.0/8)."""
    s = load_scenario(write(tmp_path, BASE.replace("address: 203.0.113.10", f"address: {address}")))
    assert s.world["partner"].address == address
    assert zone_from_scenario(s).resolve("api.partner.example.com", "A").addresses == (address,)


def test_a_world_host_outside_another_pod_cidr(tmp_path: Path) -> None:
    """The pod CIDR is the scenario's: an address the default one would hold is fine outside it."""
    text = BASE.replace("name: demo\n", "name: demo\nsettings: {podCIDR: 10.99.0.0/24}\n") \
               .replace("address: 203.0.113.10", "address: 10.200.0.7")
    assert load_scenario(write(tmp_path, text)).world["partner"].address == "10.200.0.7"
    errors = errors_of(write(tmp_path, text.replace("address: 10.200.0.7", "address: 10.99.0.1"), "t.yaml"))
    assert any("world[0].address: 10.99.0.1 is an address of the lab node" in e for e in errors), errors


def test_a_probe_may_start_from_a_world_host(tmp_path: Path) -> None:
    """`from: <world host>`: ingress from outside the cluster, sent from the host's namespace."""
    s = load_scenario(write(tmp_path, BASE.replace("{from: web, to: api:8080, expect: allowed}",
                                                   "{from: partner, to: shop/api:8080, expect: dropped}")))
    probe = s.steps[0].probes[0]
    assert (probe.source, probe.destination.kind, probe.destination.name, probe.expect) == \
        ("partner", "pod", "shop/api", "dropped")
