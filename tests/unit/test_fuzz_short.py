"""The short fuzzing run of CI: each target of `fuzz/targets.py` for a few seconds.

* every seed and every input fuzzing once found (`tests/unit/fuzz_corpus/<target>/`) is replayed
  through the target's harness and oracle in this process;
* then atheris mutates from those seeds for a few seconds per target in a subprocess (coverage
  guided, an input taking over 5 s being a hang) and must end without a finding;
* the inputs of defects found and not fixed yet (`tests/unit/fuzz_corpus_xfail/<target>/`) must
  still fail: strict xfails, so a fix makes them pass and asks for them to be moved into
  `fuzz_corpus/` and their `KNOWN_DEFECTS` entry to be removed.

The long campaign (a million inputs per target) is `scripts/fuzz.sh`, outside CI.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.errors import ErrorList, SourceError
from dataplane.timescale import scaled
from fuzz import seeds, targets

ROOT = Path(__file__).resolve().parents[2]
XFAIL = Path(__file__).resolve().parent / "fuzz_corpus_xfail"
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
SECONDS = 4  # of an ordinary machine's fuzzing: scaled to this one


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_seeds_and_kept_findings_pass_the_oracle(target: str) -> None:
    harness = targets.TARGETS[target]
    inputs = seeds.seed_inputs(target)
    assert len(inputs) >= 10, f"{target}: the seed corpus is too small to mean anything"
    for data in inputs:
        try:
            harness(data)
        except Exception as exc:  # noqa: BLE001 - report which input, then fail
            pytest.fail(f"{target}: {type(exc).__name__}: {exc}\ninput: {data[:300]!r}")


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_short_coverage_guided_run_finds_nothing(target: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FUZZ_STRICT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", target, str(tmp_path / "corpus"), f"-max_total_time={math.ceil(scaled(SECONDS))}",
         f"-timeout={math.ceil(scaled(5))}", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=scaled(120))
    log = proc.stdout + proc.stderr
    findings = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert proc.returncode == 0 and not findings, f"{target}: fuzzing found {findings}\n{log[-4000:]}"
    executed = [line for line in log.splitlines() if line.startswith("stat::number_of_executed_units:")]
    assert executed and int(executed[-1].rsplit(":", 1)[1]) > 100, f"{target}: the run did not get going\n{log[-2000:]}"


def _known_defect_inputs() -> list:
    cases = []
    if not XFAIL.is_dir():
        return cases
    for folder in sorted(p for p in XFAIL.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            cases.append(pytest.param(folder.name, path, id=f"{folder.name}-{path.name}"))
    return cases


KNOWN_DEFECT_INPUTS = _known_defect_inputs()

if KNOWN_DEFECT_INPUTS:  # none while every defect found is fixed (an empty parameter set would skip)
    @pytest.mark.parametrize(("target", "path"), KNOWN_DEFECT_INPUTS)
    @pytest.mark.xfail(strict=True, raises=targets.KnownDefect,
                       reason="a defect a fuzz oracle found in proxy/http.py or proxy/stream.py, not fixed yet")
    def test_known_defect_still_fails(target: str, path: Path) -> None:
        targets.TARGETS[target](path.read_bytes())


def test_fixed_defects_are_kept_as_regressions() -> None:
    """The two proxy defects the oracles found are fixed; their inputs stay in the replayed corpus."""
    assert not KNOWN_DEFECT_INPUTS and not targets.KNOWN_DEFECTS
    for target, name in (("http_request", "connection-names-host"), ("chunked_body", "chunk-line-limit-split")):
        targets.TARGETS[target]((CORPUS / target / name).read_bytes())


@pytest.mark.parametrize("kind", ["[List]", "[CiliumNetworkPolicy]", "{NetworkPolicy: 1}"])
def test_a_policy_kind_that_is_not_text_is_a_clear_error(kind: str, tmp_path: Path) -> None:
    """Found by the policy_yaml target: a kind written as a list or a mapping crashed
    `l7lab validate` with a TypeError instead of naming the file, line and field."""
    from dataplane.policy import validate_policy_file  # noqa: PLC0415

    path = tmp_path / "policy.yaml"
    path.write_text(f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {{name: x}}\n")
    errors = validate_policy_file(path)
    assert [(e.location.file, e.location.line, e.location.path) for e in errors] == [(str(path), 2, "kind")]
    assert "expected kind NetworkPolicy" in errors[0].message


def test_unknown_fields_with_number_and_text_keys_are_a_clear_error() -> None:
    """Found by the policy_yaml target: a scenario mapping with unknown keys that are numbers and
    text crashed with a TypeError while naming the unknown field."""
    from dataplane.scenario import parse_scenario  # noqa: PLC0415
    from dataplane.yamlsource import load_documents  # noqa: PLC0415

    docs = load_documents("name: x\nsettings: {1: a, b: c}\n", "s.yaml")
    with pytest.raises((SourceError, ErrorList)) as caught:
        parse_scenario(docs[0], Path("s.yaml"))
    assert "s.yaml:2: settings.1: unknown field 1, 'b'" in str(caught.value)
