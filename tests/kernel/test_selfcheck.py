"""The setup self-check on the real kernel: this kernel has every capability; a capability made
to fail for real (an id the kernel does not know in place of its map kind or helper) is named as
missing, with the exit code non-zero, while every other is still reported ok; and the throwaway
namespace of the attach check is gone afterwards, whatever happened in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import pytest

from dataplane import selfcheck, topology
from dataplane.selfcheck import CAPABILITIES, MISSING, OK
from tests.conftest import REPO

pytestmark = pytest.mark.kernel

NETNS_PREFIX = "l7lab-selfcheck-"


def _throwaway_namespaces() -> set[str]:
    return set(topology.list_netns(NETNS_PREFIX))


def test_this_kernel_has_every_capability_and_setup_sees_exit_0() -> None:
    """What scripts/setup.sh runs, as it runs it: `python -m dataplane.selfcheck`."""
    before = _throwaway_namespaces()
    proc = subprocess.run([sys.executable, "-m", "dataplane.selfcheck", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["error"] is None
    assert {c["name"]: c["status"] for c in doc["capabilities"]} == {c.name: "ok" for c in CAPABILITIES}
    assert _throwaway_namespaces() <= before


@pytest.mark.parametrize("name", ["ringbuf-maps", "sk-assign"])
def test_a_capability_the_kernel_refuses_is_named_and_fails_the_check(
        name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """ringbuf-maps: BPF_MAP_CREATE with a map type the kernel does not know; sk-assign: the probe
    program calls a helper id the kernel does not know, and the verifier refuses it."""
    before = _throwaway_namespaces()
    monkeypatch.setattr(selfcheck, "run", partial(selfcheck.run, _simulate_missing=name))
    assert selfcheck.main([]) == 1
    text = capsys.readouterr().out
    cap = selfcheck.BY_NAME[name]
    assert f"  {cap.title} (Linux {cap.since}): missing — {cap.needed_for} (" in text
    assert "Invalid argument" in text if name == "ringbuf-maps" else "invalid func unknown#" in text
    for other in CAPABILITIES:
        if other is not cap:
            assert f"  {other.title} (Linux {other.since}): ok" in text.splitlines()
    assert "self-check: FAILED, 1 of" in text

    assert selfcheck.main(["--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    statuses = {c["name"]: c["status"] for c in doc["capabilities"]}
    assert statuses == {c.name: (MISSING if c is cap else OK) for c in CAPABILITIES}
    assert _throwaway_namespaces() <= before


def test_the_throwaway_namespace_is_removed_when_the_attach_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _throwaway_namespaces()
    made: list[str] = []
    real_create = topology.create_netns

    def create(ns: str) -> None:
        made.append(ns)
        real_create(ns)

    def refuse(*_args: object, **_kwargs: object) -> None:
        assert made and topology.netns_exists(made[0])  # the attach really happens inside it
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(topology, "create_netns", create)
    monkeypatch.setattr(topology, "attach_tc", refuse)
    report = selfcheck.run()
    clsact = next(r for r in report.results if r.capability.name == "clsact")
    assert clsact.status == MISSING and "Operation not supported" in clsact.detail
    assert len(made) == 1 and made[0].startswith(NETNS_PREFIX)
    assert not topology.netns_exists(made[0])
    assert _throwaway_namespaces() <= before
