"""Helpers for the policy tests: build a scenario and an engine from YAML strings and ask the
oracle about flows by pod name."""

from __future__ import annotations

import textwrap
from pathlib import Path

from dataplane.scenario import HttpRequest, parse_scenario
from dataplane.yamlsource import load_documents
from dataplane.policy import Flow, PolicyEngine, parse_documents

# The upstream Kubernetes network policy e2e layout (test/e2e/network/netpol): namespaces x, y,
# z; pods a, b, c in each; ports 80 and 81, TCP and UDP.
NETPOL_TOPOLOGY = """\
name: netpol
namespaces:
  - {name: x, labels: {ns: x}}
  - {name: y, labels: {ns: y}}
  - {name: z, labels: {ns: z}}
pods:
""" + "".join(
    f"  - {{name: {p}, namespace: {n}, labels: {{pod: {p}}}, ports: [{{port: 80, name: serve-80-tcp}}, "
    f"{{port: 81, name: serve-81-tcp}}, {{port: 80, protocol: UDP, name: serve-80-udp}}, "
    f"{{port: 81, protocol: UDP, name: serve-81-udp}}]}}\n"
    for n in "xyz" for p in "abc")


def scenario(topology: str, policies: str = "", extra: str = "", settings: str = ""):
    text = topology
    if settings:
        text += "settings:\n" + textwrap.indent(textwrap.dedent(settings), "  ")
    if policies.strip():
        docs = [d for d in textwrap.dedent(policies).split("\n---\n") if d.strip()]
        text += "policies:\n" + "".join("  - " + textwrap.indent(d.strip(), "    ")[4:] + "\n" for d in docs)
    text += textwrap.dedent(extra)
    (doc,) = load_documents(text, "x.yaml")
    return parse_scenario(doc, Path("x.yaml"))


def engine(policies: str = "", topology: str = NETPOL_TOPOLOGY, settings: str = "", extra: str = "") -> PolicyEngine:
    return PolicyEngine(scenario(topology, policies, extra, settings))


def outcome(eng: PolicyEngine, src: str, dst: str, port: int = 80, protocol: str = "TCP",
            method: str | None = None, path: str = "/", headers: dict | None = None, dns: str = "") -> str:
    """Outcome of src -> dst:port; dst is a pod key/name, a world host name, or an IP."""
    sc = eng.scenario
    key = sc.pod_key(dst)
    if key is not None:
        ip, name = sc.pods[key].ip, sc.pods[key].name
    elif dst in sc.world:
        ip, name = sc.world[dst].address, dst
    else:
        ip, name = dst, ""
    http = HttpRequest(method, path, dict(headers or {})) if method else None
    src_key = sc.pod_key(src) or src
    return eng.verdict(Flow(src_key, ip, protocol, port, http, dns, name)).outcome


def matrix(eng: PolicyEngine, port: int = 80, protocol: str = "TCP") -> dict[tuple[str, str], str]:
    pods = list(eng.scenario.pods)
    return {(s, d): outcome(eng, s, d, port, protocol) for s in pods for d in pods if s != d}


def policy_docs(text: str, source: str = "policies/x.yaml"):
    return parse_documents(load_documents(textwrap.dedent(text), source))
