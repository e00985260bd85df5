"""`l7lab policy get` and `l7lab identity list` on a lab brought up with `l7lab up`
(scenarios/retail.yaml): the policy map read back from the kernel names frontend-app's REDIRECT
to the inventory on TCP 8080 with the proxy port and the rule, as JSON and as text, and agrees
with the resolver's state; the identities carry their labels and endpoints; an entry deleted
from the kernel's map behind the agent's back (by bpf(2) on the agent's map, as bpftool would)
is reported, exit 3; a pod or lab that is not there is a setup error (1), a wrong action a usage
error (2)."""

from __future__ import annotations

import ctypes
import json

import pytest

from dataplane import abi
from dataplane.datapath import pack_policy
from dataplane.mapstate import PolicyEntry, PolicyKey
from tests.support import bpfmap
from tests.support.cli_lab import agent_status, l7lab

RULE = "CiliumNetworkPolicy retail/inventory-read-only ingress[0]"


def identities(lab: str) -> dict[str, dict]:
    out = l7lab("identity", "list", lab, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["lab"] == lab
    return {e: ident for ident in data["identities"] for e in ident["endpoints"]}


def inventory(lab: str) -> tuple[dict, int]:
    """policy get of retail/inventory-api as JSON: its one endpoint, and the exit code."""
    out = l7lab("policy", "get", lab, "retail/inventory-api", "--json")
    assert out.returncode in (0, 3), out.stderr
    data = json.loads(out.stdout)
    assert data["lab"] == lab and [ep["endpoint"] for ep in data["endpoints"]] == ["retail/inventory-api"]
    return data["endpoints"][0], out.returncode


def test_policy_get_reads_the_kernels_map(retail: str, monkeypatch: pytest.MonkeyPatch) -> None:
    by_pod = identities(retail)
    frontend = by_pod["retail/frontend-app"]
    assert "k8s:app=frontend-app" in frontend["labels"] and len(frontend["prefixes"]) == 1

    ep, code = inventory(retail)
    assert code == 0 and ep["differences"] == 0 and ep["ingress_enforced"] is True
    assert ep["identity"] == by_pod["retail/inventory-api"]["id"]
    (redirect,) = [r for r in ep["entries"] if r["identity"] == frontend["id"]]
    assert (redirect["direction"], redirect["ports"], redirect["verdict"], redirect["proxy_port"]) == \
        ("ingress", "8080/TCP", "redirect", abi.PROXY_PORT)
    assert [r["rule"] for r in redirect["rules"]] == [RULE] and redirect["check"] == "ok"
    assert redirect["identity_labels"] == frontend["labels"]

    monkeypatch.setenv("COLUMNS", "250")  # no cell wraps
    text = l7lab("policy", "get", retail, "inventory-api")
    assert text.returncode == 0, text.stderr
    line = next(line for line in text.stdout.splitlines() if "8080/TCP" in line)
    for word in ("ingress", str(frontend["id"]), "k8s:app=frontend-app", "redirect", str(abi.PROXY_PORT), RULE):
        assert word in line, text.stdout
    assert "CHECK" not in text.stdout and "holds exactly the resolver's intended state" in text.stdout

    every = l7lab("policy", "get", retail, "--json")
    assert every.returncode == 0, every.stderr
    assert {ep["endpoint"] for ep in json.loads(every.stdout)["endpoints"]} == set(by_pod)
    listing = l7lab("identity", "list", retail)
    assert listing.returncode == 0 and "reserved:host" in listing.stdout and "retail/frontend-app" in listing.stdout

    # Behind the agent's back: the REDIRECT entry goes from the kernel's map; policy get says so.
    pid = agent_status(retail)["agent"]["pid"]
    (map_id,) = bpfmap.map_ids(pid, bpfmap.BPF_MAP_TYPE_LPM_TRIE, ctypes.sizeof(abi.CPolicyKey),
                               ctypes.sizeof(abi.CPolicyValue))
    key, _ = pack_policy(PolicyKey(ep["endpoint_id"], abi.Direction.INGRESS, frontend["id"], abi.PROTO_TCP, 8080, 16),
                         PolicyEntry(abi.Verdict.REDIRECT))
    assert bpfmap.lookup(map_id, key, ctypes.sizeof(abi.CPolicyValue)) is not None  # the map is the agent's
    bpfmap.delete(map_id, key)
    ep, code = inventory(retail)
    assert code == 3 and ep["differences"] == 1
    (gone,) = [r for r in ep["entries"] if r["check"] != "ok"]
    assert gone["identity"] == frontend["id"] and gone["check"] == "missing in kernel"
    assert gone["kernel"] is None and gone["intended"]["verdict"] == "redirect"
    text = l7lab("policy", "get", retail, "retail/inventory-api")
    assert text.returncode == 3 and "CHECK" in text.stdout and "missing in kernel" in text.stdout
    assert "differs from the resolver's intended state: 1 difference" in text.stdout

    # Setup and usage errors (one lab serves both: bringing one up costs seconds).
    missing = l7lab("policy", "get", retail, "retail/nobody")
    assert missing.returncode == 1 and "no pod 'retail/nobody'" in missing.stderr
    assert l7lab("policy", "get", "no-such-lab", "retail/inventory-api").returncode == 1
    assert l7lab("policy", "list", retail).returncode == 2
    assert l7lab("identity", "list", "no-such-lab").returncode == 1
