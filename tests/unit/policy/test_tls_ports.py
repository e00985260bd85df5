"""HTTP rules on a port where a world host serves TLS are refused (dataplane/policy/tlsports.py):
at `validate`, `run` and `apply`, all-or-nothing, naming the file, the rule's field path and the
world host and port; L3/L4 rules on the port, and HTTP rules whose peers cannot reach a TLS host,
are accepted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.errors import ErrorList, SourceError
from dataplane.policy import PolicyEngine
from dataplane.scenario import PolicySource, Step
from dataplane.yamlsource import load_documents
from tests.support.policy import ccnp, cnp, engine, scenario
from tests.support.scenario_files import write_scenario

REPO = Path(__file__).resolve().parents[3]

TOPOLOGY = """\
name: tls
namespaces:
  - {name: shop}
pods:
  - {name: client, namespace: shop, labels: {app: client}, ports: [{port: 8443, name: alt-https}]}
world:
  - {name: www, address: 203.0.113.20, dnsNames: [www.example.com], aliases: [web.example.com],
     ports: [{port: 80}, {port: 443, tls: true}, {port: 8443, tls: true}]}
  - {name: api, address: 203.0.113.30, dnsNames: [kubernetes.example.com], entity: kube-apiserver,
     ports: [{port: 6443, tls: true}]}
  - {name: plain, address: 198.51.100.7, dnsNames: [www.example.org], ports: [{port: 80}, {port: 443}]}
"""


def _egress(peers: str = "", port: str = "443", http: bool = True, end_port: str = "") -> str:
    """A CNP shop/egress with one egress rule: `peers` (flow YAML, "" for none) and one toPorts
    entry on `port` (a range up to `end_port`), with an HTTP rule when `http`."""
    end = f", endPort: {end_port}" if end_port else ""
    rules = ", rules: {http: [{method: GET}]}" if http else ""
    items = [peers] if peers else []
    items.append(f'toPorts: [{{ports: [{{port: "{port}", protocol: TCP{end}}}]{rules}}}]')
    return cnp(f"""
        endpointSelector: {{}}
        egress:
          - {{{', '.join(items)}}}
        """, name="egress")


def _errors(policies: str) -> list[str]:
    try:
        engine(policies, TOPOLOGY)
    except ErrorList as exc:
        return [str(e) for e in exc.errors]
    except SourceError as exc:
        return [str(exc)]
    return []


MESSAGE = re.compile(r"x\.yaml:\d+: " + re.escape(
    "policies[0].spec.egress[0].toPorts[0].rules.http: CiliumNetworkPolicy shop/egress: "
    "HTTP rules cannot apply to port 443: world host www serves TLS there and the L7 proxy does not "
    "inspect TLS; use a port rule without rules.http") + "$")


@pytest.mark.parametrize("peers", [
    "",  # no L3 peer: every destination
    "toFQDNs: [{matchPattern: '*.example.com'}]",
    "toFQDNs: [{matchName: web.example.com}]",  # an alias
    "toCIDR: [203.0.113.0/24]",
    "toCIDRSet: [{cidr: 0.0.0.0/0, except: [198.51.100.0/24]}]",
    "toEntities: [world]",
    "toEntities: [all]",
])
def test_an_http_rule_that_could_reach_a_tls_port_is_refused(peers: str) -> None:
    errors = _errors(_egress(peers))
    assert len(errors) == 1, errors
    assert MESSAGE.match(errors[0]), errors[0]


@pytest.mark.parametrize("peers, port, http, end_port", [
    ("toFQDNs: [{matchPattern: '*.example.com'}]", "443", False, ""),  # L3/L4 only: fine
    ("toFQDNs: [{matchPattern: '*.example.com'}]", "80", True, ""),  # a plain port
    ("toFQDNs: [{matchName: www.example.org}]", "443", True, ""),  # only a plain host on 443
    ("toCIDR: [198.51.100.0/24]", "443", True, ""),
    ("toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.16/28]}]", "443", True, ""),
    ("toEndpoints: [{matchLabels: {app: client}}]", "443", True, ""),  # pods serve no TLS
    ("toEntities: [cluster]", "443", True, ""),
])
def test_rules_that_cannot_meet_tls_are_accepted(peers: str, port: str, http: bool, end_port: str) -> None:
    assert _errors(_egress(peers, port, http, end_port)) == []


def test_port_ranges_and_named_ports_cover_the_tls_port() -> None:
    ranged = _errors(_egress("toFQDNs: [{matchName: www.example.com}]", "400", end_port="500"))
    assert len(ranged) == 1 and "port 443: world host www" in ranged[0]
    # a named port resolves against the pods' declared ports: alt-https is 8443
    named = _errors(_egress("toEntities: [world]", "alt-https"))
    assert len(named) == 1 and "port 8443: world host www" in named[0]


def test_a_world_hosts_entity_selects_it() -> None:
    for entity in ("kube-apiserver", "cluster"):
        errors = _errors(_egress(f"toEntities: [{entity}]", "6443"))
        assert len(errors) == 1 and "port 6443: world host api" in errors[0], (entity, errors)
    assert _errors(_egress("toEntities: [world]", "6443")) == []  # api is not `world`


def test_every_offending_rule_is_reported_at_once() -> None:
    two = _egress("toEntities: [world]") + "---\n" + ccnp("""
        endpointSelector: {}
        egress:
          - toFQDNs: [{matchName: www.example.com}]
            toPorts:
              - ports: [{port: "80", protocol: TCP}]
                rules: {http: [{}]}
              - ports: [{port: "8443", protocol: TCP}]
                rules: {http: [{path: /x}]}
        """, name="wide")
    errors = _errors(two)
    assert len(errors) == 2, errors
    assert "CiliumNetworkPolicy shop/egress" in errors[0] and "port 443" in errors[0]
    assert errors[1].startswith("x.yaml:") and "policies[1].spec.egress[0].toPorts[1].rules.http" in errors[1]
    assert "CiliumClusterwideNetworkPolicy wide: HTTP rules cannot apply to port 8443: world host www" in errors[1]


def test_without_tls_ports_nothing_changes() -> None:
    plain = TOPOLOGY.replace(", tls: true", "")
    engine(_egress(""), plain)  # no error


def test_apply_refuses_it_and_changes_nothing() -> None:
    eng = engine(_egress("", http=False), TOPOLOGY)
    before = eng.snapshot()
    (doc,) = load_documents(_egress("toEntities: [world]"), "policies/egress.yaml")
    with pytest.raises(SourceError) as info:
        eng.propose(Step(0, "apply", apply=(PolicySource(doc),)))
    assert str(info.value).startswith("policies/egress.yaml:")
    assert "spec.egress[0].toPorts[0].rules.http" in str(info.value)
    assert "world host www serves TLS" in str(info.value)
    assert eng.snapshot() is before


def test_validate_refuses_it_in_a_later_step_too(tmp_path: Path) -> None:
    (tmp_path / "egress.yaml").write_text(_egress("toFQDNs: [{matchPattern: '*.example.com'}]"))
    path = write_scenario(tmp_path, TOPOLOGY + """\
steps:
  - apply: [{file: egress.yaml}]
""")
    PolicyEngine(scenario(TOPOLOGY))  # the policies it starts with are fine
    out = subprocess.run([sys.executable, "-m", "dataplane.cli", "validate", str(path)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{tmp_path / 'egress.yaml'}:" in out.stderr
    assert "spec.egress[0].toPorts[0].rules.http: CiliumNetworkPolicy shop/egress: HTTP rules cannot apply to " \
           "port 443: world host www serves TLS there" in out.stderr
