"""`settings.ipBlockSelectsPods`: a Kubernetes ipBlock of a pod's address selects that pod only
when the scenario asks for it (the Kubernetes e2e suite's expectation); by default it does not,
as Cilium's CIDR rules never select cluster endpoints. Cilium's own CIDR rules never select pods
either way, explain says which behaviour applied, and an ipBlock that splits the pods of one
identity is refused rather than silently allowing them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.errors import SourceError
from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents

TOPOLOGY = """\
name: ipblock
settings: {{podCIDR: 10.210.0.0/24{settings}}}
namespaces:
  - {{name: x}}
pods:
  - {{name: server, namespace: x, labels: {{app: server}}, ports: [{{port: 80}}]}}
  - {{name: one, namespace: x, labels: {{app: one}}}}
  - {{name: two, namespace: x, labels: {{app: two}}}}
  - {{name: twin, namespace: x, labels: {{app: two}}}}
policies:
"""
# Pods take addresses in declaration order after the node's: server .2, one .3, two .4, twin .5.

K8S = """\
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {{name: from-block, namespace: x}}
    spec:
      podSelector: {{matchLabels: {{app: server}}}}
      ingress: [{{from: [{{ipBlock: {{cidr: "{cidr}"{excepts}}}}}]}}]
"""

CNP = """\
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: from-cidr, namespace: x}}
    spec:
      endpointSelector: {{matchLabels: {{app: server}}}}
      ingress: [{{fromCIDR: ["{cidr}"]}}]
"""


def _engine(policy: str, selects_pods: bool | None) -> PolicyEngine:
    settings = "" if selects_pods is None else f", ipBlockSelectsPods: {str(selects_pods).lower()}"
    (doc,) = load_documents(TOPOLOGY.format(settings=settings) + policy, "ipblock.yaml")
    return PolicyEngine(parse_scenario(doc, Path("ipblock.yaml")))


def _from(engine: PolicyEngine, pod: str):  # noqa: ANN202
    return engine.verdict(Flow(f"x/{pod}", engine.scenario.pods["x/server"].ip, "TCP", 80))


@pytest.mark.parametrize("selects_pods", [None, False])
def test_by_default_an_ip_block_of_a_pod_does_not_select_it(selects_pods: bool | None) -> None:
    engine = _engine(K8S.format(cidr="10.210.0.3/32", excepts=""), selects_pods)
    decision = _from(engine, "one")
    assert decision.outcome == "dropped"
    (note,) = [line for line in decision.trace if "ipBlock 10.210.0.3/32" in line]
    assert "covers pod x/one's address; the pod is not selected: settings.ipBlockSelectsPods is false" in note


def test_with_the_setting_an_ip_block_of_a_pod_selects_it_and_only_it() -> None:
    engine = _engine(K8S.format(cidr="10.210.0.3/32", excepts=""), True)
    decision = _from(engine, "one")
    assert decision.outcome == "allowed"
    (note,) = [line for line in decision.trace if "ipBlock 10.210.0.3/32" in line]
    assert "covers pod x/one's address; the pod is selected: settings.ipBlockSelectsPods is true" in note
    assert _from(engine, "two").outcome == "dropped"
    # The block does not cover two's address: it plays no part, and explain says nothing of it.
    assert not [line for line in _from(engine, "two").trace if "ipBlock" in line]


def test_except_leaves_a_pod_out() -> None:
    engine = _engine(K8S.format(cidr="10.210.0.0/29", excepts=', except: ["10.210.0.3/32"]'), True)
    decision = _from(engine, "one")
    assert decision.outcome == "dropped"  # in the except
    assert any("covers pod x/one's address; the pod is not selected: its address lies inside an except" in line
               for line in decision.trace), decision.trace
    assert _from(engine, "two").outcome == "allowed" and _from(engine, "twin").outcome == "allowed"


def test_cilium_cidr_rules_never_select_pods_even_with_the_setting() -> None:
    engine = _engine(CNP.format(cidr="10.210.0.3/32"), True)
    assert _from(engine, "one").outcome == "dropped"


def test_an_ip_block_that_splits_an_identity_is_refused() -> None:
    # two (.4) and twin (.5) have the same labels, hence one identity: a /32 of two alone would
    # let twin in as well.
    with pytest.raises(SourceError) as exc:
        _engine(K8S.format(cidr="10.210.0.4/32", excepts=""), True)
    msg = str(exc.value)
    assert "ipblock.yaml" in msg and "spec.ingress[0]" in msg
    assert "covers pod x/two but not pod x/twin, which has the same labels" in msg
    # Covering both is fine, and so is the same block without the setting.
    assert _from(_engine(K8S.format(cidr="10.210.0.4/31", excepts=""), True), "twin").outcome == "allowed"
    assert _from(_engine(K8S.format(cidr="10.210.0.4/32", excepts=""), False), "two").outcome == "dropped"
