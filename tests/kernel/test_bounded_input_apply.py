"""Hostile YAML against a real lab: `apply` and the lab's agent refuse alias bombs and deep
nesting at once, the agent keeps answering and applying good changes, and `up` of a hostile
scenario fails before anything of the lab is built."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dataplane import agent
from dataplane.timescale import scaled
from tests.conftest import unique_lab
from tests.support.cli_lab import AUDITOR_POLICY, agent_status, l7lab
from tests.support.cli_lab import leftovers, nothing_left
from tests.support.attacks import ALIAS_BOMB, DEEP_BLOCK, DEEP_FLOW

pytestmark = pytest.mark.kernel

# Refused within a second on an ordinary machine; a loaded two-core machine gets more for a
# process start, but nowhere near the minutes (or the memory) an unbounded parse takes. The
# bounds are an ordinary machine's seconds, scaled to this one (an emulated machine is many
# times slower at everything, the refusal included).
CLI_SECONDS = 10.0
AGENT_SECONDS = 2.0
AGENT_GROWTH_KB = 64 * 1024


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_apply_refuses_hostile_yaml_and_the_agent_keeps_working(retail: str, tmp_path: Path) -> None:
    pid = agent_status(retail)["agent"]["pid"]
    peak_before = peak_rss_kb(pid)

    # Through the CLI: refused before the lab is asked.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    started = time.monotonic()
    out = l7lab("apply", str(bomb), "--lab", retail, timeout=60)
    assert time.monotonic() - started < scaled(CLI_SECONDS)
    assert out.returncode == 1, out
    assert f"{bomb}:1: a: YAML anchors and aliases (&name, *name) are not supported" in out.stderr, out.stderr

    # Straight to the agent, as a client that skips the CLI's own check would send it.
    for name, text, fragment in (("bomb.yaml", ALIAS_BOMB, "anchors and aliases"),
                                 ("flow.yaml", DEEP_FLOW, "nest deeper than"),
                                 ("block.yaml", DEEP_BLOCK, "nest deeper than")):
        started = time.monotonic()
        reply = agent.request(retail, {"op": "change", "apply": [{"path": name, "text": text}]}, timeout=30)
        assert time.monotonic() - started < scaled(AGENT_SECONDS), name
        assert reply["ok"] is False, reply
        assert any(e.startswith(f"{name}:1: ") and fragment in e for e in reply["errors"]), reply
    # Values split over several files share one budget: each file alone is within bounds.
    piece = "".join(f"k{i}: [{', '.join(['0'] * 8000)}]\n" for i in range(5))
    files = [{"path": f"part{i}.yaml", "text": piece} for i in range(3)]
    reply = agent.request(retail, {"op": "change", "apply": files}, timeout=30)
    assert reply["ok"] is False, reply
    assert any(e.startswith("part2.yaml:") and "values in one change" in e for e in reply["errors"]), reply
    assert peak_rss_kb(pid) - peak_before < AGENT_GROWTH_KB

    # The agent still answers and still applies a good change.
    assert agent_status(retail)["agent"]["running"]
    good = tmp_path / "auditors.yaml"
    good.write_text(AUDITOR_POLICY)
    out = l7lab("apply", str(good), "--lab", retail)
    assert out.returncode == 0, out.stderr
    assert "CiliumNetworkPolicy retail/auditors-read" in agent_status(retail)["agent"]["policies"]


@pytest.mark.parametrize("case", ["alias-bomb", "deep-flow", "many-pods", "hostile-policy-file"])
def test_up_of_a_hostile_scenario_builds_nothing(tmp_path: Path, case: str) -> None:
    name = unique_lab("hy")
    if case == "alias-bomb":
        text, fragment = ALIAS_BOMB, "anchors and aliases"
    elif case == "deep-flow":
        text, fragment = DEEP_FLOW, "nest deeper than"
    elif case == "many-pods":
        text, fragment = ("name: many\npods: [" + ",".join(f"{{name: p{i}}}" for i in range(5_000)) + "]\n",
                          "5000 pods, more than the limit of 1024")
    else:
        (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
        text, fragment = "name: x\npods: [{name: web}]\npolicies: [{file: bomb.yaml}]\n", "cannot load policy file"
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    try:
        started = time.monotonic()
        out = l7lab("up", str(path), "--name", name, timeout=60)
        assert time.monotonic() - started < scaled(CLI_SECONDS)
        assert out.returncode == 1, out
        assert f"error: {path}:" in out.stderr and fragment in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert not any(leftovers(name).values()), leftovers(name)
    finally:
        if any(leftovers(name).values()):
            l7lab("down", name)
        assert nothing_left(name), leftovers(name)
