"""Malformed policies: every error names the file, the line, the object, the field path and
what was expected; all errors of a document are reported together."""

from __future__ import annotations


import pytest

from dataplane.errors import SourceError
from dataplane.policy import validate_policy_file

from tests.support.policy import policy_docs
from tests.support.policy import policy_errors as errors_of

CNP_HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api
  namespace: shop
spec:
  endpointSelector:
    matchLabels: {app: api}
"""
K8S_HEAD = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: np
  namespace: shop
spec:
  podSelector: {}
"""


def one_error(text: str) -> str:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_invalid_re2_path_names_file_line_object_and_path():
    msg = one_error(CNP_HEAD + """\
  ingress:
    - toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http:
              - path: "([a-z"
""")
    assert msg.startswith("policies/x.yaml:14: CiliumNetworkPolicy shop/api: spec.ingress[0].toPorts[0].rules.http[0].path:")
    assert "invalid RE2 regex '([a-z'" in msg and "missing" in msg


@pytest.mark.parametrize("regex", ["(?=x)", "(a)\\\\1", "a{1001}", "*"])
def test_regexes_envoy_would_reject(regex):
    msg = one_error(CNP_HEAD + f"""  ingress:
    - toPorts:
        - ports: [{{port: "80", protocol: TCP}}]
          rules:
            http: [{{method: "{regex}"}}]
""")
    assert "rules.http[0].method: invalid RE2 regex" in msg


CASES = [
    # (fragment under spec (Cilium), expected path, expected words)
    ("  ingress:\n    - fromEntities: [everything]\n", "spec.ingress[0].fromEntities[0]", "unknown entity"),
    ("  ingress:\n    - fromCIDR: [10.0.0.0/33]\n", "spec.ingress[0].fromCIDR[0]", "invalid CIDR"),
    ("  ingress:\n    - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]\n",
     "spec.ingress[0].fromCIDRSet[0].except[0]", "strict subnet"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"70000\"}]}]\n", "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"80\", protocol: ICMPX}]}]\n",
     "spec.ingress[0].toPorts[0].ports[0].protocol", "expected protocol"),
    ("  ingress:\n    - toPorts: [{ports: [{port: http, endPort: 90}]}]\n",
     "spec.ingress[0].toPorts[0].ports[0].endPort", "named port"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"90\", endPort: 80}]}]\n",
     "spec.ingress[0].toPorts[0].ports[0].endPort", "between port"),
    ("  ingressDeny:\n    - toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: GET}]}}]\n",
     "spec.ingressDeny[0].toPorts[0].rules", "not allowed in a deny rule"),
    ("  egress:\n    - toFQDNs: [{matchName: a.example.com}]\n      toEntities: [world]\n",
     "spec.egress[0].toFQDNs", "cannot be combined"),
    ("  egress:\n    - toFQDNs: [{matchPattern: \"a b\"}]\n", "spec.egress[0].toFQDNs[0].matchPattern", "invalid matchPattern"),
    ("  egress:\n    - toFQDNs: [{matchName: a.com, matchPattern: \"*.a.com\"}]\n", "spec.egress[0].toFQDNs[0]", "exactly one"),
    ("  ingress:\n    - fromEndpoints: [{matchExpressions: [{key: app, operator: Like, values: [a]}]}]\n",
     "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator", "unknown operator 'Like'"),
    ("  ingress:\n    - fromEndpoints: [{matchExpressions: [{key: app, operator: Exists, values: [a]}]}]\n",
     "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values", "takes no values"),
    ("  ingress:\n    - fromEndpoints: [{matchExpressions: [{key: app, operator: In}]}]\n",
     "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values", "non-empty list"),
    ("  ingress:\n    - fromEndpoints: [{matchLabels: {enabled: true}}]\n",
     "spec.ingress[0].fromEndpoints[0].matchLabels.enabled", "quote it"),
    ("  ingress:\n    - fromEndpoints: [{matchLabels: {\"foo:app\": x}}]\n",
     "spec.ingress[0].fromEndpoints[0].matchLabels.foo:app", "unknown label source"),
    ("  ingress:\n    - fromEndpoint: [{}]\n", "spec.ingress[0].fromEndpoint", "unknown field 'fromEndpoint'"),
    ("  ingress:\n    - fromRequires: {matchLabels: {env: prod}}\n", "spec.ingress[0].fromRequires",
     "expected a list of endpoint selectors"),
    ("  egress:\n    - toRequires: [{matchLabels: {env: 1}}]\n", "spec.egress[0].toRequires[0].matchLabels.env",
     "quote it"),
    ("  egress:\n    - fromRequires: [{matchLabels: {env: prod}}]\n", "spec.egress[0].fromRequires",
     "unknown field 'fromRequires'"),
    ("  ingress: [{}]\n  nodeSelector: {matchLabels: {node-role: worker}}\n", "spec.nodeSelector",
     "rule cannot have both endpointSelector and nodeSelector"),
    ("  egress:\n    - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n", "spec.egress[0].toGroups",
     "cloud groups (toGroups) are not supported by l7lab: it is cloud-provider specific"),
    ("  ingress:\n    - fromGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n", "spec.ingress[0].fromGroups",
     "asks the provider's API"),
    ("  ingress: {fromEntities: [all]}\n", "spec.ingress", "expected a list"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"80\", protocol: UDP}], rules: {http: [{}]}}]\n",
     "spec.ingress[0].toPorts[0].ports[0].protocol", "HTTP rules apply to TCP"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"0\", protocol: TCP}], rules: {http: [{}]}}]\n",
     "spec.ingress[0].toPorts[0].ports[0].port", "need a specific port"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{headers: [\"Bad Header: x\"]}]}}]\n",
     "spec.ingress[0].toPorts[0].rules.http[0].headers[0]", "invalid header"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{headerMatches: [{name: X, mismatch: LOG}]}]}}]\n",
     "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch", "not supported"),
    ("  ingress:\n    - toPorts: [{ports: [{port: \"53\"}], rules: {http: [{}], dns: [{matchName: a.com}]}}]\n",
     "spec.ingress[0].toPorts[0].rules", "not both"),
    ("  enableDefaultDeny: {ingress: yes please}\n", "spec.enableDefaultDeny.ingress", "true or false"),
    ("  ingress:\n    - fromCIDRSet: [{cidr: \"2001:db8::/32\", except: [\"10.0.0.0/8\"]}]\n",
     "spec.ingress[0].fromCIDRSet[0].except[0]", "must be a strict subnet of 2001:db8::/32"),
]


@pytest.mark.parametrize("fragment,path,words", CASES, ids=[c[1] + ":" + c[2] for c in CASES])
def test_cilium_malformed(fragment, path, words):
    msg = one_error(CNP_HEAD + fragment)
    assert msg.startswith("policies/x.yaml:"), msg
    assert f"CiliumNetworkPolicy shop/api: {path}:" in msg, msg
    assert words in msg, msg
    line = int(msg.split(":")[1])
    assert line >= 9  # points into the rule, not at the top of the document


K8S_CASES = [
    ("  ingress:\n    - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n", "spec.ingress[0].from[0].ipBlock", "cannot be combined"),
    ("  ingress:\n    - from: [{}]\n", "spec.ingress[0].from[0]", "needs podSelector"),
    ("  ingress:\n    - ports: [{port: 0}]\n", "spec.ingress[0].ports[0].port", "out of range"),
    ("  ingress:\n    - ports: [{port: 80, endPort: 79}]\n", "spec.ingress[0].ports[0].endPort", "between port"),
    ("  ingress:\n    - ports: [{endPort: 90}]\n", "spec.ingress[0].ports[0].endPort", "numbered port"),
    ("  ingress:\n    - ports: [{port: Not_A_Name}]\n", "spec.ingress[0].ports[0].port", "invalid port name"),
    ("  ingress:\n    - ports: [{port: 80, protocol: ANY}]\n", "spec.ingress[0].ports[0].protocol", "expected protocol TCP, UDP, SCTP"),
    ("  policyTypes: [Ingress, Sideways]\n", "spec.policyTypes[1]", "expected Ingress or Egress"),
    ("  ingress:\n    - from: [{namespaceSelector: {matchLabels: {\"k8s:team\": a}}}]\n",
     "spec.ingress[0].from[0].namespaceSelector.matchLabels.k8s:team", "invalid label key"),
    ("  ingress:\n    - from: [{ipBlock: {cidr: nonsense}}]\n", "spec.ingress[0].from[0].ipBlock.cidr", "invalid CIDR"),
    ("  egress:\n    - toFQDNs: []\n", "spec.egress[0].toFQDNs", "unknown field"),
]


@pytest.mark.parametrize("fragment,path,words", K8S_CASES, ids=[c[1] + ":" + c[2] for c in K8S_CASES])
def test_k8s_malformed(fragment, path, words):
    msg = one_error(K8S_HEAD + fragment)
    assert f"NetworkPolicy shop/np: {path}:" in msg, msg
    assert words in msg, msg


def test_missing_name_and_wrong_api_version_are_both_reported():
    errs = errors_of("""\
apiVersion: cilium.io/v1
kind: CiliumNetworkPolicy
metadata: {namespace: shop}
spec: {endpointSelector: {}}
""")
    assert any("metadata.name is required" in e and e.startswith("policies/x.yaml:3:") for e in errs), errs
    assert any("apiVersion: expected apiVersion cilium.io/v2" in e for e in errs), errs


def test_missing_metadata():
    msg = one_error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {podSelector: {}}\n")
    assert "metadata is required" in msg


def test_unknown_kind_and_non_mapping():
    assert "expected kind NetworkPolicy" in one_error("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    assert "expected a policy manifest" in one_error("- just a list\n")


def test_ccnp_with_namespace():
    msg = one_error("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c, namespace: shop}\nspec: {endpointSelector: {}}\n")
    assert "CiliumClusterwideNetworkPolicy c: metadata.namespace: a CiliumClusterwideNetworkPolicy is cluster-scoped" in msg


def test_missing_selector_and_spec():
    assert "podSelector is required" in one_error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec: {}\n")
    assert "spec or specs is required" in one_error("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: n}\n")
    assert "rule must have one of endpointSelector or nodeSelector" in one_error("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: n}\nspec: {ingress: [{}]}\n")


def test_all_errors_of_a_document_are_collected():
    errs = errors_of(CNP_HEAD + """  ingress:
    - fromEntities: [nope]
    - fromCIDR: [bad]
  egress:
    - toPorts: [{ports: [{port: "99999"}]}]
""")
    assert len(errs) == 3
    assert [e.split(":")[1] for e in errs] == ["10", "11", "13"]


def test_list_kinds_and_multi_document():
    pols = policy_docs("""\
apiVersion: v1
kind: List
items:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: a}
    spec: {podSelector: {}}
  - apiVersion: cilium.io/v2
    kind: CiliumClusterwideNetworkPolicy
    metadata: {name: b}
    spec: {endpointSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicyList
items:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: c, namespace: x}
    spec: {podSelector: {}}
""")
    assert [p.display for p in pols] == ["NetworkPolicy default/a", "CiliumClusterwideNetworkPolicy b", "NetworkPolicy x/c"]


def test_error_inside_list_item_has_item_path():
    msg = one_error("""\
apiVersion: v1
kind: List
items:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: a}
    spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}
""")
    assert msg.startswith("policies/x.yaml:7: NetworkPolicy default/a: items[0].spec.ingress[0].ports[0].port:"), msg


def test_duplicate_policy_in_one_file():
    msg = one_error(K8S_HEAD + "---\n" + K8S_HEAD)
    assert "defined twice" in msg


def test_validate_policy_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(K8S_HEAD)
    assert validate_policy_file(good) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(CNP_HEAD + "  ingress:\n    - fromEntities: [nope]\n")
    errs = validate_policy_file(bad)
    assert len(errs) == 1 and str(errs[0]).startswith(f"{bad}:10:")
    assert "cannot read file" in str(validate_policy_file(tmp_path / "missing.yaml")[0])


def test_step_delete_unknown_policy_and_atomic_apply():
    from tests.support.policy import engine
    eng = engine(extra="""\
steps:
  - name: bad apply
    apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: ok, namespace: x}
        spec: {podSelector: {}}
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: broken, namespace: x}
        spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}
  - name: delete unknown
    delete:
      - {kind: NetworkPolicy, name: ghost, namespace: x}
""")
    with pytest.raises(SourceError) as exc:
        eng.apply_step(eng.scenario.steps[0])
    assert "x.yaml:" in str(exc.value) and "steps[0].apply[1].spec.ingress[0].ports[0].port" in str(exc.value)
    assert eng.policies == {}  # nothing half-applied
    with pytest.raises(SourceError) as exc:
        eng.apply_step(eng.scenario.steps[1])
    assert "steps[1].delete[0]" in str(exc.value) and "cannot delete NetworkPolicy x/ghost" in str(exc.value)
