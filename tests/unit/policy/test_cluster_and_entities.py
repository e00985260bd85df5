"""The cluster label every pod identity carries and the entities kube-apiserver and remote-node.

Sources (read, not copied): Cilium pkg/k8s/apis/cilium.io/const.go (PolicyLabelCluster,
io.cilium.k8s.policy.cluster), pkg/clustermesh/types (cluster name: at most 32 characters,
lowercase alphanumerics and '-', alphanumeric at both ends), pkg/identity/numericidentity.go
(remote-node 6, kube-apiserver 7), pkg/policy/api/entity.go (entities), cilium/cilium#20550
(CIDR rules do not select the API server's identity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.abi import IDENTITY_KUBE_APISERVER, IDENTITY_REMOTE_NODE, IDENTITY_WORLD
from dataplane.errors import ErrorList, SourceError
from dataplane.fqdn.oracle import expected_outcomes
from dataplane.policy import Flow, PolicyEngine, explain_text
from dataplane.scenario import load_scenario
from tests.support.policy import ccnp, cnp, engine, outcome

REPO = Path(__file__).resolve().parents[3]

TOPO = """\
name: cluster
namespaces:
  - {name: shop}
  - {name: ops}
pods:
  - {name: client, namespace: shop, labels: {app: client}}
  - {name: api, namespace: shop, labels: {app: api}, ports: [{port: 8080}]}
  - {name: tool, namespace: ops, labels: {app: tool}}
world:
  - {name: apiserver, address: 203.0.113.10, entity: kube-apiserver, dnsNames: [kubernetes.example.com], ports: [{port: 443}]}
  - {name: node2, address: 203.0.113.11, entity: remote-node, ports: [{port: 10250}]}
  - {name: www, address: 203.0.113.20, dnsNames: [www.example.com, _http._tcp.www.example.com], ports: [{port: 443}, {port: 80}]}
"""


def test_identity_labels_carry_the_default_cluster() -> None:
    eng = engine("", TOPO)
    ident = eng.identities.identities[eng.identities.pod_identity["shop/client"]]
    assert ("io.cilium.k8s.policy.cluster", "default") in ident.labels
    # The short form (explain) leaves the derived cluster label out; the full list keeps it.
    assert "policy.cluster" not in ident.describe()


def test_cluster_name_setting_sets_the_label() -> None:
    eng = engine("", TOPO, settings="clusterName: east\n")
    ident = eng.identities.identities[eng.identities.pod_identity["shop/api"]]
    assert dict(ident.labels)["io.cilium.k8s.policy.cluster"] == "east"


def test_a_pod_label_cannot_claim_another_cluster() -> None:
    topo = TOPO.replace("labels: {app: client}", "labels: {app: client, io.cilium.k8s.policy.cluster: west}")
    eng = engine("", topo)
    ident = eng.identities.identities[eng.identities.pod_identity["shop/client"]]
    assert dict(ident.labels)["io.cilium.k8s.policy.cluster"] == "default"


def test_policy_on_the_cluster_label_selects_pods() -> None:
    policy = ccnp("""
    endpointSelector: {matchLabels: {io.cilium.k8s.policy.cluster: default, app: api}}
    ingress:
      - fromEndpoints: [{matchLabels: {k8s:io.cilium.k8s.policy.cluster: default}}]
    """)
    eng = engine(policy, TOPO)
    assert outcome(eng, "shop/client", "shop/api", 8080) == "allowed"
    assert outcome(eng, "ops/tool", "shop/api", 8080) == "allowed"
    # Another cluster's name selects no pod: the endpoint is not even isolated.
    other = engine(policy.replace("cluster: default, app", "cluster: west, app"), TOPO)
    assert not other.map_state().endpoints[other.endpoint_id("shop/api")].ingress_enforced
    # Selecting pods by the cluster label in the peer only: a policy for cluster `west` allows none.
    west = engine(policy.replace("k8s:io.cilium.k8s.policy.cluster: default", "k8s:io.cilium.k8s.policy.cluster: west"), TOPO)
    assert outcome(west, "shop/client", "shop/api", 8080) == "dropped"


def test_kube_apiserver_entity_is_the_declared_host() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toEntities: [kube-apiserver]
    """), TOPO)
    ids = eng.identities
    assert ids.ipcache["203.0.113.10/32"] == IDENTITY_KUBE_APISERVER == 7
    assert ids.ipcache["203.0.113.11/32"] == IDENTITY_REMOTE_NODE == 6
    assert ids.select_entity("kube-apiserver") == {7}
    assert outcome(eng, "shop/client", "apiserver", 443) == "allowed"
    assert outcome(eng, "shop/client", "node2", 10250) == "dropped"
    assert outcome(eng, "shop/client", "www", 443) == "dropped"
    text = explain_text(eng.verdict(Flow("shop/client", "203.0.113.10", "TCP", 443, destination_name="apiserver")))
    assert "identity 7 (reserved:kube-apiserver, apiserver)" in text


def test_remote_node_entity_and_cluster_include_the_hosts() -> None:
    remote = engine(cnp("""
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toEntities: [remote-node]
    """), TOPO)
    assert outcome(remote, "shop/client", "node2", 10250) == "allowed"
    assert outcome(remote, "shop/client", "apiserver", 443) == "dropped"
    cluster = engine(cnp("""
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toEntities: [cluster]
    """), TOPO)
    assert outcome(cluster, "shop/client", "node2", 10250) == "allowed"
    assert outcome(cluster, "shop/client", "apiserver", 443) == "allowed"
    assert outcome(cluster, "shop/client", "www", 443) == "dropped"


def test_world_cidr_and_fqdn_rules_do_not_select_entity_hosts() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: client}}
    egress:
      - toEntities: [world]
      - toCIDR: [203.0.113.0/24]
      - toFQDNs: [{matchName: kubernetes.example.com}]
    """), TOPO)
    assert outcome(eng, "shop/client", "www", 443) == "allowed"
    assert outcome(eng, "shop/client", "apiserver", 443) == "dropped"
    assert outcome(eng, "shop/client", "node2", 10250) == "dropped"
    assert eng.identities.ipcache["0.0.0.0/0"] == IDENTITY_WORLD


def test_ingress_from_the_remote_node_entity() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: api}}
    ingress:
      - fromEntities: [remote-node]
    """), TOPO)
    assert outcome(eng, "node2", "shop/api", 8080) == "allowed"
    assert outcome(eng, "apiserver", "shop/api", 8080) == "dropped"


def _load(tmp_path: Path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_scenario(path), path


def _errors(tmp_path: Path, text: str) -> tuple[list[str], Path]:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises((SourceError, ErrorList)) as info:
        load_scenario(path)
    exc = info.value
    return [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])], path


def test_scenario_fields_parse(tmp_path: Path) -> None:
    sc, _ = _load(tmp_path, TOPO + "settings: {clusterName: prod-eu-1}\n")
    assert sc.settings.cluster_name == "prod-eu-1"
    assert sc.world["apiserver"].entity == "kube-apiserver" and sc.world["www"].entity == ""
    assert "_http._tcp.www.example.com" in sc.world["www"].dns_names


@pytest.mark.parametrize("value, words", [
    ("East", "invalid value 'East': expected a cluster name as Cilium accepts one"),
    ("-east", "invalid value '-east'"),
    ("east_1", "invalid value 'east_1'"),
    ("a" * 33, "33 characters, more than the limit of 32"),
])
def test_invalid_cluster_name_names_file_line_and_field(tmp_path: Path, value: str, words: str) -> None:
    errors, path = _errors(tmp_path, TOPO + f"settings: {{clusterName: '{value}'}}\n")
    line = TOPO.count("\n") + 1
    assert any(e.startswith(f"{path}:{line}: settings.clusterName: ") and words in e for e in errors), errors


def test_invalid_entity_and_dns_name_name_the_field(tmp_path: Path) -> None:
    errors, path = _errors(tmp_path, TOPO.replace("entity: remote-node", "entity: host")
                           .replace("_http._tcp.www.example.com", "_http..example.com"))
    assert any(e.startswith(f"{path}:11: world[1].entity: ") and "expected one of kube-apiserver, remote-node" in e
               for e in errors), errors
    assert any(e.startswith(f"{path}:12: world[2].dnsNames[1]: ") and "expected a DNS name" in e for e in errors), errors


def test_shipped_cluster_entities_scenario_dry_run() -> None:
    sc = load_scenario(REPO / "scenarios" / "cluster-entities.yaml")
    results = expected_outcomes(PolicyEngine(sc))
    assert results and all(d.outcome == probe.expect for _, probe, d in results)
