"""Host policies (CiliumClusterwideNetworkPolicy with nodeSelector): the node's labels come from
the scenario, the parser applies Cilium's checks (pkg/policy/api/rule_validation.go, cnp_types.go),
a host spec never selects a pod, a host spec selecting the node adds the host endpoint whose
ingress and egress the oracle judges, probes go to and from the node, and apply/run refuse DNS
rules at host egress (which the lab cannot redirect) with the reason instead of accepting them
unenforced."""

from __future__ import annotations

import pytest

from dataplane.errors import SourceError
from dataplane.abi import IDENTITY_HOST
from dataplane.policy.engine import Flow
from dataplane.policy.host import HOST_ENDPOINT_ID, host_policy_refusal, selects_node
from dataplane.policy.notices import policy_notices
from dataplane.policy.resolver import EndpointInfo, resolve
from dataplane.scenario import GATEWAY_IP, PolicySource, Step
from dataplane.yamlsource import load_documents
from tests.support.policy import CILIUM_TOPOLOGY, ccnp, cnp, engine, outcome, policy_docs, scenario
from tests.support.policy import policy_errors as errors_of
from tests.support.cli_lab import l7lab

NODE = """\
node:
  name: worker-1
  labels: {node-access: ssh, topology.kubernetes.io/zone: a}
"""

HOST_SSH = ccnp("""
nodeSelector: {matchLabels: {node-access: ssh}}
ingress:
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
""", name="host-ssh")


def test_node_labels_declared_and_set_by_the_kubelet():
    sc = scenario(CILIUM_TOPOLOGY, extra=NODE)
    assert sc.node.name == "worker-1"
    assert sc.node.labels == {"kubernetes.io/hostname": "worker-1", "kubernetes.io/os": "linux",
                              "node-access": "ssh", "topology.kubernetes.io/zone": "a"}
    default = scenario(CILIUM_TOPOLOGY).node
    assert default.labels == {"kubernetes.io/hostname": "lab-node", "kubernetes.io/os": "linux"}


def test_hostname_label_must_name_the_node():
    with pytest.raises(Exception) as exc:
        scenario(CILIUM_TOPOLOGY, extra="node:\n  name: worker-1\n  labels: {kubernetes.io/hostname: other}\n")
    assert "node.labels.kubernetes.io/hostname" in str(exc.value) and "'worker-1'" in str(exc.value)


def test_node_name_is_checked_by_the_schema():
    with pytest.raises(Exception) as exc:
        scenario(CILIUM_TOPOLOGY, extra="node:\n  name: Worker_1\n")
    assert "node.name" in str(exc.value)


def test_ccnp_node_selector_parses_into_a_host_spec():
    (policy,) = policy_docs(HOST_SSH)
    (spec,) = policy.specs
    assert spec.host and spec.enforces_ingress and not spec.enforces_egress
    sc = scenario(CILIUM_TOPOLOGY, extra=NODE)
    assert selects_node(spec, sc.node.labels)
    assert not selects_node(spec, scenario(CILIUM_TOPOLOGY).node.labels)


@pytest.mark.parametrize("text,words", [
    (cnp("nodeSelector: {}\ningress: [{}]\n"),
     "spec.nodeSelector: rule cannot have nodeSelector in a CiliumNetworkPolicy"),
    (ccnp("nodeSelector: {}\nendpointSelector: {}\ningress: [{}]\n"),
     "spec.nodeSelector: rule cannot have both endpointSelector and nodeSelector"),
    (ccnp("ingress: [{}]\n"), "spec: rule must have one of endpointSelector or nodeSelector"),
    (ccnp("nodeSelector: {}\ningress:\n  - toPorts: [{ports: [{port: \"53\", protocol: UDP}], "
          "rules: {dns: [{matchPattern: \"*\"}]}}]\n"),
     "spec.ingress[0].toPorts[0].rules: L7 policy is not supported on host ingress"),
    (ccnp("nodeSelector: {}\negress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCP}], "
          "rules: {http: [{method: GET}]}}]\n"),
     "spec.egress[0].toPorts[0].rules.http: L7 protocol HTTP is not supported on host egress"),
    (ccnp("nodeSelector: {matchLabels: {\"reserved:host\": \"\"}}\ningress: [{}]\n"),
     "spec.nodeSelector: selecting reserved identities is not supported"),
])
def test_cilium_refuses_these_host_policies(text, words):
    errs = errors_of(text)
    assert len(errs) == 1 and words in errs[0], errs


def test_dns_rules_are_allowed_at_host_egress():
    (policy,) = policy_docs(ccnp("""
nodeSelector: {}
egress:
  - toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
"""))
    assert policy.specs[0].host


def test_host_spec_never_selects_a_pod():
    # An empty nodeSelector selects every node; as an endpointSelector it would isolate every pod.
    (policy,) = policy_docs(ccnp("nodeSelector: {}\ningress: [{}]\negress: [{}]\n"))
    eng = engine(topology=CILIUM_TOPOLOGY)
    endpoints = [EndpointInfo(e.name, e.endpoint_id, e.ip, dict(e.labels), ()) for e in eng.map_state().endpoints.values()]
    res = resolve(endpoints, eng.identities, [policy])  # the resolver alone, without the apply check
    assert res.state.policy == eng.map_state().policy  # no entry beyond the built-in ones
    assert all(not selecting for selecting in res.selected_by.values())
    assert all(not (e.ingress_enforced or e.egress_enforced) for e in res.state.endpoints.values())


HOST_DNS = ccnp("""
nodeSelector: {matchLabels: {node-access: ssh}}
egress:
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
""", name="host-dns")

HOST_EGRESS = ccnp("""
nodeSelector: {matchLabels: {node-access: ssh}}
egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""", name="host-out")

NODE_WITH_SERVER = """\
node:
  name: worker-1
  labels: {node-access: ssh}
  ports: [{port: 22}, {port: 8081}]
"""


def test_apply_refuses_dns_rules_at_host_egress_naming_the_node_selection():
    eng = engine(topology=CILIUM_TOPOLOGY, extra=NODE)
    (policy,) = policy_docs(HOST_DNS)
    err = host_policy_refusal([policy], eng.scenario.node.name, eng.scenario.node.labels)
    assert isinstance(err, SourceError)
    text = str(err)
    assert text.startswith("policies/x.yaml")
    assert "CiliumClusterwideNetworkPolicy host-dns spec: host policy (nodeSelector) with DNS rules at egress not applied" in text
    assert "selects node worker-1" in text and "node-access=ssh" in text
    assert "tc egress" in text and "toPorts 53/UDP" in text
    other = host_policy_refusal([policy], "lab-node", engine(topology=CILIUM_TOPOLOGY).scenario.node.labels)
    assert "does not select node lab-node" in str(other)
    for enforced in (HOST_SSH, HOST_EGRESS):
        (plain,) = policy_docs(enforced)
        assert host_policy_refusal([plain], "worker-1", eng.scenario.node.labels) is None


def test_scenario_with_dns_rules_at_host_egress_is_refused_and_nothing_applied():
    with pytest.raises(SourceError) as exc:
        engine(HOST_DNS, topology=CILIUM_TOPOLOGY, extra=NODE)
    assert "host policy (nodeSelector) with DNS rules at egress not applied" in str(exc.value)
    eng = engine(topology=CILIUM_TOPOLOGY, extra=NODE)
    before = eng.map_state()
    (doc,) = load_documents(HOST_DNS, "policies/x.yaml")
    with pytest.raises(SourceError):
        eng.propose(Step(0, "apply DNS rules at host egress", apply=(PolicySource(doc),)))
    assert eng.map_state() is before


def test_validate_notice_says_apply_refuses_dns_at_host_egress():
    (policy,) = policy_docs(HOST_DNS)
    (notice,) = policy_notices([policy])
    assert notice.startswith("CiliumClusterwideNetworkPolicy host-dns spec: host policy (nodeSelector) with DNS rules at egress is valid")
    assert "apply and run refuse it" in notice
    (ingress,) = policy_docs(HOST_SSH)
    (egress,) = policy_docs(HOST_EGRESS)
    assert policy_notices([ingress, egress]) == []


def test_validate_accepts_and_run_refuses_dns_at_host_egress(tmp_path):
    """The CLI: `validate` of the policy file says valid with the notice; `validate` and
    `run --dry-run` of a scenario applying it fail (exit 1) with the refusal, naming the file."""
    policy = tmp_path / "host.yaml"
    policy.write_text(HOST_DNS)
    lab = tmp_path / "lab.yaml"
    lab.write_text(CILIUM_TOPOLOGY + NODE + "policies:\n  - file: host.yaml\nsteps:\n"
                   "  - probes: [{from: shop/frontend, to: shop/api:8080, expect: allowed}]\n")
    out = l7lab("validate", str(policy))
    assert out.returncode == 0, out.stderr
    assert "notice:" in out.stdout and "host policy (nodeSelector) with DNS rules at egress is valid, but apply and run refuse it" in out.stdout
    for verb in (["validate"], ["run", "--dry-run"]):
        out = l7lab(*verb, str(lab))
        assert out.returncode == 1, (verb, out.stdout, out.stderr)
        assert f"{policy}:1" in out.stderr and "not applied: its nodeSelector" in out.stderr
        assert "selects node worker-1" in out.stderr


def test_host_ingress_policy_adds_the_host_endpoint_only_when_it_selects_the_node():
    eng = engine(topology=CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER)
    assert HOST_ENDPOINT_ID not in eng.map_state().endpoints
    eng = engine(HOST_SSH, topology=CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER)
    host = eng.map_state().endpoints[HOST_ENDPOINT_ID]
    assert (host.name, host.identity, host.ip, host.aliases) == ("host", IDENTITY_HOST, eng.scenario.node_ip, (GATEWAY_IP,))
    assert host.ingress_enforced and not host.egress_enforced
    assert ("node-access", "ssh") in host.labels
    # The same policy on a node whose labels it does not select: no host endpoint, nothing changes.
    plain = engine(topology=CILIUM_TOPOLOGY)
    unselected = engine(HOST_SSH, topology=CILIUM_TOPOLOGY)
    assert HOST_ENDPOINT_ID not in unselected.map_state().endpoints
    assert unselected.map_state().policy == plain.map_state().policy


def test_oracle_judges_host_ingress_on_flows_to_the_node():
    eng = engine(HOST_SSH, topology=CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER)
    node = eng.scenario.node_ip
    assert outcome(eng, "shop/frontend", node, 22) == "allowed"       # fromEntities: [cluster], port 22
    assert outcome(eng, "shop/frontend", node, 8081) == "dropped"     # default deny at host ingress
    assert outcome(eng, "shop/frontend", GATEWAY_IP, 8081) == "dropped"  # the node's other address
    assert outcome(eng, "www", node, 22) == "dropped"                 # world is not in cluster
    decision = eng.verdict(Flow("shop/frontend", node, "TCP", 8081))
    text = "\n".join(decision.trace)
    assert "destination node worker-1 (host)" in text
    assert "ingress of host (endpoint 65535): selected by CiliumClusterwideNetworkPolicy host-ssh" in text
    assert "default deny" in text
    # Unselected: the node is judged by the sender's egress only, as without the policy.
    eng = engine(HOST_SSH, topology=CILIUM_TOPOLOGY, extra="node: {ports: [{port: 8081}]}\n")
    assert outcome(eng, "shop/frontend", eng.scenario.node_ip, 8081) == "allowed"


def test_probe_to_the_node_names_its_address_and_ports():
    sc = scenario(CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER + "steps:\n  - probes: [{from: shop/frontend, to: node, expect: allowed},"
                  " {from: www, to: 'node:8081', expect: dropped}]\n")
    first, second = sc.steps[0].probes
    assert (first.destination.kind, first.destination.name, first.destination.ip, first.destination.port) == \
        ("node", "worker-1", sc.node_ip, 22)
    assert second.destination.port == 8081
    with pytest.raises(Exception) as exc:
        scenario(CILIUM_TOPOLOGY, extra="node: {ports: [{port: 15001}]}\n")
    assert "node.ports[0].port" in str(exc.value) and "L7 proxy" in str(exc.value)


def test_oracle_judges_host_egress_on_flows_from_the_node():
    eng = engine(HOST_EGRESS, topology=CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER)
    host = eng.map_state().endpoints[HOST_ENDPOINT_ID]
    assert host.egress_enforced and not host.ingress_enforced
    api = eng.scenario.pod("shop/api").ip
    assert outcome(eng, "host", api, 8080) == "allowed"
    assert outcome(eng, "host", api, 9090) == "dropped"            # default deny at host egress
    assert outcome(eng, "host", "shop/frontend", 80) == "dropped"
    assert outcome(eng, "host", "www", 80) == "dropped"            # toward a world host too
    assert outcome(eng, "shop/frontend", eng.scenario.node_ip, 22) == "allowed"  # ingress not enforced
    text = "\n".join(eng.verdict(Flow("host", api, "TCP", 9090)).trace)
    assert "egress of host (endpoint 65535): selected by CiliumClusterwideNetworkPolicy host-out" in text
    # Without a host policy the node's traffic is judged by the destination's ingress only.
    plain = engine(topology=CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER)
    assert outcome(plain, "host", api, 9090) == "allowed"
    assert "no host policy selects the node" in "\n".join(plain.verdict(Flow("host", api, "TCP", 9090)).trace)


def test_probe_from_the_node():
    sc = scenario(CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER + "steps:\n  - probes: [{from: node, to: 'shop/api:8080', expect: allowed}]\n")
    (probe,) = sc.steps[0].probes
    assert probe.source == "host" and probe.destination.name == "shop/api"
    with pytest.raises(Exception) as exc:
        scenario(CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER + "steps:\n  - probes: [{from: node, to: 'node:22', expect: allowed}]\n")
    assert "steps[0].probes[0].to" in str(exc.value) and "never leaves the node" in str(exc.value)


def test_lab_wide_audit_mode_covers_the_host_endpoint():
    eng = engine(HOST_EGRESS, topology=CILIUM_TOPOLOGY, extra=NODE_WITH_SERVER, settings="audit: true\n")
    assert eng.map_state().endpoints[HOST_ENDPOINT_ID].audit
    api = eng.scenario.pod("shop/api").ip
    decision = eng.verdict(Flow("host", api, "TCP", 9090))
    assert decision.outcome == "allowed" and decision.expectation == "audited"
