"""fromRequires / toRequires (Cilium's docs, "Additional label requirements"): the requirements
of every rule selecting an endpoint are ANDed into the fromEndpoints / toEndpoints selectors of
all rules selecting it; they allow nothing by themselves, leave entities and CIDRs alone, are not
scoped to the policy's namespace, and allow and deny rules keep their own requirements."""

from __future__ import annotations

from pathlib import Path

from dataplane.policy.engine import Flow, PolicyEngine
from dataplane.policy.notices import policy_notices
from dataplane.scenario import parse_scenario
from dataplane.yamlsource import load_documents

TOPOLOGY = """\
name: requires
namespaces:
  - {name: x}
  - {name: y}
pods:
  - {name: backend, namespace: x, labels: {role: backend, env: prod}, ports: [{port: 80}]}
  - {name: front-prod, namespace: x, labels: {role: frontend, env: prod}, ports: [{port: 80}]}
  - {name: front-dev, namespace: x, labels: {role: frontend, env: dev}, ports: [{port: 80}]}
  - {name: other, namespace: x, labels: {role: other, env: prod}}
  - {name: front, namespace: y, labels: {role: frontend, env: prod}}
world:
  - {name: outside, address: 203.0.113.50, ports: [{port: 80}]}
policies:
"""


def cnp(name: str, spec: str) -> str:
    body = "".join(f"      {line}\n" for line in spec.strip("\n").splitlines())
    return (f"  - apiVersion: cilium.io/v2\n    kind: CiliumNetworkPolicy\n    metadata: {{name: {name}, namespace: x}}\n"
            f"    spec:\n{body}")


L3 = cnp("l3", """\
endpointSelector: {matchLabels: {role: backend}}
ingress:
  - fromEndpoints: [{matchLabels: {role: frontend}}]
  - fromEndpoints: [{matchLabels: {role: frontend, k8s:io.kubernetes.pod.namespace: y}}]
  - fromEntities: [world]
""")
REQUIRES = cnp("requires", """\
endpointSelector: {matchLabels: {env: prod}}
ingress:
  - fromRequires: [{matchLabels: {env: prod}}]
""")


def _engine(*policies: str) -> PolicyEngine:
    (doc,) = load_documents(TOPOLOGY + "".join(policies), "requires.yaml")
    return PolicyEngine(parse_scenario(doc, Path("requires.yaml")))


def _to(engine: PolicyEngine, source: str, destination: str) -> str:
    return engine.verdict(Flow(source, engine.scenario.pods[destination].ip, "TCP", 80)).outcome


def test_without_requirements_every_frontend_reaches_the_backend() -> None:
    engine = _engine(L3)
    assert _to(engine, "x/front-dev", "x/backend") == "allowed"
    assert _to(engine, "x/front-prod", "x/backend") == "allowed"


def test_a_requirement_narrows_the_endpoint_selectors_of_every_rule() -> None:
    engine = _engine(L3, REQUIRES)
    assert _to(engine, "x/front-prod", "x/backend") == "allowed"
    assert _to(engine, "x/front-dev", "x/backend") == "dropped"
    # Not scoped to the policy's namespace: y's frontend carries env=prod and still gets in.
    assert _to(engine, "y/front", "x/backend") == "allowed"
    # Entities are no endpoint selectors: the world still gets in.
    assert engine.verdict(Flow("outside", engine.scenario.pods["x/backend"].ip, "TCP", 80)).outcome == "allowed"


def test_a_requirement_grants_nothing_and_its_section_enforces_default_deny() -> None:
    engine = _engine(REQUIRES)
    # front-prod is selected by the requirement (env=prod) and has no allow rule: default deny,
    # even from a peer that meets the requirement.
    assert _to(engine, "x/other", "x/front-prod") == "dropped"
    assert _to(engine, "x/backend", "x/front-prod") == "dropped"
    # front-dev is not selected: nothing changes there.
    assert _to(engine, "x/other", "x/front-dev") == "allowed"


def test_explain_names_the_requirement_and_its_rule() -> None:
    engine = _engine(L3, REQUIRES)
    decision = engine.verdict(Flow("x/front-dev", engine.scenario.pods["x/backend"].ip, "TCP", 80))
    (note,) = [line for line in decision.trace if "requirement" in line]
    assert "env=prod" in note and "fromRequires of CiliumNetworkPolicy x/requires spec.ingress[0]" in note
    assert "every allow rule selecting x/backend" in note


def test_deny_requirements_narrow_deny_rules_only() -> None:
    deny = cnp("deny-frontends", """\
endpointSelector: {matchLabels: {role: backend}}
ingressDeny:
  - fromEndpoints: [{matchLabels: {role: frontend}}]
    fromRequires: [{matchLabels: {env: dev}}]
""")
    engine = _engine(L3, deny)
    assert _to(engine, "x/front-dev", "x/backend") == "dropped"  # denied: frontend AND env=dev
    assert _to(engine, "x/front-prod", "x/backend") == "allowed"  # the allow rules are not narrowed


def test_to_requires_narrows_egress() -> None:
    egress = cnp("egress", """\
endpointSelector: {matchLabels: {role: other}}
egress:
  - toEndpoints: [{matchLabels: {role: frontend}}]
  - toRequires: [{matchExpressions: [{key: env, operator: In, values: [prod]}]}]
""")
    engine = _engine(egress)
    assert _to(engine, "x/other", "x/front-prod") == "allowed"
    assert _to(engine, "x/other", "x/front-dev") == "dropped"


def test_validate_says_the_field_is_deprecated() -> None:
    engine = _engine(REQUIRES)
    (line,) = policy_notices(engine.policies.values())
    assert "fromRequires is deprecated since Cilium 1.17" in line and "spec.ingress[0]" in line
