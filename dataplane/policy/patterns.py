"""The fields a cluster checks by pattern, checked the same way: ports, port names and FQDN
selectors. A value the cluster refuses is refused here with the same reason, and a value it
accepts is accepted, however odd; where a mistake is common (a typographic quote pasted from a
web page, a wildcard in `matchName`) the message says how to write it.

Sources, for CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium/cilium):
- `toPorts[].ports[].port` (pkg/policy/api/l4.go, rule_validation.go `PortProtocol` sanitize):
  an IANA service name (pkg/iana `IsSvcName`: 1-15 letters, digits and '-', at least one letter,
  no '-' at either end or next to another '-'; compared case-insensitively, so it is lower-cased),
  or else `strconv.ParseUint(port, 0, 16)`: Go's base prefixes, so "010" is port 8 (octal) and
  "080" is refused, "1_000" is digits with a separator.
- `toFQDNs[].matchName` and `rules.dns[].matchName` (pkg/policy/api/fqdn.go, CRD pattern
  `^([-a-zA-Z0-9_]+[.]?)+$`): letters, digits, '-', '_', one '.' between labels; no '*'.
- `matchPattern` (CRD pattern `^([-a-zA-Z0-9_*]+[.]?)+$`, maxLength 255; then
  pkg/fqdn/matchpattern `Validate`, which allows the same characters): the same with '*',
  any number of them anywhere. So `**.example.com` (the prefix that matches one or more labels)
  is accepted, and so are `a**b` and `foo.**.com`, which Cilium reads as `a*b` and `foo.*.com`;
  what each means is in l7/dns.py and docs/policy.md ("matchPattern").

For Kubernetes NetworkPolicy (k8s.io/apimachinery validation, `IsValidPortName`): a port is a
number 1-65535 or a name of 1-15 lower-case letters, digits and '-' with the same rules; a
quoted number ("80") is a name without a letter, which the API server refuses.
"""

from __future__ import annotations

import re

from ..yamlsource import TYPOGRAPHIC_QUOTES

# pkg/iana IsSvcName (RFC 6335 section 5.1), any case.
_SVC_NAME = re.compile(r"([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*")
# Kubernetes IsValidPortName: the same, lower case only.
_K8S_PORT_NAME = re.compile(r"([a-z0-9]-?)*[a-z](-?[a-z0-9])*")
_FQDN_NAME = re.compile(r"([-a-zA-Z0-9_]+[.]?)+")
_FQDN_PATTERN = re.compile(r"([-a-zA-Z0-9_*]+[.]?)+")
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def typographic_quote(text: str) -> str | None:
    """The first typographic quote mark in `text`, or None."""
    return next((c for c in text if c in TYPOGRAPHIC_QUOTES), None)


def strip_quotes(text: str) -> str:
    """`text` without typographic quote marks and without ASCII quotes around it."""
    bare = "".join(c for c in text if c not in TYPOGRAPHIC_QUOTES).strip()
    return bare[1:-1] if len(bare) >= 2 and bare[0] == bare[-1] and bare[0] in "'\"" else bare


def is_svc_name(text: str) -> bool:
    """pkg/iana IsSvcName: what Cilium takes for a port name rather than a number."""
    return 0 < len(text) <= 15 and _SVC_NAME.fullmatch(text) is not None


def go_parse_uint16(text: str) -> int | None:
    """strconv.ParseUint(text, 0, 16): base from the prefix (0x, 0o, 0b, a leading 0 is
    octal), '_' allowed between digits; None where Go returns an error."""
    if not text or not _underscore_ok(text):
        return None
    base, digits = 10, text
    if text[0] == "0" and len(text) > 1:
        prefix = text[1].lower()
        base, digits = {"x": (16, text[2:]), "o": (8, text[2:]), "b": (2, text[2:])}.get(prefix, (8, text[1:]))
    digits = digits.replace("_", "")
    if not digits or any(c not in _DIGITS[base] for c in digits):
        return None
    value = int(digits, base)
    return value if value <= 65535 else None


def _underscore_ok(text: str) -> bool:
    """Go's strconv underscoreOK: '_' only between digits, or between a base prefix and a digit."""
    saw, i, hexa = "^", 0, False
    if len(text) >= 2 and text[0] == "0" and text[1].lower() in "box":
        i, saw, hexa = 2, "0", text[1].lower() == "x"
    for c in text[i:]:
        if c.isdigit() and c.isascii() or hexa and c.lower() in "abcdef":
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def quote_hint(text: str, field: str = "the port") -> str:
    """The hint for a value holding a typographic quote: how to write it instead."""
    mark = typographic_quote(text)
    bare = strip_quotes(text)
    how = f"write {bare} or \"{bare}\"" if bare.isdigit() else f"write \"{bare}\" with ASCII quotes, or no quotes"
    return f"typographic quote {mark} in {field}: {how}"


def cilium_port(raw: str) -> tuple[int, str] | str:
    """A CiliumNetworkPolicy port string: (number, "") or (0, lower-case name), or why it is refused."""
    if is_svc_name(raw):
        return 0, raw.lower()
    number = go_parse_uint16(raw)
    if number is not None:
        return number, ""
    if typographic_quote(raw):
        return f"invalid port {raw!r}: {quote_hint(raw)}"
    if re.fullmatch(r"[0-9]+-[0-9]+", raw):
        low, high = raw.split("-")
        return f"invalid port {raw!r}: a port range is written port: \"{int(low)}\" with endPort: {int(high)}"
    if raw.isascii() and raw.isdigit():
        if raw[0] != "0":
            return f"port {raw} is out of range: expected 0-65535"
        return (f"invalid port {raw!r}: a leading 0 makes Cilium read the port as octal (Go's "
                f"strconv.ParseUint, base 0), and 8 and 9 are no octal digits: write {int(raw)}")
    why = ("a port name has at most 15 characters" if len(raw) > 15 and _SVC_NAME.fullmatch(raw)
           else "expected a port number 0-65535 or a port name (1-15 letters, digits and single '-' "
                "inside, with a letter)")
    return f"invalid port {raw!r}: {why}"


def k8s_port(raw: str) -> tuple[int, str] | str:
    """A NetworkPolicy port written as text: (0, name), or why the API server refuses it."""
    if 0 < len(raw) <= 15 and _K8S_PORT_NAME.fullmatch(raw):
        return 0, raw
    if typographic_quote(raw):
        return f"invalid port {raw!r}: {quote_hint(raw)}"
    if raw.isdigit():
        return (f"invalid port {raw!r}: in a NetworkPolicy a quoted number is a port name, and a port name "
                f"needs a letter: write {int(raw)} without quotes")
    return (f"invalid port name {raw!r}: expected at most 15 lower case letters, digits and single '-' inside, "
            "with a letter (IANA_SVC_NAME)")


def match_name_error(value: str) -> str | None:
    """Why a `matchName` is refused (CRD pattern ^([-a-zA-Z0-9_]+[.]?)+$), with a hint, or None."""
    if _FQDN_NAME.fullmatch(value):
        return None
    if "*" in value and _FQDN_PATTERN.fullmatch(value):
        return (f"invalid matchName {value!r}: matchName takes no wildcards: "
                f"use matchPattern: '{value}'")
    if typographic_quote(value):
        return f"invalid matchName {value!r}: {quote_hint(value, 'the name')}"
    return (f"invalid matchName {value!r}: expected a DNS name of letters, digits, '-' and '_' in labels "
            "separated by single dots")


def match_pattern_error(value: str) -> str | None:
    """Why a `matchPattern` is refused (CRD pattern ^([-a-zA-Z0-9_*]+[.]?)+$), with a hint, or None."""
    if _FQDN_PATTERN.fullmatch(value):
        return None
    if typographic_quote(value):
        return f"invalid matchPattern {value!r}: {quote_hint(value, 'the pattern')}"
    what = f"invalid matchPattern {value!r}"
    if "://" in value or "/" in value or ":" in value:
        return f"{what}: a DNS pattern names hosts, not URLs: leave out the scheme, port and path"
    if any(c in value for c in "\\^$[](){}+?|"):
        return (f"{what}: matchPattern is not a regular expression: {_WILDCARDS}")
    if value.startswith("."):
        return (f"{what}: a pattern starts with a label, not a dot: {_WILDCARDS}")
    if ".." in value:
        return f"{what}: an empty label ('..'): labels are separated by single dots"
    return (f"{what}: expected labels of letters, digits, '-', '_' and '*' separated by single dots "
            f"({_WILDCARDS})")


_WILDCARDS = ("'*' matches within one label (*.example.com: a.example.com), a leading '**.' one or more "
              "labels (**.example.com: a.example.com, a.b.example.com), a lone '*' every name")
