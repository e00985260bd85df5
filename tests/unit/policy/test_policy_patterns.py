"""Fields a cluster checks by pattern are checked the same way: what Cilium (or, for a
NetworkPolicy, the Kubernetes API server) refuses is refused with its reason and a hint, and
what it accepts is accepted. The seeds' mistakes shipped under scenarios/mistakes/ give exactly
the message their header promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.policy import validate_policy_file
from dataplane.policy.patterns import go_parse_uint16, is_svc_name

from tests.support.policy import policy_docs
from tests.support.policy import policy_errors as errors_of

REPO = Path(__file__).resolve().parents[3]
MISTAKES = REPO / "scenarios" / "mistakes"

CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
    - toPorts:
        - ports: [{{port: {port}, protocol: TCP}}]
"""
NP = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: np, namespace: shop}}
spec:
  podSelector: {{}}
  ingress:
    - ports: [{{port: {port}}}]
"""
FQDN = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api, namespace: shop}}
spec:
  endpointSelector: {{}}
  egress:
    - toFQDNs: [{{{key}: {value}}}]
"""


def port_of(template: str, port: str) -> tuple[int, str]:
    """(number, name) the policy's only port parses into."""
    (policy,) = policy_docs(template.format(port=port))
    spec = policy.specs[0].rules[0].port_rules[0].ports[0]
    return spec.port, spec.name


# ---------------------------------------------------------------- the seeds' mistakes


def test_curly_quoted_port_of_the_seed_is_refused_with_the_hint() -> None:
    (err,) = validate_policy_file(MISTAKES / "allow-get-data-curly-quote.yaml")
    assert str(err) == (
        f"{MISTAKES / 'allow-get-data-curly-quote.yaml'}:20: CiliumNetworkPolicy default/allow-get-products: "
        "spec.ingress[0].toPorts[0].ports[0].port: invalid port '\u201c80\u201d': "
        "typographic quote \u201c in the port: write 80 or \"80\"")


def test_wildcard_match_name_of_the_seed_is_refused_with_the_hint() -> None:
    (err,) = validate_policy_file(MISTAKES / "egress-matchname-wildcard.yaml")
    assert str(err) == (
        f"{MISTAKES / 'egress-matchname-wildcard.yaml'}:13: CiliumClusterwideNetworkPolicy egress-example-com: "
        "spec.egress[0].toFQDNs[0].matchName: invalid matchName '*.example.com': matchName takes no "
        "wildcards: use matchPattern: '*.example.com'")


@pytest.mark.parametrize("name", ["allow-get-data-curly-quote", "egress-matchname-wildcard"])
def test_each_mistake_file_quotes_the_message_it_gets(name: str) -> None:
    """The header of a mistake file shows the message; it must be the one validate prints."""
    path = MISTAKES / f"{name}.yaml"
    (err,) = validate_policy_file(path)
    field = err.location.path.rsplit(".", 1)[-1]
    assert f"#   {field}: {err.message}\n" in path.read_text()


def test_validate_and_run_refuse_a_mistake_the_same_way(tmp_path: Path) -> None:
    """`l7lab validate` on the file, and a scenario that uses it (what `up` and `run` load)."""
    cli = [sys.executable, "-m", "dataplane.cli"]
    out = subprocess.run([*cli, "validate", str(MISTAKES / "egress-matchname-wildcard.yaml")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "egress-matchname-wildcard.yaml:13:" in out.stderr
    assert "matchName takes no wildcards: use matchPattern: '*.example.com'" in out.stderr
    scenario = tmp_path / "seed.yaml"
    scenario.write_text((REPO / "scenarios" / "get-data-seed.yaml").read_text().replace(
        "policies/allow-get-data-seed.yaml", str(MISTAKES / "allow-get-data-curly-quote.yaml")))
    out = subprocess.run([*cli, "run", "--dry-run", str(scenario)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "allow-get-data-curly-quote.yaml:20:" in out.stderr
    assert "typographic quote \u201c in the port: write 80 or \"80\"" in out.stderr


def test_half_curly_quote_breaks_the_yaml_and_the_error_names_the_line() -> None:
    """port: "80\u201d opens an ASCII quote that nothing closes before the next ASCII quote: the
    YAML is invalid, later in the file; the message points back at the typographic quote."""
    text = CNP.format(port="x").replace("ports: [{port: x, protocol: TCP}]",
                                        'ports:\n            - port: "80\u201d\n              protocol: TCP\n'
                                        '          rules:\n            http:\n              - method: "GET"')
    (msg,) = errors_of(text)
    assert msg.startswith("policies/x.yaml:")
    assert "invalid YAML" in msg
    assert 'line 9 has a typographic quote \u201d: YAML quotes a value with ASCII " or \' only: - port: "80\u201d' in msg


def test_typographic_quotes_in_a_label_value_get_the_hint() -> None:
    text = CNP.format(port='"80"').replace("{app: api}", "{app: \u201capi\u201d}")
    (msg,) = errors_of(text)
    assert "spec.endpointSelector.matchLabels.app: invalid label value '\u201capi\u201d'" in msg
    assert 'typographic quote \u201c in the label value: write "api" with ASCII quotes, or no quotes' in msg


# ---------------------------------------------------------------- CiliumNetworkPolicy ports


@pytest.mark.parametrize("port,parsed", [
    ('"80"', (80, "")),
    ('"0"', (0, "")),
    ('"HTTP"', (0, "http")),            # IsSvcName, lower-cased for comparison
    ('"Http-Alt"', (0, "http-alt")),
    ('"0x50"', (0, "0x50")),            # a service name (it has a letter), not hex 80
    ('"010"', (8, "")),                 # strconv.ParseUint base 0: a leading 0 is octal
    ('"1_000"', (1000, "")),            # '_' between digits, base 0
    ('"65535"', (65535, "")),
])
def test_cilium_accepts_these_ports(port: str, parsed: tuple[int, str]) -> None:
    assert port_of(CNP, port) == parsed


@pytest.mark.parametrize("port,words", [
    ('"\u201c80\u201d"', "typographic quote \u201c in the port: write 80 or \"80\""),
    ("80\u201d", "typographic quote \u201d in the port: write 80 or \"80\""),
    ('"080"', "a leading 0 makes Cilium read the port as octal"),
    ('"70000"', "port 70000 is out of range: expected 0-65535"),
    ('"a--b"', "invalid port 'a--b'"),            # consecutive '-' is no IANA service name
    ('"-http"', "invalid port '-http'"),
    ('"http-"', "invalid port 'http-'"),
    ('"http_alt"', "invalid port 'http_alt'"),
    ('"abcdefghijklmnop"', "a port name has at most 15 characters"),
    ('"1__0"', "invalid port '1__0'"),
    ('"80 "', "invalid port '80 '"),
    ('"6581-6586"', "a port range is written port: \"6581\" with endPort: 6586"),
    ("80", "expected a string, got number 80: write \"80\""),   # the CRD types port as a string
])
def test_cilium_refuses_these_ports(port: str, words: str) -> None:
    (msg,) = errors_of(CNP.format(port=port))
    assert "spec.ingress[0].toPorts[0].ports[0].port:" in msg
    assert words in msg, msg


def test_go_parse_uint16_follows_strconv() -> None:
    assert [go_parse_uint16(s) for s in ("0", "00", "017", "0o17", "0b101", "0x1F", "0x_1F", "1_2")] == \
        [0, 0, 15, 15, 5, 31, 31, 12]
    assert [go_parse_uint16(s) for s in ("", "_1", "1_", "0_", "08", "+1", "-1", "65536", "0x", "1 ")] == \
        [None, None, None, None, None, None, None, None, None, None]
    assert go_parse_uint16("0_17") == 15  # '_' after the octal 0 is between digits


def test_service_names_follow_rfc_6335() -> None:
    assert all(is_svc_name(n) for n in ("http", "HTTP", "h2c", "x-1-y", "a" * 15, "8080x"))
    assert not any(is_svc_name(n) for n in ("", "80", "a--b", "-a", "a-", "a_b", "a" * 16, "\u00e9t\u00e9"))


# ---------------------------------------------------------------- NetworkPolicy ports


@pytest.mark.parametrize("port,parsed", [("80", (80, "")), ("http", (0, "http")), ('"http-alt"', (0, "http-alt"))])
def test_kubernetes_accepts_these_ports(port: str, parsed: tuple[int, str]) -> None:
    assert port_of(NP, port) == parsed


@pytest.mark.parametrize("port,words", [
    ('"80"', "in a NetworkPolicy a quoted number is a port name, and a port name needs a letter: write 80 without quotes"),
    ("HTTP", "invalid port name 'HTTP'"),          # IsValidPortName: lower case only
    ("a--b", "invalid port name 'a--b'"),
    ("\u201c80\u201d", "typographic quote \u201c in the port: write 80 or \"80\""),
    ("0", "port 0 is out of range: expected 1-65535"),
])
def test_kubernetes_refuses_these_ports(port: str, words: str) -> None:
    (msg,) = errors_of(NP.format(port=port))
    assert "spec.ingress[0].ports[0].port:" in msg
    assert words in msg, msg


# ---------------------------------------------------------------- FQDN selectors


@pytest.mark.parametrize("key,value", [
    ("matchName", "api.example.com"),
    ("matchName", "api.example.com."),
    ("matchName", "-edge.example.com"),      # ^([-a-zA-Z0-9_]+[.]?)+$ allows '-' anywhere
    ("matchName", "_srv._tcp.example.com"),
    ("matchName", "API.Example.COM"),
    ("matchPattern", "*.example.com"),
    ("matchPattern", "*"),
    ("matchPattern", "api-*.example.com"),
])
def test_cilium_accepts_these_fqdn_selectors(key: str, value: str) -> None:
    assert errors_of(FQDN.format(key=key, value=f'"{value}"')) == []


@pytest.mark.parametrize("key,value,words", [
    ("matchName", "*.example.com", "matchName takes no wildcards: use matchPattern: '*.example.com'"),
    ("matchName", "api.*", "matchName takes no wildcards: use matchPattern: 'api.*'"),
    ("matchName", ".example.com", "invalid matchName '.example.com'"),
    ("matchName", "a..example.com", "invalid matchName 'a..example.com'"),
    ("matchName", "exa mple.com", "invalid matchName 'exa mple.com'"),
    ("matchName", "\u201capi.example.com\u201d", "typographic quote \u201c in the name"),
    ("matchPattern", ".example.com", "invalid matchPattern '.example.com'"),
    ("matchPattern", "*..example.com", "invalid matchPattern '*..example.com'"),
    ("matchPattern", "*.example.com/x", "invalid matchPattern '*.example.com/x'"),
])
def test_cilium_refuses_these_fqdn_selectors(key: str, value: str, words: str) -> None:
    (msg,) = errors_of(FQDN.format(key=key, value=f'"{value}"'))
    assert f"spec.egress[0].toFQDNs[0].{key}:" in msg
    assert words in msg, msg


def test_dns_rule_match_name_gets_the_same_check() -> None:
    text = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: shop}
spec:
  endpointSelector: {}
  egress:
    - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns: [{matchName: "*.example.com"}]
"""
    (msg,) = errors_of(text)
    assert "spec.egress[0].toPorts[0].rules.dns[0].matchName: invalid matchName '*.example.com': " \
           "matchName takes no wildcards: use matchPattern: '*.example.com'" in msg


# ---------------------------------------------------------------- label values in expressions


@pytest.mark.parametrize("template", [CNP.format(port='"80"'), NP.format(port="80")])
def test_expression_values_are_label_values(template: str) -> None:
    """Kubernetes and Cilium check In/NotIn values as label values, as they check matchLabels."""
    subject = "endpointSelector: {matchLabels: {app: api}}" if "cilium" in template else "podSelector: {}"
    where = "spec.endpointSelector" if "cilium" in template else "spec.podSelector"
    good = template.replace(subject, subject.split(":")[0] + ": {matchExpressions: [{key: app, operator: In, values: [api, web-1]}]}")
    assert errors_of(good) == []
    bad = good.replace("[api, web-1]", "[api, \"a b\", \"-x\"]")
    msgs = errors_of(bad)
    assert [m.split(": ", 2)[-1] for m in msgs] == [
        f"{where}.matchExpressions[0].values[1]: invalid label value 'a b': expected at most 63 letters, digits, '-', '_', '.'",
        f"{where}.matchExpressions[0].values[2]: invalid label value '-x': expected at most 63 letters, digits, '-', '_', '.'"]


# ---------------------------------------------------------------- HTTP rules

HTTP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api, namespace: shop}}
spec:
  endpointSelector: {{}}
  ingress:
    - toPorts:
        - ports: [{{port: "80", protocol: TCP}}]
          rules:
            http: [{rule}]
"""


@pytest.mark.parametrize("rule", [
    '{method: "GET|POST", path: "/api/(v1|v2)/.*"}',
    '{method: "get"}',                                 # a regex like any other: compiles, matches nothing
    '{path: "/data\\\\?x=[0-9]+"}',
    '{headerMatches: [{name: X-Token, value: abc}]}',
])
def test_http_rules_cilium_accepts(rule: str) -> None:
    assert errors_of(HTTP.format(rule=rule)) == []


@pytest.mark.parametrize("rule,field,words", [
    ('{method: "GET("}', "method", "invalid RE2 regex"),        # Go's regexp.Compile refuses it too
    ('{path: "/(?=admin)"}', "path", "invalid RE2 regex"),      # no lookaround in RE2 or Go
    ('{path: "/(a)\\\\1"}', "path", "invalid RE2 regex"),       # no backreferences
    ('{headerMatches: [{name: "", value: x}]}', "headerMatches[0].name", "invalid header name ''"),  # MinLength=1
    ('{headerMatches: [{value: x}]}', "headerMatches[0]", "name is required"),
])
def test_http_rules_cilium_refuses(rule: str, field: str, words: str) -> None:
    (msg,) = errors_of(HTTP.format(rule=rule))
    assert f"spec.ingress[0].toPorts[0].rules.http[0].{field}:" in msg, msg
    assert words in msg, msg
