"""The CLI verbs that need no root: validate, explain and run --dry-run, with their exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
L7LAB = [sys.executable, "-m", "dataplane.cli"]


def l7lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*L7LAB, *args], cwd=REPO, capture_output=True, text=True)


def test_dry_run_passes_every_shipped_scenario() -> None:
    for path in sorted((REPO / "scenarios").glob("*.yaml")):
        out = l7lab("run", "--dry-run", "--json", str(path))
        assert out.returncode == 0, (path, out.stdout, out.stderr)
        report = json.loads(out.stdout)
        assert report["mode"] == "dry-run" and report["passed"] and report["probes"] > 0


def test_dry_run_reports_a_missed_expectation_with_exit_3(tmp_path: Path) -> None:
    src = (REPO / "scenarios" / "protect-inventory-api.yaml").read_text()
    assert "expect: denied" in src
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("expect: denied", "expect: allowed", 1))
    (tmp_path / "policies").symlink_to(REPO / "scenarios" / "policies")
    out = l7lab("run", "--dry-run", "--json", str(bad))
    assert out.returncode == 3
    failed = [r for r in json.loads(out.stdout)["results"] if not r["passed"]]
    assert len(failed) == 1 and failed[0]["expected"] == "allowed" and failed[0]["observed"] == "denied"


def test_explain_shows_the_matching_rule() -> None:
    out = l7lab("explain", str(REPO / "scenarios" / "protect-inventory-api.yaml"), "--from", "frontend-app",
                "--to", "inventory-api:8080", "--http", "GET /api/inventory/item1", "--json")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["outcome"] == "allowed"
    denied = l7lab("explain", str(REPO / "scenarios" / "protect-inventory-api.yaml"), "--from", "frontend-app",
                   "--to", "inventory-api:8080", "--http", "DELETE /api/inventory/item1")
    assert denied.returncode == 0 and "403" in denied.stdout and "protect-inventory-api" in denied.stdout


def test_explain_shows_a_service_translation() -> None:
    scenario = str(REPO / "scenarios" / "services.yaml")
    out = l7lab("explain", scenario, "--from", "frontend", "--to", "web.shop.svc.cluster.local", "--http", "GET /api/x",
                "--step", "2", "--backend", "web-3", "--json")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["translation"] == "service shop/web 10.96.0.1:80/TCP -> pod shop/web-3 10.200.0.4:8080"
    assert decision["outcome"] == "allowed"
    text = l7lab("explain", scenario, "--from", "frontend", "--to", "web", "--backend", "web-2")
    assert text.returncode == 0 and "-> pod shop/web-2 10.200.0.3:8080 (translated before policy" in text.stdout
    gone = l7lab("explain", scenario, "--from", "frontend", "--to", "web", "--backend", "web-1")
    assert gone.returncode == 1 and "shop/web-1 is no backend of service shop/web" in gone.stderr


def test_explain_rejects_an_unknown_pod() -> None:
    out = l7lab("explain", str(REPO / "scenarios" / "connectivity.yaml"), "--from", "nobody", "--to", "ledger:5432")
    assert out.returncode == 1 and "unknown pod 'nobody'" in out.stderr


def test_explain_from_a_world_host() -> None:
    """Ingress from outside the cluster: the flow starts at the world host, default deny drops
    it, and after the step that applies the fromCIDR rule it is allowed by that rule."""
    scenario = str(REPO / "scenarios" / "default-deny-infra.yaml")
    before = l7lab("explain", scenario, "--from", "office", "--to", "production/checkout:8080", "--step", "1", "--json")
    assert before.returncode == 0, before.stderr
    decision = json.loads(before.stdout)
    assert (decision["outcome"], decision["flow"]["source"], decision["egress"]) == ("dropped", "office", "n/a")
    after = l7lab("explain", scenario, "--from", "office", "--to", "production/checkout:8080")
    text = " ".join(after.stdout.split())
    assert after.returncode == 0 and "verdict: ALLOWED" in text, after.stderr
    assert "world host office (10.64.3.20)" in text and "cidr:10.0.0.0/8" in text
    assert "allow-from-company-network spec.ingress[0]" in text
    unknown = l7lab("explain", scenario, "--from", "nowhere", "--to", "production/checkout:8080")
    assert unknown.returncode == 1 and "world hosts: internet, kube-apiserver, metadata, office, otel-collector" in unknown.stderr


def test_validate_reports_every_error_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n"
                   "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 99999}]\n")
    out = l7lab("validate", str(bad), str(REPO / "scenarios" / "connectivity.yaml"))
    assert out.returncode == 1
    assert f"{bad}:7" in out.stderr and "port" in out.stderr
    assert "connectivity.yaml: valid" in out.stdout
    good = l7lab("validate", *map(str, sorted((REPO / "scenarios").glob("*.yaml"))))
    assert good.returncode == 0, good.stderr


def test_validate_notes_what_the_lab_enforces_differently() -> None:
    """IPv6 CIDRs are accepted with a notice (the lab is IPv4 only), in a policy file, in a
    scenario, and in --json; a file without such rules gets none."""
    policies = REPO / "scenarios" / "policies" / "cidr-ipv4-ipv6.yaml"
    out = l7lab("validate", str(policies), str(REPO / "scenarios" / "cidr-ipv4-ipv6.yaml"),
                str(REPO / "scenarios" / "policies" / "l7-redirect.yaml"))
    assert out.returncode == 0, out.stderr
    notices = [line for line in out.stdout.splitlines() if "notice:" in line]
    assert len(notices) == 4 and all("IPv6 CIDR" in n and "can never match" in n for n in notices), out.stdout
    assert sum("default deny for egress" in n for n in notices) == 2
    reply = json.loads(l7lab("validate", "--json", str(policies), str(REPO / "scenarios" / "policies" /
                                                                        "l7-redirect.yaml")).stdout)
    assert reply["valid"] and list(reply["notices"]) == [str(policies)] and len(reply["notices"][str(policies)]) == 2


def test_change_verbs_reject_bad_arguments_before_touching_a_lab(tmp_path: Path) -> None:
    out = l7lab("label", "service", "x", "a=b", "--lab", "nolab")
    assert out.returncode == 1 and "expected 'pod' or 'namespace'" in out.stderr
    out = l7lab("label", "namespace", "shop", "a", "--lab", "nolab")
    assert out.returncode == 1 and "expected KEY=VALUE or KEY- (to remove), got 'a'" in out.stderr
    out = l7lab("delete", "service", "x", "--lab", "nolab")
    assert out.returncode == 1 and "unknown policy kind 'service'" in out.stderr
    out = l7lab("apply", str(tmp_path / "missing.yaml"), "--lab", "nolab")
    assert out.returncode == 1 and "missing.yaml: cannot read" in out.stderr
    policy = tmp_path / "p.yaml"
    policy.write_text("kind: NetworkPolicy\n")
    out = l7lab("apply", str(policy), "--lab", "nolab")
    assert out.returncode == 1 and "no lab named 'nolab' is up" in out.stderr
    out = l7lab("observe", "nolab")
    assert out.returncode == 1 and "no lab named 'nolab' is up" in out.stderr


def test_explain_a_dns_query() -> None:
    scenario = str(REPO / "scenarios" / "dns-policy.yaml")
    out = l7lab("explain", scenario, "--from", "mediabot", "--to", "kube-dns", "--dns", "www.example.org", "--step", "1", "--json")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["outcome"] == "refused"
    assert any("matches no DNS rule (tried: matchPattern *.example.com)" in line for line in decision["trace"])
    text = " ".join(l7lab("explain", scenario, "--from", "mediabot", "--to", "kube-dns", "--dns", "www.example.com").stdout.split())
    assert text.startswith("verdict: ALLOWED") and "DNS query www.example.com matches DNS rule matchPattern *.example.com" in text
    both = l7lab("explain", scenario, "--from", "mediabot", "--to", "kube-dns", "--dns", "x.example.com", "--http", "GET /")
    assert both.returncode == 1 and "exclude each other" in both.stderr


def test_errors_come_out_verbatim_and_unwrapped(tmp_path: Path) -> None:
    """Brackets, regex classes and :emoji: codes in an error are the user's text: printed as is,
    one line per error however narrow the terminal."""
    bad = tmp_path / "markup.yaml"
    bad.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n"
                   "spec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - toPorts:\n"
                   "    - ports: [{port: '80', protocol: TCP}]\n      rules:\n        http: [{path: '[a-z0-9]+('}]\n"
                   "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q, namespace: default}\n"
                   "spec:\n  podSelector: {matchLabels: {'a/b/c:x:': v}}\n")
    out = subprocess.run([*L7LAB, "validate", str(bad)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "40", "TERM": "xterm-256color"})
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines == [
        f"error: {bad}:10: CiliumNetworkPolicy default/p: spec.ingress[0].toPorts[0].rules.http[0].path: "
        "invalid RE2 regex '[a-z0-9]+(': missing ): [a-z0-9]+(",
        f"error: {bad}:16: NetworkPolicy default/q: spec.podSelector.matchLabels.a/b/c:x:: invalid label key "
        "'a/b/c:x:': expected [prefix/]name"], out.stderr


def test_a_file_a_scenario_points_at_is_named_not_quoted(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-value\nsecond line of it\n")
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\nnamespaces: [{name: a}]\npods:\n- {name: p, namespace: a, ports: [{port: 80}]}\n"
                        f"policies:\n- file: {secret}\nsteps:\n- probes: [{{from: a/p, to: a/p:80, expect: allowed}}]\n")
    for verb in (["validate"], ["run", "--dry-run"]):
        out = l7lab(*verb, str(scenario))
        assert out.returncode == 1
        assert f"{secret}:1: expected a policy manifest (a mapping with apiVersion and kind), got a plain value" in out.stderr
        assert "s3cret" not in out.stdout + out.stderr and "second line" not in out.stdout + out.stderr


def test_validate_rejects_an_empty_file_as_run_does(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        validated, ran = l7lab("validate", str(empty)), l7lab("run", "--dry-run", str(empty))
        assert validated.returncode == ran.returncode == 1
        assert f"error: {empty}: expected exactly one YAML document, found 0" in validated.stderr
        assert validated.stderr == ran.stderr and "valid" not in validated.stdout


def test_explain_refuses_a_request_the_proxy_answers_400() -> None:
    from l7.http import HttpError  # noqa: PLC0415
    from proxy.http import parse_request  # noqa: PLC0415

    scenario = str(REPO / "scenarios" / "protect-inventory-api.yaml")
    base = ["explain", scenario, "--from", "frontend-app", "--to", "inventory-api:8080", "--http", "GET /api/inventory/1"]
    for header in ("Bad Name: x", "X-Ok(1): x", "X-Tab\t: x", ": x", "X-Ctl: a\x01b"):
        name, _, value = header.partition(":")
        head = f"GET /api/inventory/1 HTTP/1.1\r\nHost: inventory-api\r\n{name}:{value}\r\n\r\n".encode()
        with pytest.raises(HttpError) as proxy_answer:
            parse_request(head)
        assert proxy_answer.value.status == 400
        out = l7lab(*base, "--header", header)
        assert out.returncode == 1, (header, out.stdout)
        assert f"error: --header {header!r}:" in out.stderr and "400 Bad Request" in out.stderr, out.stderr
        assert "ALLOWED" not in out.stdout
    # A header the proxy accepts is checked against the policy as before.
    parse_request(b"GET /api/inventory/1 HTTP/1.1\r\nHost: inventory-api\r\nX-Good_Name!: x\r\n\r\n")
    out = l7lab(*base, "--header", "X-Good_Name!: x")
    assert out.returncode == 0 and "verdict: ALLOWED" in out.stdout, out.stderr
    out = l7lab(*base[:-1], "G(ET /api/inventory/1")
    assert out.returncode == 1 and "the method 'G(ET' is not an HTTP token" in out.stderr


def test_readme_starts_as_root_without_sudo_and_names_the_command() -> None:
    readme = (REPO / "README.md").read_text()
    intro, rest = readme.split("```sh\n", 1)
    first = rest.split("```", 1)[0]
    assert "as root" in intro or "root shell" in intro
    assert "sudo" not in first and ".venv/bin" in first
    commands = [line.split("#")[0].split() for line in first.splitlines() if line.strip()]
    assert [c[0] for c in commands[:2]] == ["scripts/demo.sh", "scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert os.access(REPO / script, os.X_OK)
    assert 'l7lab = "dataplane.cli:main"' in (REPO / "pyproject.toml").read_text()
    for script in (REPO / "scripts").glob("*.sh"):
        assert not [line for line in script.read_text().splitlines() if line.startswith("#") and "sudo " in line], script
    # Every down/clean the README shows names a lab or says --all.
    for line in readme.splitlines():
        if line.startswith(("l7lab down", "l7lab clean")):
            assert "LAB" in line or "--all" in line, line


def test_explain_prints_the_request_and_the_rules_verbatim() -> None:
    out = l7lab("explain", str(REPO / "scenarios" / "protect-inventory-api.yaml"), "--from", "frontend-app",
                "--to", "inventory-api:8080", "--http", "DELETE /api/inventory/:x:[bold]")
    assert out.returncode == 0, out.stderr
    assert ("the proxy rejects DELETE /api/inventory/:x:[bold]: character(s) '[]' not allowed in a path (400)"
            in out.stdout.splitlines()[-1])
    assert "[CiliumNetworkPolicy shop/protect-inventory-api spec.ingress[0]]" in out.stdout
    out = l7lab("explain", str(REPO / "scenarios" / "protect-inventory-api.yaml"), "--from", "frontend-app",
                "--to", "inventory-api:8080", "--http", "DELETE /api/inventory/:x:")
    assert "DELETE /api/inventory/:x: matches no HTTP rule" in out.stdout


def test_each_group_registers_its_own_verbs_in_the_order_help_lists_them() -> None:
    import argparse  # noqa: PLC0415

    from dataplane import cli  # noqa: PLC0415
    from dataplane.cli.common import Verbs  # noqa: PLC0415

    def verbs_of(group: object) -> list[str]:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        group.register(Verbs(sub))  # type: ignore[attr-defined]
        return list(sub.choices)

    groups = {g.__name__.rsplit(".", 1)[1]: verbs_of(g) for g in cli.GROUPS}
    assert groups == {"lifecycle": ["up", "down", "clean", "status", "exec"], "run": ["run"],
                      "observe": ["observe", "monitor"], "changes": ["apply", "delete", "label", "audit"],
                      "check": ["validate", "explain"], "exercise": ["check"], "trace": ["trace"],
                      "inspect": ["policy", "identity", "fqdn"], "ui": ["ui"]}
    listed = re.findall(r"^    (\w+) ", l7lab("--help").stdout, re.M)
    assert listed == [verb for verbs in groups.values() for verb in verbs]
    for verbs in groups.values():  # every verb runs its own command and answers --json where it did
        for verb in verbs:
            args = cli.build_parser().parse_args([verb, *{"up": ["s"], "run": ["s"], "exec": ["p"],
                                                          "apply": ["f"], "delete": ["k", "n"],
                                                          "label": ["pod", "p", "k=v"], "audit": ["on"], "validate": ["f"],
                                                          "explain": ["s", "--from", "a", "--to", "b"],
                                                          "check": ["e"],
                                                          "trace": ["--from", "a", "--to", "b"],
                                                          "policy": ["get"], "identity": ["list"],
                                                          "fqdn": ["cache"]}.get(verb, [])])
            assert args.func.__name__ == f"cmd_{verb}" and hasattr(args, "json") == (verb != "exec")


def test_up_hands_the_engine_it_validated_with_to_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policies are parsed and resolved once: the engine `up` validates with is the one the
    agent enforces with (it forks with it)."""
    from dataplane import agent, cli, policy  # noqa: PLC0415
    from dataplane import lab as labmod  # noqa: PLC0415

    built: list[object] = []

    class CountingEngine(policy.PolicyEngine):
        def __init__(self, scenario: object) -> None:
            super().__init__(scenario)  # type: ignore[arg-type]
            built.append(self)

    handed: list[object] = []

    def start(engine: object, name: str, metrics: object = None) -> dict[str, object]:
        handed.append(engine)
        return {"lab": name, "endpoints": 0, "node": "n", "agent": 1, "metrics": None}

    monkeypatch.setattr(policy, "PolicyEngine", CountingEngine)
    monkeypatch.setattr(agent, "start", start)
    monkeypatch.setattr(labmod, "check_environment", lambda: None)
    path = REPO / "scenarios" / "protect-inventory-api.yaml"
    assert cli.main(["up", "--json", "--name", "handed", str(path)]) == cli.EXIT_OK
    assert len(built) == 1 and handed == built
    assert handed[0].scenario.path == str(path) and handed[0].policies  # type: ignore[attr-defined]
