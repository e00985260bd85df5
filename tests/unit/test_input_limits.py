"""Hostile and oversized input is refused quickly, with a bounded amount of memory, and with an
error naming the file, the field and the bound: alias bombs, deep nesting (flow and block),
huge files, many documents, too many pods, rules, ports or probes, oversized regexes.

Each refusal is measured in a fresh child process (its own CPU time and peak memory, compared
with the same process before the call, or with a run on a tiny valid file for the CLI), so the
figures are clean. The child runs under an address-space limit and a timeout: without the
bounds, an alias bomb or a huge file fails the test instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dataplane import limits
from dataplane.errors import ErrorList, SourceError
from dataplane.policy import validate_policy_file
from dataplane.scenario import LIST_BOUNDS, load_scenario, schema
from dataplane.timescale import scaled
from dataplane.yamlsource import load_documents
from tests.conftest import REPO
from tests.support.attacks import ALIAS_BOMB, DEEP_BLOCK, DEEP_FLOW

CPU_SECONDS = 1.0  # refused within a CPU second on an ordinary machine (scaled to this one)
MEMORY_GROWTH_KB = 64 * 1024  # far below the gigabytes the unbounded parser took
CHILD_ADDRESS_SPACE = 2 * 1024 ** 3  # an unbounded parse dies here instead of swapping the machine
CHILD_TIMEOUT = 60  # an ordinary machine's seconds, scaled where used

SCENARIO_HEAD = "name: limits\nnamespaces: [{name: shop}]\npods:\n  - {name: web, namespace: shop, ports: [{port: 80}]}\n"
POLICY_HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  endpointSelector: {}
"""

# The child: load one file the way a command does and report what happened and what it cost.
_CHILD = r"""
import json, resource, sys, time
from dataplane.errors import ErrorList, SourceError
from dataplane.policy import PolicyEngine, validate_policy_file
from dataplane.scenario import load_scenario
kind, path = sys.argv[1], sys.argv[2]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before, cpu, wall = rss(), time.process_time(), time.monotonic()
try:
    if kind == "scenario":
        PolicyEngine(load_scenario(path))
        errors = []
    else:
        errors = [str(e) for e in validate_policy_file(path)]
except (SourceError, ErrorList) as exc:
    errors = [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])]
print(json.dumps({"errors": errors, "cpu": time.process_time() - cpu, "wall": time.monotonic() - wall,
                  "growth_kb": rss() - before}))
"""


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def measure(kind: str, path: Path) -> dict[str, Any]:
    """Load `path` as a scenario or policy file in a fresh process: errors, CPU seconds, memory growth."""
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path)], capture_output=True, text=True,
                         timeout=scaled(CHILD_TIMEOUT), preexec_fn=_limit_child, env=child_env(), cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def assert_refused(kind: str, path: Path, *fragments: str) -> str:
    """`path` is refused: one error naming the file and every fragment, within the CPU and memory bounds."""
    got = measure(kind, path)
    assert got["errors"], f"{path} was accepted"
    error = got["errors"][0]
    assert error.startswith(str(path)), error
    for fragment in fragments:
        assert fragment in error, error
    assert got["cpu"] < scaled(CPU_SECONDS), got
    assert got["growth_kb"] < MEMORY_GROWTH_KB, got
    return error


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- YAML itself


def test_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path) -> None:
    assert 300 <= len(ALIAS_BOMB) <= 400
    for kind in ("scenario", "policy"):
        error = assert_refused(kind, write(tmp_path, f"{kind}.yaml", ALIAS_BOMB), ":1: a: ", "anchors and aliases")
        assert "not supported" in error


def test_one_alias_anywhere_is_refused_with_its_field(tmp_path: Path) -> None:
    text = SCENARIO_HEAD + "  - {name: api, namespace: shop, labels: &l {app: api}}\n  - {name: db, namespace: shop, labels: *l}\n"
    assert_refused("scenario", write(tmp_path, "s.yaml", text), ":5: pods[1].labels: ", "anchors and aliases")


@pytest.mark.parametrize("text", [DEEP_FLOW, DEEP_BLOCK], ids=["flow", "block"])
def test_deep_nesting_is_refused_without_recursion(tmp_path: Path, text: str) -> None:
    for kind in ("scenario", "policy"):
        assert_refused(kind, write(tmp_path, f"{kind}.yaml", text), f"nest deeper than {limits.MAX_DEPTH} levels",
                       "[0][0][0]", f"({limits.MAX_DEPTH} levels)")


def test_deep_block_mappings_are_refused(tmp_path: Path) -> None:
    text = "".join(" " * i + "a:\n" for i in range(2_000)) + " " * 2_000 + "x\n"  # about 2 MB
    assert_refused("policy", write(tmp_path, "p.yaml", text), f":{limits.MAX_DEPTH + 1}: a.a.a.a", "nest deeper")


def test_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # 790,000 pods (about 20 MB): the shape that ran for minutes.
    pods = tmp_path / "pods.yaml"
    with pods.open("w") as f:
        f.write("name: many\npods:\n")
        for i in range(790_000):
            f.write(f"  - {{name: p{i}}}\n")
    assert pods.stat().st_size > limits.MAX_FILE_BYTES
    for kind in ("scenario", "policy"):
        assert_refused(kind, pods, f"larger than the limit of {limits.MAX_FILE_BYTES} bytes")
    # A 64 GiB sparse file: refused without reading it (the memory bound proves it).
    sparse = tmp_path / "sparse.yaml"
    with sparse.open("wb") as f:
        f.truncate(64 * 1024 ** 3)
    assert_refused("policy", sparse, "larger than the limit")


def test_many_documents_are_refused(tmp_path: Path) -> None:
    text = "---\n{}\n" * (limits.MAX_DOCUMENTS + 5_000)
    assert_refused("policy", write(tmp_path, "p.yaml", text), f":{limits.MAX_DOCUMENTS * 2 + 1}:",
                   f"more than {limits.MAX_DOCUMENTS} YAML documents")


def test_too_many_values_are_refused(tmp_path: Path) -> None:
    # Lists under the per-list bound, but together more values than one file may hold.
    row = "[" + ",".join(["1"] * 1_000) + "]"
    text = "name: x\npods: [" + ",".join([row] * 200) + "]\n"
    assert len(text) < limits.MAX_FILE_BYTES
    assert_refused("scenario", write(tmp_path, "s.yaml", text), f"more than {limits.MAX_NODES} values")


def test_long_lists_and_mappings_are_refused(tmp_path: Path) -> None:
    text = "name: x\npods: [" + ",".join(["{name: a}"] * (limits.MAX_COLLECTION_ITEMS + 1)) + "]\n"
    assert_refused("scenario", write(tmp_path, "s.yaml", text), ":2: pods: ",
                   f"more than {limits.MAX_COLLECTION_ITEMS} items in one list")
    labels = "{" + ",".join(f"k{i}: v" for i in range(limits.MAX_COLLECTION_ITEMS + 1)) + "}"
    text = POLICY_HEAD.replace("endpointSelector: {}", f"endpointSelector: {{matchLabels: {labels}}}")
    assert_refused("policy", write(tmp_path, "p.yaml", text), ":5: spec.endpointSelector.matchLabels: ",
                   f"more than {limits.MAX_COLLECTION_ITEMS} entries in one mapping")


def test_huge_scalars_tags_and_numbers_are_refused(tmp_path: Path) -> None:
    text = SCENARIO_HEAD.replace("name: limits", "name: limits\ndescription: " + "x" * (limits.MAX_SCALAR_CHARS + 1))
    assert_refused("scenario", write(tmp_path, "s.yaml", text), ":2: description: ", f"limit of {limits.MAX_SCALAR_CHARS} characters")
    text = SCENARIO_HEAD + "settings: {probeTimeout: " + "9" * 60_000 + "}\n"
    assert_refused("scenario", write(tmp_path, "n.yaml", text), "settings.probeTimeout: invalid int value")
    text = SCENARIO_HEAD + "description: !!python/object/apply:os.system [true]\n"
    assert_refused("scenario", write(tmp_path, "t.yaml", text), ":5: description: ", "is not supported")


# ---------------------------------------------------------------------------- scenarios


def test_more_pods_than_the_limit(tmp_path: Path) -> None:
    pods = ",".join(f"{{name: p{i}}}" for i in range(limits.MAX_PODS + 1))
    path = write(tmp_path, "s.yaml", f"name: many\nsettings: {{podCIDR: 10.200.0.0/16}}\npods: [{pods}]\n")
    assert_refused("scenario", path, f":3: pods: {limits.MAX_PODS + 1} pods, more than the limit of {limits.MAX_PODS}")


@pytest.mark.parametrize("field, line, what, bound, text", [
    ("namespaces", 2, "namespaces", limits.MAX_NAMESPACES,
     "namespaces: [" + ",".join(f"{{name: n{i}}}" for i in range(limits.MAX_NAMESPACES + 1)) + "]\n"),
    ("world", 5, "world hosts", limits.MAX_WORLD_HOSTS,
     "world: [" + ",".join(f"{{name: w{i}, address: 203.0.113.1}}" for i in range(limits.MAX_WORLD_HOSTS + 1)) + "]\n"),
    ("pods[1].ports", 5, "ports", limits.MAX_DECLARED_PORTS,
     "  - {name: api, namespace: shop, ports: [" + ",".join(f"{{port: {1000 + i}}}" for i in range(limits.MAX_DECLARED_PORTS + 1)) + "]}\n"),
    ("steps", 5, "steps", limits.MAX_STEPS, "steps: [" + ",".join(["{probes: []}"] * (limits.MAX_STEPS + 1)) + "]\n"),
    ("steps[0].probes", 5, "probes", limits.MAX_PROBES,
     "steps: [{probes: [" + ",".join(["{from: web, to: web, expect: allowed}"] * (limits.MAX_PROBES + 1)) + "]}]\n"),
    ("policies", 5, "policies", limits.MAX_POLICIES,
     "policies: [" + ",".join(["{file: p.yaml}"] * (limits.MAX_POLICIES + 1)) + "]\n"),
])
def test_scenario_lists_over_their_limit(tmp_path: Path, field: str, line: int, what: str, bound: int, text: str) -> None:
    full = "name: limits\n" + text + "pods: [{name: web}]\n" if field == "namespaces" else SCENARIO_HEAD + text
    path = write(tmp_path, "s.yaml", full)
    assert_refused("scenario", path, f":{line}: {field}: {bound + 1} {what}, more than the limit of {bound}")


def test_policy_files_count_together_in_a_scenario(tmp_path: Path) -> None:
    # Each file alone is within bounds; the scenario's shared bound on values is not.
    rule = "{fromEndpoints: [{matchLabels: {app: web}}]}"  # 8 values
    for name in ("a", "b", "c"):
        write(tmp_path, f"{name}.yaml", POLICY_HEAD.replace("name: p,", f"name: {name},")
              + "  ingress: [" + ",".join([rule] * 5_000) + "]\n")
    text = SCENARIO_HEAD + "policies: [{file: a.yaml}, {file: b.yaml}, {file: c.yaml}]\n"
    assert_refused("scenario", write(tmp_path, "s.yaml", text), f"more than {limits.MAX_NODES} values in a scenario and the policy files it names")


def test_every_step_apply_counts_toward_the_policy_limit(tmp_path: Path) -> None:
    docs = "".join(POLICY_HEAD.replace("name: p,", f"name: p{i},") + "---\n" for i in range(600))
    write(tmp_path, "many.yaml", docs)
    text = SCENARIO_HEAD + "policies: [{file: many.yaml}]\nsteps:\n  - apply: [{file: many.yaml}]\n"
    assert_refused("scenario", write(tmp_path, "s.yaml", text), ":7: steps[0].apply[0]: ",
                   f"more than {limits.MAX_POLICIES} policies in one scenario")


# ---------------------------------------------------------------------------- policies


def policy(tmp_path: Path, body: str) -> Path:
    return write(tmp_path, "p.yaml", POLICY_HEAD + body)


def test_too_many_rules(tmp_path: Path) -> None:
    path = policy(tmp_path, "  ingress: [" + ",".join(["{}"] * (limits.MAX_RULES + 1)) + "]\n")
    assert_refused("policy", path, ":6: CiliumNetworkPolicy shop/p: spec.ingress: ",
                   f"{limits.MAX_RULES + 1} rules, more than the limit of {limits.MAX_RULES}")


def test_too_many_ports_peers_and_port_rules(tmp_path: Path) -> None:
    ports = ",".join(f"{{port: '{80 + i}'}}" for i in range(limits.MAX_PORTS_PER_PORT_RULE + 1))
    path = policy(tmp_path, f"  ingress:\n    - toPorts: [{{ports: [{ports}]}}]\n")
    assert_refused("policy", path, ":7: CiliumNetworkPolicy shop/p: spec.ingress[0].toPorts[0].ports: ",
                   f"more than the limit of {limits.MAX_PORTS_PER_PORT_RULE}")
    peers = ",".join(["{}"] * (limits.MAX_PEERS + 1))
    path = policy(tmp_path, f"  egress:\n    - toEndpoints: [{peers}]\n")
    assert_refused("policy", path, "spec.egress[0].toEndpoints: ", f"more than the limit of {limits.MAX_PEERS}")
    port_rules = ",".join(["{ports: [{port: '80'}]}"] * (limits.MAX_PORT_RULES + 1))
    path = policy(tmp_path, f"  ingress:\n    - toPorts: [{port_rules}]\n")
    assert_refused("policy", path, "spec.ingress[0].toPorts: ", f"more than the limit of {limits.MAX_PORT_RULES}")
    k8s = ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  podSelector: {}\n"
           "  ingress:\n    - from: [" + ",".join(["{podSelector: {}}"] * (limits.MAX_PEERS + 1)) + "]\n")
    assert_refused("policy", write(tmp_path, "k.yaml", k8s), ":7: NetworkPolicy default/n: spec.ingress[0].from: ",
                   f"more than the limit of {limits.MAX_PEERS}")


def l7(tmp_path: Path, rules: str) -> Path:
    return policy(tmp_path, "  ingress:\n    - toPorts:\n        - ports: [{port: '80', protocol: TCP}]\n"
                            f"          rules: {rules}\n")


def test_too_many_l7_rules_and_headers(tmp_path: Path) -> None:
    http = ",".join(f"{{path: /p{i}}}" for i in range(limits.MAX_L7_RULES + 1))
    assert_refused("policy", l7(tmp_path, f"{{http: [{http}]}}"), ":9: ", "rules.http: ",
                   f"more than the limit of {limits.MAX_L7_RULES}")
    headers = ",".join(f"X-H{i}" for i in range(limits.MAX_HEADERS + 1))
    assert_refused("policy", l7(tmp_path, f"{{http: [{{headers: [{headers}]}}]}}"), "rules.http[0].headers: ",
                   f"more than the limit of {limits.MAX_HEADERS}")


def test_oversized_regexes_are_refused(tmp_path: Path) -> None:
    long_path = "/" + "a" * limits.MAX_REGEX_CHARS
    assert_refused("policy", l7(tmp_path, f"{{http: [{{path: '{long_path}'}}]}}"), ":9: ", "rules.http[0].path: ",
                   f"longer than the limit of {limits.MAX_REGEX_CHARS} characters")
    assert_refused("policy", l7(tmp_path, "{http: [{host: '[a-z]{1,1000}'}]}"), "rules.http[0].host: ",
                   f"exceeds the limit of {limits.MAX_REGEX_PROGRAM_SIZE} instructions")
    assert_refused("policy", l7(tmp_path, "{http: [{method: '\\pL{1000}'}]}"), "rules.http[0].method: ", "too large")


def test_oversized_dns_patterns_and_header_values_are_refused(tmp_path: Path) -> None:
    pattern = "*." + "a" * limits.MAX_DNS_NAME_CHARS + ".com"
    path = policy(tmp_path, f"  egress:\n    - toFQDNs: [{{matchPattern: '{pattern}'}}]\n")
    assert_refused("policy", path, "spec.egress[0].toFQDNs[0].matchPattern: ", f"limit of {limits.MAX_DNS_NAME_CHARS} characters")
    value = "v" * (limits.MAX_HEADER_VALUE_CHARS + 1)
    assert_refused("policy", l7(tmp_path, f"{{http: [{{headerMatches: [{{name: X-Token, value: {value}}}]}}]}}"),
                   "rules.http[0].headerMatches[0].value: ", f"limit of {limits.MAX_HEADER_VALUE_CHARS} characters")
    assert_refused("policy", l7(tmp_path, f"{{http: [{{headers: ['X-Token: {value}']}}]}}"),
                   "rules.http[0].headers[0]: ", f"limit of {limits.MAX_HEADER_VALUE_CHARS} characters")


def test_too_many_policies_at_once(tmp_path: Path) -> None:
    items = ",".join(f"{{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {{name: p{i}}}, spec: {{endpointSelector: {{}}}}}}"
                     for i in range(limits.MAX_POLICIES + 1))
    path = write(tmp_path, "l.yaml", f"apiVersion: v1\nkind: List\nitems: [{items}]\n")
    assert_refused("policy", path, f"more than {limits.MAX_POLICIES} policies at once")


# ---------------------------------------------------------------------------- real input still fits


def test_a_large_real_policy_and_lab_are_accepted(tmp_path: Path) -> None:
    """The bounds leave room: 3,000 rules with HTTP rules, 5,000 plain rules, a lab of 1,024 pods."""
    rules = "".join(f"    - fromEndpoints: [{{matchLabels: {{app: c{i}}}}}]\n"
                    f"      toPorts: [{{ports: [{{port: '{1000 + i % 5000}', protocol: TCP}}], rules: {{http: [{{method: GET, path: '/api/v{i}/.*'}}]}}}}]\n"
                    for i in range(3_000))
    path = policy(tmp_path, "  ingress:\n" + rules)
    assert validate_policy_file(path) == []
    plain = ",".join(f"{{fromCIDR: [10.{i // 256}.{i % 256}.0/24], toPorts: [{{ports: [{{port: '80'}}]}}]}}"
                     for i in range(limits.MAX_RULES))
    assert validate_policy_file(policy(tmp_path, f"  ingress: [{plain}]\n")) == []
    pods = ",".join(f"{{name: p{i}, labels: {{app: a{i % 7}}}, ports: [{{port: 8080}}]}}" for i in range(limits.MAX_PODS))
    sc = load_scenario(write(tmp_path, "s.yaml", f"name: big\nsettings: {{podCIDR: 10.200.0.0/16}}\npods: [{pods}]\n"))
    assert len(sc.pods) == limits.MAX_PODS


def test_shipped_scenarios_and_policies_are_within_every_limit() -> None:
    for path in sorted((REPO / "scenarios").glob("*.yaml")):
        load_scenario(path)
    for path in sorted((REPO / "scenarios" / "policies").glob("*.yaml")):
        assert validate_policy_file(path) == []


def test_schema_carries_the_same_list_bounds() -> None:
    """The published schema's maxItems/maxProperties are the bounds l7lab enforces."""
    defs = schema()["$defs"]

    def node(pattern: tuple[str, ...]) -> dict[str, Any]:
        at: dict[str, Any] = schema()
        for part in pattern:
            at = at["items"] if part == "*" else at["properties"][part]
            while "$ref" in at:
                at = defs[at["$ref"].rsplit("/", 1)[-1]]
        return at

    for pattern, bound, _ in LIST_BOUNDS:
        at = node(pattern)
        assert at.get("maxItems", at.get("maxProperties")) == bound, pattern
    jsonschema.Draft202012Validator.check_schema(schema())


def test_library_errors_name_file_line_and_field() -> None:
    with pytest.raises(SourceError) as exc:
        load_documents(ALIAS_BOMB, "bomb.yaml")
    assert str(exc.value) == "bomb.yaml:1: a: YAML anchors and aliases (&name, *name) are not supported: write the value out in full"
    with pytest.raises(SourceError) as exc:
        load_documents("x: {<<: {a: 1}}\n", "m.yaml")
    assert str(exc.value) == "m.yaml:1: x: YAML merge keys (<<) are not supported"
    with pytest.raises((SourceError, ErrorList)):
        load_documents("a: [[b]: c]\n", "k.yaml")


# ---------------------------------------------------------------------------- the CLI


def cli_cost(*args: str) -> tuple[int, str, float, int]:
    """(exit code, stderr, CPU seconds, peak memory KB) of `l7lab ARGS` run in a fresh child."""
    code = r"""
import json, os, resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "dataplane.cli", *sys.argv[1:]], capture_output=True, text=True,
                      stdin=subprocess.DEVNULL)
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout,
                  "cpu": use.ru_utime + use.ru_stime, "maxrss": use.ru_maxrss}))
"""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                         env=child_env(), timeout=scaled(CHILD_TIMEOUT), preexec_fn=_limit_child)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    return got["code"], got["stderr"] + got["stdout"], got["cpu"], got["maxrss"]


@pytest.fixture(scope="module")
def cli_baseline() -> tuple[float, int]:
    """CPU seconds and peak memory of the CLI validating a tiny valid scenario."""
    code, text, cpu, rss = cli_cost("validate", str(REPO / "scenarios" / "connectivity.yaml"))
    assert code == 0, text
    return cpu, rss


HOSTILE = {
    "alias-bomb": (ALIAS_BOMB, "anchors and aliases"),
    "deep-flow": (DEEP_FLOW, "nest deeper than"),
    "deep-block": (DEEP_BLOCK, "nest deeper than"),
    "many-pods": ("name: many\npods: [" + ",".join(f"{{name: p{i}}}" for i in range(5_000)) + "]\n",
                  f"5000 pods, more than the limit of {limits.MAX_PODS}"),
    "many-documents": ("---\n{}\n" * 20_000, "YAML documents"),
}


VERBS = {"validate": ("validate",), "run": ("run", "--dry-run"), "apply": ("apply",)}


# `apply` takes policies: a scenario with too many pods is no policy (the lab refuses its kind).
@pytest.mark.parametrize("verb, case", [(v, c) for v in VERBS for c in sorted(HOSTILE) if (v, c) != ("apply", "many-pods")])
def test_cli_refuses_hostile_input_quickly(tmp_path: Path, cli_baseline: tuple[float, int], verb: str, case: str) -> None:
    text, fragment = HOSTILE[case]
    path = write(tmp_path, f"{case}.yaml", text)
    code, out, cpu, rss = cli_cost(*VERBS[verb], str(path))
    assert code == 1, out
    assert f"error: {path}:" in out and fragment in out, out
    assert "Traceback" not in out, out
    base_cpu, base_rss = cli_baseline
    assert cpu - base_cpu < scaled(CPU_SECONDS), (cpu, base_cpu)
    assert rss - base_rss < MEMORY_GROWTH_KB, (rss, base_rss)


@pytest.mark.parametrize("verb", [("validate",), ("run", "--dry-run"), ("apply",)], ids=["validate", "run", "apply"])
def test_cli_refuses_a_huge_file_without_reading_it(tmp_path: Path, cli_baseline: tuple[float, int], verb: tuple[str, ...]) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(64 * 1024 ** 3)
    code, out, cpu, rss = cli_cost(*verb, str(path))
    assert code == 1, out
    assert f"error: {path}: file is larger than the limit of {limits.MAX_FILE_BYTES} bytes" in out, out
    assert cpu - cli_baseline[0] < scaled(CPU_SECONDS)
    assert rss - cli_baseline[1] < MEMORY_GROWTH_KB


def test_apply_bounds_all_its_files_together(tmp_path: Path) -> None:
    """Files each within bounds, together over the bound of one change: refused before any lab is asked."""
    rule = "{fromEndpoints: [{matchLabels: {app: web}}]}"
    paths = []
    for name in ("a", "b", "c"):
        paths.append(str(write(tmp_path, f"{name}.yaml", POLICY_HEAD.replace("name: p,", f"name: {name},")
                               + "  ingress: [" + ",".join([rule] * 5_000) + "]\n")))
    code, out, _, _ = cli_cost("apply", *paths, "--lab", "no-such-lab")
    assert code == 1, out
    assert f"more than {limits.MAX_NODES} values in one change" in out, out


# ---------------------------------------------------------------------------- what policies resolve to


def every_pod_to_every_port(pods: int, rules: int) -> str:
    """A few kilobytes: `pods` pods with distinct labels, one policy letting every pod reach every
    pod on `rules` ports (entries: pods x pods x ports x three protocols)."""
    ingress = ",".join(f"{{fromEndpoints: [{{}}], toPorts: [{{ports: [{{port: '{1000 + i}'}}]}}]}}" for i in range(rules))
    return ("name: wide\nsettings: {podCIDR: 10.200.0.0/16}\npods: ["
            + ",".join(f"{{name: p{i}, labels: {{app: a{i}}}}}" for i in range(pods)) + "]\n"
            + "policies:\n  - {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: wide}, "
            + f"spec: {{endpointSelector: {{}}, ingress: [{ingress}]}}}}\n")


def test_policies_resolving_past_the_policy_map_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "s.yaml", every_pod_to_every_port(300, 300))  # 81 million entries
    assert path.stat().st_size < 64 * 1024
    assert_refused("scenario", path, ":5: policies[0].spec.ingress[",
                   f"more than {limits.MAX_POLICY_ENTRIES} policy map entries")


def test_a_wide_policy_within_the_map_resolves_quickly(tmp_path: Path) -> None:
    """20 pods x 20 peers x 20 ports x 3 protocols = 24,000 entries: this took 34 s while
    precedence was pushed down by comparing every entry with every other."""
    got = measure("scenario", write(tmp_path, "s.yaml", every_pod_to_every_port(20, 20)))
    assert got["errors"] == []
    assert got["cpu"] < scaled(CPU_SECONDS), got


def _normalize_reference(policy: dict) -> dict:
    """The definition, entry against entry (quadratic): what normalize_entries must compute."""
    from dataplane.mapstate import PolicyEntry  # noqa: PLC0415

    out = {}
    for key, entry in policy.items():
        best = entry
        for other_key, other in policy.items():
            if other_key is key or other.verdict <= best.verdict:
                continue
            if (other_key.endpoint_id, other_key.direction, other_key.identity, other_key.protocol) != (
                    key.endpoint_id, key.direction, key.identity, key.protocol):
                continue
            if other_key.port_prefix <= key.port_prefix and other_key.covers_port(key.port):
                best = PolicyEntry(other.verdict, other.proxy_port, tuple(sorted(set(entry.rule_ids) | set(other.rule_ids))))
        out[key] = best
    return out


def test_normalize_entries_matches_its_definition() -> None:
    import random  # noqa: PLC0415

    from dataplane.mapstate import PolicyEntry, PolicyKey, normalize_entries, port_range_blocks
    from dataplane.abi import Direction, PROXY_PORT, Verdict

    rng = random.Random(8)
    for _ in range(200):
        policy: dict = {}
        for _ in range(rng.randint(1, 60)):
            lo = rng.choice([0, 1, 80, 443, 1024, 8080, rng.randint(1, 65535)])
            hi = rng.choice([lo, min(65535, lo + rng.randint(0, 5000)), 65535])
            verdict = rng.choice([Verdict.ALLOW, Verdict.REDIRECT, Verdict.DENY])
            for port, prefix in port_range_blocks(lo, hi)[:8]:
                key = PolicyKey(rng.randint(1, 2), rng.choice(list(Direction)), rng.choice([0, 256, 257]),
                                rng.choice([0, 6, 17]) if prefix else rng.choice([0, 6]), port if prefix else 0, prefix)
                policy[key] = PolicyEntry(verdict, PROXY_PORT if verdict == Verdict.REDIRECT else 0, (rng.randint(1, 9),))
        assert normalize_entries(policy) == _normalize_reference(policy)


def test_apply_bounds_the_bytes_of_all_its_files_together(tmp_path: Path) -> None:
    comment = ("#" * 99 + "\n") * (limits.MAX_CHANGE_BYTES // 100 // 2 + 100)  # a little over half the bound each
    paths = [str(write(tmp_path, f"{name}.yaml", comment)) for name in ("a", "b")]
    code, out, _, _ = cli_cost("apply", *paths, "--lab", "no-such-lab")
    assert code == 1, out
    assert f"error: {paths[1]}: the files of one apply together exceed the limit of {limits.MAX_CHANGE_BYTES} bytes" in out, out


def test_libyamls_own_nesting_limit_reads_as_the_labs(monkeypatch: pytest.MonkeyPatch) -> None:
    """libyaml 0.2.5 and later stop at 1000 levels in a scanner that reads ahead of the events
    the depth bound checks; where that error comes first, it is the same error as the bound's."""
    import yaml  # noqa: PLC0415
    from yaml.error import Mark  # noqa: PLC0415

    def scanner_stops(*_args: Any, **_kwargs: Any) -> Any:  # an event stream, as yaml.parse's
        yield from ()
        raise yaml.scanner.ScannerError(problem="exceeded maximum nesting depth", problem_mark=Mark("x", 0, 0, 1001, None, None))

    monkeypatch.setattr(yaml, "parse", scanner_stops)
    with pytest.raises(SourceError) as refused:
        load_documents("[" * 5000, "deep.yaml")
    assert str(refused.value) == f"deep.yaml:1: lists and mappings nest deeper than {limits.MAX_DEPTH} levels (the limit is {limits.MAX_DEPTH})"
