"""`matchPattern` means what it means in Cilium: the regex a pattern becomes, the names it
selects as a `toFQDNs` selector and as a `rules.dns` rule, and what validation accepts.

The cases follow Cilium's own tests of its matcher (pkg/fqdn/matchpattern/matchpattern_test.go:
regex conversion, accept/reject lists, Sanitize) and the examples of the CRD documentation of
`matchPattern` (pkg/policy/api/fqdn.go), with the `**.` prefix and the edge cases the code
decides (empty labels, the root, runs of stars) added.
"""

from __future__ import annotations

import pytest

from dataplane.policy.patterns import match_pattern_error
from l7.dns import DnsRule, fqdn_form, fqdn_matches, is_match_all_pattern, pattern_to_regex, validate_dns_pattern

from tests.support.policy import CILIUM_TOPOLOGY as TOPO
from tests.support.policy import cnp, engine, looked_up, outcome
from tests.support.policy import policy_errors as errors_of

LABEL = "[-a-zA-Z0-9_]"
LABELS = f"({LABEL}+([.]{LABEL}+){{0,}})[.]"

# ---------------------------------------------------------------- the regex a pattern becomes


@pytest.mark.parametrize("pattern,regex", [
    ("cilium.io.", "^cilium[.]io[.]$"),
    ("cilium.io", "^cilium[.]io[.]$"),                      # Sanitize adds the final dot
    ("CILIUM.io", "^cilium[.]io[.]$"),                      # and the pattern is lower-cased
    ("*.cilium.io.", f"^{LABEL}*[.]cilium[.]io[.]$"),
    ("*.com", f"^{LABEL}*[.]com[.]$"),
    ("*", f"(^({LABEL}+[.])+$)|(^[.]$)"),
    ("*.", f"(^({LABEL}+[.])+$)|(^[.]$)"),
    ("**", f"(^({LABEL}+[.])+$)|(^[.]$)"),
    ("***.", f"(^({LABEL}+[.])+$)|(^[.]$)"),
    ("**.cilium.io", f"^{LABELS}cilium[.]io[.]$"),
    ("****.cilium.io", f"^{LABELS}cilium[.]io[.]$"),        # any run of 2+ stars before the dot
    ("**cilium.io", f"^{LABEL}*cilium[.]io[.]$"),           # no dot after the stars: one label
    ("a**b.io", f"^a{LABEL}*b[.]io[.]$"),                   # a run of stars is one star
    ("foo.**.com", f"^foo[.]{LABEL}*[.]com[.]$"),
    ("**.*.cilium.io", f"^{LABELS}{LABEL}*[.]cilium[.]io[.]$"),
])
def test_pattern_becomes_ciliums_regex(pattern: str, regex: str) -> None:
    assert pattern_to_regex(pattern) == regex


@pytest.mark.parametrize("pattern,expected", [
    ("*", True), ("*.", True), ("**", True), ("**.", True), ("***", True), (" * ", True),
    ("", False), (".", False), ("*.com", False), ("**.com", False), ("*.*", False), ("a*", False),
])
def test_match_all_patterns(pattern: str, expected: bool) -> None:
    assert is_match_all_pattern(pattern) is expected


@pytest.mark.parametrize("name,form", [
    ("cilium.io", "cilium.io."), ("Cilium.IO.", "cilium.io."), ("", "."), (".", "."),
])
def test_names_are_matched_in_fqdn_form(name: str, form: str) -> None:
    assert fqdn_form(name) == form


# ---------------------------------------------------------------- what a toFQDNs selector selects

CASES = [
    # pattern, names selected, names not selected
    ("cilium.io", ["cilium.io", "cilium.io.", "CILIUM.IO"],
     ["", "anysub.cilium.io", "anysub.ci.io", "anysub.ciliumandmore.io", "ciliumxio"]),
    ("*.cilium.io", ["anysub.cilium.io", "Blog.Cilium.IO.", ".cilium.io"],
     ["", "cilium.io", "a.b.cilium.io", "anysub.ci.io", "anysub.ciliumandmore.io"]),
    ("*.ci*.io", ["anysub.cilium.io", "anysub.ci.io", "anysub.ciliumandmore.io"],
     ["", "cilium.io", "a.b.cilium.io"]),
    ("*cilium.io", ["cilium.io", "subcilium.io", "sub-cilium.io"], ["www.cilium.io", "blog.cilium.io"]),
    ("sub*.cilium.io", ["sub.cilium.io", "subdomain.cilium.io"],
     ["www.cilium.io", "blog.cilium.io", "cilium.io", "google.com"]),
    ("*", [".", "", "io", "io.", "cilium.io", "svc.cluster.local", "service.namespace.svc.cluster.local.",
           "_foobar._tcp.cilium.io", "MiXeD.Case.io"],
     [".io", ".cilium.io", ".svc.cluster.local", "a..b", "a b.io", "a/b.io"]),
    ("*.*.cilium.io", ["_foobar._tcp.cilium.io", "a.b.cilium.io"], ["cilium.io", "a.b.c.cilium.io"]),
    ("_foobar._tcp.cilium.io", ["_foobar._tcp.cilium.io"], ["_tcp.cilium.io", "cilium.io"]),
    ("*.io", ["cilium.io", ".io"], ["io", "a.cilium.io"]),
    ("**.cilium.io", ["app.cilium.io", "test.app.cilium.io", "a.b.c.d.cilium.io", "_srv._tcp.cilium.io",
                      "APP.Cilium.io."],
     ["cilium.io", ".cilium.io", "a..cilium.io", "xcilium.io", "app.cilium.io.evil.com"]),
    ("***.cilium.io", ["app.cilium.io", "test.app.cilium.io"], ["cilium.io"]),
    ("**.*.cilium.io", ["a.b.cilium.io", "a.b.c.cilium.io"], ["b.cilium.io", "cilium.io"]),
    ("a**b.io", ["ab.io", "axxb.io"], ["a.b.io", "a.x.b.io"]),
    ("foo.**.com", ["foo.bar.com", "foo..com"], ["foo.a.b.com", "foo.com"]),
    ("api.*", ["api.io", "api.com"], ["api.example.com", "api"]),
]


@pytest.mark.parametrize("pattern,accept,reject", CASES, ids=[c[0] for c in CASES])
def test_selector_matches_as_cilium(pattern: str, accept: list[str], reject: list[str]) -> None:
    for name in accept:
        assert fqdn_matches(name, match_pattern=pattern), (pattern, name)
    for name in reject:
        assert not fqdn_matches(name, match_pattern=pattern), (pattern, name)


@pytest.mark.parametrize("pattern", ["*.cilium.io", "*.cilium.io.", "*.CILIUM.io"])
def test_trailing_dot_and_case_of_the_pattern_do_not_matter(pattern: str) -> None:
    assert fqdn_matches("www.cilium.io", match_pattern=pattern)
    assert not fqdn_matches("cilium.io", match_pattern=pattern)


def test_match_name_is_exact_case_insensitive_with_or_without_final_dot() -> None:
    assert fqdn_matches("WWW.example.com.", match_name="www.example.COM")
    assert not fqdn_matches("a.www.example.com", match_name="www.example.com")


# ---------------------------------------------------------------- what a rules.dns rule admits


@pytest.mark.parametrize("pattern", ["*", "*.", "**", "**."])
@pytest.mark.parametrize("name", ["www.example.com", ".io", "a..b", "a b.io", "", "."])
def test_dns_rule_match_all_admits_every_name(pattern: str, name: str) -> None:
    # The DNS proxy replaces a match-all pattern by its match-all regex (GeneratePattern).
    assert DnsRule(match_pattern=pattern).matches(name)


@pytest.mark.parametrize("pattern,accept,reject", [c for c in CASES if not is_match_all_pattern(c[0])],
                         ids=[c[0] for c in CASES if not is_match_all_pattern(c[0])])
def test_dns_rule_matches_other_patterns_as_the_selector(pattern: str, accept: list[str], reject: list[str]) -> None:
    rule = DnsRule(match_pattern=pattern)
    assert all(rule.matches(n) for n in accept)
    assert not any(rule.matches(n) for n in reject)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("pattern", ["**.example.com", "***.example.com", "a**b", "foo.**.com", "*", "**",
                                     "**.", "*.example.com.", "_srv._tcp.*"])
def test_cilium_accepts_every_use_of_stars(pattern: str) -> None:
    validate_dns_pattern(pattern)
    assert match_pattern_error(pattern) is None
    for where in ("toFQDNs", "dns"):
        assert errors_of(_policy(where, pattern)) == [], (where, pattern)


@pytest.mark.parametrize("pattern,words", [
    (".example.com", "a pattern starts with a label, not a dot"),
    ("*..example.com", "an empty label ('..')"),
    ("https://*.example.com", "a DNS pattern names hosts, not URLs"),
    ("*.example.com:443", "a DNS pattern names hosts, not URLs"),
    (".*\\\\.example\\\\.com", "matchPattern is not a regular expression"),
    ("[a-z]+.example.com", "matchPattern is not a regular expression"),
    ("exa mple.com", "expected labels of letters, digits, '-', '_' and '*' separated by single dots"),
])
@pytest.mark.parametrize("where", ["toFQDNs", "dns"])
def test_refused_patterns_say_what_is_allowed(where: str, pattern: str, words: str) -> None:
    (msg,) = errors_of(_policy(where, pattern))
    field = "toFQDNs[0].matchPattern" if where == "toFQDNs" else "toPorts[0].rules.dns[0].matchPattern"
    assert f"spec.egress[0].{field}: invalid matchPattern" in msg, msg
    assert words in msg, msg
    if "regular expression" in words or "not a dot" in words:
        assert "a leading '**.' one or more labels" in msg


def test_a_pattern_longer_than_255_characters_is_refused() -> None:
    pattern = "**." + "a" * 250 + ".com"
    (msg,) = errors_of(_policy("toFQDNs", pattern))
    assert "longer than the limit of 255 characters" in msg
    with pytest.raises(ValueError, match="at most 255"):
        validate_dns_pattern(pattern)


def _policy(where: str, pattern: str) -> str:
    if where == "toFQDNs":
        return cnp(f"""
        endpointSelector: {{}}
        egress:
          - toFQDNs: [{{matchPattern: '{pattern}'}}]
        """)
    return cnp(f"""
    endpointSelector: {{}}
    egress:
      - toEndpoints: [{{matchLabels: {{app: api}}}}]
        toPorts:
          - ports: [{{port: "53", protocol: UDP}}]
            rules:
              dns: [{{matchPattern: '{pattern}'}}]
    """)


# ---------------------------------------------------------------- through the policy engine


def test_double_star_prefix_selects_every_subdomain_not_the_apex() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: frontend}}
    egress:
      - toFQDNs: [{matchPattern: "**.example.com"}]
    """), TOPO)
    looked_up(eng, "www", "deep", "apex", "other")
    assert outcome(eng, "shop/frontend", "www") == "allowed"
    assert outcome(eng, "shop/frontend", "deep") == "allowed"
    assert outcome(eng, "shop/frontend", "apex") == "dropped"
    assert outcome(eng, "shop/frontend", "other") == "dropped"


def test_double_star_prefix_in_dns_rules() -> None:
    eng = engine(cnp("""
    endpointSelector: {matchLabels: {app: frontend}}
    egress:
      - toEndpoints: [{matchLabels: {app: api}}]
        toPorts:
          - ports: [{port: "53", protocol: UDP}]
            rules:
              dns: [{matchPattern: "**.example.com"}]
    """), TOPO)
    for name, verdict in [("www.example.com", "allowed"), ("a.b.example.com", "allowed"),
                          ("example.com", "refused"), ("www.example.org", "refused")]:
        assert outcome(eng, "shop/frontend", "shop/api", 53, "UDP", dns=name) == verdict, name
