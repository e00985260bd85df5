"""`l7lab trace` on real labs brought up with `l7lab up`: the steps a user checks, present and in
order, for an allowed flow, an L3/L4 drop, an L7 403, a DNS query the DNS proxy refuses, a flow
the proxy forwards, and a would-be drop that audit mode lets pass; setup errors exit 1; and
`run --explain`, which traces each probe that missed its expectation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_kernel, unique_lab
from tests.support.cli_lab import l7lab, up_lab

SCENARIO = """\
name: trace
settings: {{audit: {audit}}}
namespaces: [{{name: t}}, {{name: kube-system}}]
pods:
  - {{name: client, namespace: t, labels: {{app: client}}}}
  - {{name: api, namespace: t, labels: {{app: api}}, ports: [{{port: 8080}}]}}
  - {{name: vault, namespace: t, labels: {{app: vault}}, ports: [{{port: 8080}}]}}
  - {{name: web, namespace: t, labels: {{app: web}}, ports: [{{port: 8080}}]}}
  - {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}, ports: [{{port: 53, protocol: UDP, name: dns}}]}}
services:
  - {{name: web-svc, namespace: t, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}
policies:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: api-read, namespace: t}}
    spec:
      endpointSelector: {{matchLabels: {{app: api}}}}
      ingress:
        - fromEndpoints: [{{matchLabels: {{app: client}}}}]
          toPorts:
            - ports: [{{port: "8080", protocol: TCP}}]
              rules: {{http: [{{method: GET, path: "/items/.*"}}]}}
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {{name: vault-closed, namespace: t}}
    spec: {{podSelector: {{matchLabels: {{app: vault}}}}, policyTypes: [Ingress]}}
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: client-dns, namespace: t}}
    spec:
      endpointSelector: {{matchLabels: {{app: client}}}}
      egress:
        - toEndpoints: [{{matchLabels: {{"k8s:io.kubernetes.pod.namespace": t}}}}]
        - toEndpoints: [{{matchLabels: {{"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}}}]
          toPorts:
            - ports: [{{port: "53", protocol: ANY}}]
              rules: {{dns: [{{matchPattern: "*.example.com"}}]}}
"""


def bring_up(tmp: Path, audit: bool) -> Iterator[str]:
    require_kernel()
    path = tmp / f"trace-{'audit' if audit else 'enforce'}.yaml"
    path.write_text(SCENARIO.format(audit=str(audit).lower()))
    yield from up_lab(path, "btr")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from bring_up(tmp_path_factory.mktemp("trace"), audit=False)


@pytest.fixture(scope="module")
def audit_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from bring_up(tmp_path_factory.mktemp("trace-audit"), audit=True)


def trace(lab: str, *args: str) -> dict[str, Any]:
    out = l7lab("trace", lab, "--from", "t/client", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def steps_in_order(data: dict[str, Any], *wanted: tuple[str, str]) -> list[dict[str, Any]]:
    """Steps matching each (phase, fragment of the title) in this order (a later one may be the
    same step as the one before); returns them."""
    steps = data["steps"]
    found, at = [], 0
    for phase, fragment in wanted:
        later = [s for s in steps[at:] if s["phase"] == phase and fragment in s["title"]]
        assert later, f"no {phase} step {fragment!r} from step {at + 1} on:\n" + \
            "\n".join(f"{s['number']} {s['phase']}: {s['title']}" for s in steps)
        found.append(later[0])
        at = later[0]["number"] - 1
    return found


def test_an_allowed_flow_is_decided_at_the_source_and_delivered_unchecked(lab: str) -> None:
    data = trace(lab, "--to", "web:8080")
    steps_in_order(data, ("request", "tc ingress from_container on"), ("request", "conntrack: NEW"),
                   ("request", "source identity"), ("request", "egress policy of t/client, lookup 1"),
                   ("request", "egress policy of t/client: FORWARD by CiliumNetworkPolicy t/client-dns egress[0]"),
                   ("request", "ingress policy of t/web (not enforced): FORWARD"),
                   ("request", "decision for the packet (egress and ingress combined): FORWARD"),
                   ("request", "returned TC_ACT_OK: FORWARD, mark 0xe00"),
                   ("request", "tc egress to_container on"), ("request", "mark 0xe00 says from_container already decided"),
                   ("reply", "(t/web): SYN-ACK"), ("reply", "conntrack: REPLY"),
                   ("reply", "the client saw: allowed"), ("reply", "the oracle (explain) predicted: allowed"))
    assert not [s for s in data["steps"] if s["phase"] in ("node", "proxy", "upstream")]
    assert data["kernel"]["verdict"] == "FORWARD" and data["disagreements"] == []
    assert all(s["code"].startswith("dataplane/bpf/") for s in data["steps"] if s["layer"] == "kernel")


def test_a_probe_to_a_service_is_traced_through_the_translation(lab: str) -> None:
    """The agent pins the probe to the backend the oracle judges; the trace follows the flow
    to the ClusterIP at the client's hook and to the backend at the backend's."""
    data = trace(lab, "--to", "web-svc", "--backend", "web")
    steps_in_order(data, ("request", "-> 10.96.0.1:80"), ("request", "egress policy of t/client, lookup 1"),
                   ("request", "ingress policy of t/web"), ("request", "tc egress to_container on"),
                   ("request", "(t/web): SYN TCP"), ("reply", "(t/web): SYN-ACK"),
                   ("reply", "SYN-ACK TCP 10.96.0.1:80 ->"), ("reply", "the client saw: allowed"))
    assert data["outcome"] == "allowed" and data["disagreements"] == []
    assert data["oracle"]["translation"].startswith("service t/web-svc 10.96.0.1:80/TCP -> pod t/web ")


def test_status_lists_the_services_with_their_backends(lab: str) -> None:
    out = l7lab("status", lab, "--json")
    assert out.returncode == 0, out.stderr
    (status,) = json.loads(out.stdout)
    (svc,) = status["agent"]["services"]
    web = next(e for e in status["endpoints"] if e["name"] == "t/web")
    assert (svc["service"], svc["address"], svc["backends"]) == ("t/web-svc", "10.96.0.1:80/TCP", [f"t/web {web['ip']}:8080"])
    text = l7lab("status", lab)
    assert text.returncode == 0 and "t/web-svc" in text.stdout and "10.96.0.1:80/TCP" in text.stdout


def test_an_l3l4_drop_stops_at_the_first_hook(lab: str) -> None:
    data = trace(lab, "--to", "vault:8080")
    steps_in_order(data, ("request", ": SYN TCP"), ("request", "ingress policy of t/vault, lookup 4"),
                   ("request", "ingress policy of t/vault: DROP (POLICY_DENIED)"),
                   ("request", "decision for the packet (egress and ingress combined): DROP (POLICY_DENIED)"),
                   ("request", "returned TC_ACT_SHOT: DROP (POLICY_DENIED)"),
                   ("reply", "the client saw: dropped"), ("reply", "predicted: dropped"))
    assert not [s for s in data["steps"] if s["phase"] != "request" and s["layer"] == "kernel"]
    assert data["outcome"] == "dropped" and data["kernel"]["reason"] == "POLICY_DENIED"
    assert "default deny" in data["hint"] and "t/vault" in data["hint"]


def test_an_l7_denied_request_is_answered_403_by_the_proxy(lab: str) -> None:
    data = trace(lab, "--to", "api:8080", "--http", "DELETE /items/1")
    decision, assign, rule, _, accept, rules, answer = steps_in_order(
        data, ("request", "decision for the packet (egress and ingress combined): REDIRECT to the L7 proxy"),
        ("request", "bpf_sk_assign to the proxy listener 127.0.0.1:15001; mark set 0x3a990200"),
        ("node", "ip rule 9: fwmark 0x200/0xf00 lookup table 2004"), ("node", "table 2004: local 0.0.0.0/0 dev lo"),
        ("proxy", "accepted the connection from"),
        ("proxy", "DELETE /items/1 against L7 ingress of t/api: matches no HTTP rule"),
        ("proxy", "answered 403 Access denied; nothing sent upstream"))
    api = data["kernel"]["where"]
    assert "t/client" in api and decision["detail"]["rule"] == "CiliumNetworkPolicy t/api-read ingress[0]"
    assert accept["title"].endswith(f"original destination {data['proxy']['original_destination']} (getsockname())")
    assert rules["detail"]["policies"] == ["CiliumNetworkPolicy t/api-read"]
    assert rule["code"].split()[1] == "setup_node" and answer["code"].split()[1] == "ClientConnection.deny"
    assert assign["code"].split()[1] == "proxy_redirect"
    assert not [s for s in data["steps"] if s["phase"] == "upstream"]
    assert data["outcome"] == "denied" and data["disagreements"] == []
    text = l7lab("trace", lab, "--from", "t/client", "--to", "api:8080", "--http", "DELETE /items/1")
    assert text.returncode == 0, text.stderr
    headings = [line for line in text.stdout.splitlines() if line in
                ("the request leaves the pod", "node routing", "the L7 proxy", "the proxy's upstream", "the reply")]
    assert headings == ["the request leaves the pod", "node routing", "the L7 proxy", "the reply"]


def test_an_allowed_request_goes_upstream_with_the_from_proxy_mark(lab: str) -> None:
    data = trace(lab, "--to", "api:8080", "--http", "GET /items/1")
    forwarded, kernel, _ = steps_in_order(
        data, ("proxy", "forwarded upstream to"), ("upstream", "the L7 proxy's upstream: mark"),
        ("upstream", "(t/api): SYN-ACK"))
    mark = forwarded["title"].split("SO_MARK ")[1].split()[0]
    assert f"mark {mark} carries source identity" in kernel["title"]
    assert data["outcome"] == "allowed" and data["proxy"]["verdict"] == "forwarded" and data["disagreements"] == []


def test_a_dns_query_no_rule_allows_is_refused_by_the_dns_proxy(lab: str) -> None:
    data = trace(lab, "--to", "kube-dns", "--dns", "www.example.org")
    steps_in_order(data, ("request", ": datagram UDP"),
                   ("request", "egress policy of t/client: REDIRECT to the L7 proxy"),
                   ("request", "bpf_sk_assign to the proxy listener"), ("node", "fwmark 0x200/0xf00"),
                   ("proxy", "received the query from"),
                   ("proxy", "DNS A www.example.org against L7 egress of t/client: matches no DNS rule"),
                   ("proxy", "answered REFUSED; nothing sent upstream"), ("reply", ": datagram UDP"),
                   ("reply", "the client saw: refused"))
    assert data["outcome"] == "refused" and data["disagreements"] == []


def test_audit_mode_lets_a_would_be_drop_pass_and_says_so(audit_lab: str) -> None:
    data = trace(audit_lab, "--to", "vault:8080")
    steps_in_order(data, ("request", "ingress policy of t/vault: AUDIT (POLICY_DENIED), a drop that audit mode lets pass"),
                   ("request", "decision for the packet (egress and ingress combined): AUDIT (POLICY_DENIED)"),
                   ("request", "returned TC_ACT_OK: AUDIT (POLICY_DENIED)"),
                   ("request", "(t/vault): SYN TCP"), ("reply", "the client saw: allowed"),
                   ("reply", "predicted: allowed"))
    assert data["kernel"]["verdict"] == "AUDIT" and data["oracle"]["audited"] and data["disagreements"] == []
    assert "audit mode let it pass" in data["hint"]


def test_setup_errors_exit_1(lab: str, capsys: pytest.CaptureFixture[str]) -> None:
    from dataplane.cli import main  # noqa: PLC0415 - in this process: no lab is changed by these

    assert main(["trace", unique_lab("btr"), "--from", "t/client", "--to", "web:8080"]) == 1
    assert "is up" in capsys.readouterr().err
    assert main(["trace", lab, "--from", "t/nobody", "--to", "web:8080"]) == 1
    assert "t/nobody" in capsys.readouterr().err
    assert main(["trace", lab, "--from", "t/client", "--to", "web:8080", "--http", "GET /", "--dns", "x.example.com"]) == 1
    assert "exclude each other" in capsys.readouterr().err


def test_a_lab_of_this_process_is_traced_without_an_agent(datapath, tmp_path: Path) -> None:  # noqa: ANN001
    """`trace_in_lab` (what `run` uses): the same timeline from the datapath in this process, and
    no trace flow left behind (the next trace of the same flows could not start otherwise)."""
    import asyncio  # noqa: PLC0415

    from dataplane.scenario import HttpRequest, make_probe, parse_scenario  # noqa: PLC0415
    from dataplane.tracing import trace_in_lab  # noqa: PLC0415
    from dataplane.yamlsource import load_documents  # noqa: PLC0415
    from tests.support.kernel_lab import close_lab, open_lab  # noqa: PLC0415

    (doc,) = load_documents(SCENARIO.format(audit="false"), str(tmp_path / "trace.yaml"))
    klab = open_lab(parse_scenario(doc, tmp_path / "trace.yaml"), datapath, unique_lab("btr"))
    try:
        for method, outcome, last in (("DELETE", "denied", "answered 403 Access denied"),
                                      ("GET", "allowed", "the L7 proxy's upstream: mark")):
            probe = make_probe(klab.scenario, "t/client", "api:8080", "TCP", HttpRequest(method, "/items/1"))
            data = asyncio.run(trace_in_lab(klab.lab, klab.engine, probe)).to_json()
            steps_in_order(data, ("request", "REDIRECT to the L7 proxy"), ("request", "bpf_sk_assign to the proxy listener"),
                           ("node", "fwmark 0x200/0xf00"), ("proxy", f"{method} /items/1 against L7 ingress of t/api"),
                           ("proxy" if method == "DELETE" else "upstream", last))
            assert data["outcome"] == outcome and data["disagreements"] == []
    finally:
        close_lab(klab)


RUN_STEPS = """
steps:
  - name: a learner's wrong guesses
    probes:
      - {from: t/client, to: api:8080, http: {method: DELETE, path: /items/1}, expect: allowed}
      - {from: t/client, to: vault:8080, expect: allowed}
      - {from: t/client, to: api:8080, http: {method: GET, path: /items/1}, expect: allowed}
"""


def test_run_explain_puts_the_kernels_trace_beside_the_oracles_reasoning(datapath, tmp_path: Path,  # noqa: ANN001
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --explain` on the kernel: each probe that missed its expectation is traced again,
    and the explanation shows where the kernel or the proxy decided it beside the policy's
    reasoning; a probe that passed is not explained."""
    from dataplane.cli.run import print_explanation  # noqa: PLC0415
    from dataplane.runner import KernelExecutor, run_scenario  # noqa: PLC0415
    from dataplane.scenario import parse_scenario  # noqa: PLC0415
    from dataplane.yamlsource import load_documents  # noqa: PLC0415
    from tests.support.kernel_lab import close_lab, open_lab  # noqa: PLC0415

    (doc,) = load_documents(SCENARIO.format(audit="false") + RUN_STEPS, str(tmp_path / "trace.yaml"))
    klab = open_lab(parse_scenario(doc, tmp_path / "trace.yaml"), datapath, unique_lab("brx"))
    try:
        report = run_scenario(klab.scenario, KernelExecutor(klab.lab, klab.engine), klab.lab.name, explain=True)
    finally:
        close_lab(klab)
    delete, vault, get = report.results
    assert (delete.observed.outcome, vault.observed.outcome, get.observed.outcome) == ("denied", "dropped", "allowed")
    assert not get.explained and get.trace is None
    assert delete.trace_error is None and vault.trace_error is None
    assert delete.trace.kernel["verdict"] == "REDIRECT" and delete.trace.proxy["verdict"] == "denied"
    assert vault.trace.kernel["verdict"] == "DROP" and vault.trace.disagreements == []
    assert delete.reasoning.outcome == "denied" and vault.reasoning.outcome == "dropped"

    from dataplane.cli.common import console  # noqa: PLC0415

    monkeypatch.setattr(console, "width", 200)  # wide enough that no cell wraps
    capsys.readouterr()
    print_explanation(vault, kernel=True)
    shown = capsys.readouterr().out
    assert "expected allowed, observed dropped" in shown
    assert "kernel: DROP" in shown and "hint:" in shown
    assert "selected by NetworkPolicy t/vault-closed" in shown  # the oracle's column
    as_json = delete.to_json()["explain"]
    assert as_json["trace"]["proxy"]["verdict"] == "denied" and as_json["oracle"]["outcome"] == "denied"
