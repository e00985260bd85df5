"""The setup self-check's report and its probe source, without a kernel: one line per capability
naming what is missing, the minimum Linux and what the lab cannot do without it; the JSON for
machines; the exit code; the one compilation unit and what a simulated lack changes in it."""

from __future__ import annotations

import json
import re

import pytest

from dataplane import safety, selfcheck
from dataplane.selfcheck import CAPABILITIES, MISSING, OK, UNTESTED, Report, Result
from tests.conftest import REPO

RINGBUF = selfcheck.BY_NAME["ringbuf-maps"]
SK_ASSIGN = selfcheck.BY_NAME["sk-assign"]


def _report(statuses: dict[str, tuple[str, str]] | None = None, kernel: str = "6.1.0-18-amd64") -> Report:
    statuses = statuses or {}
    return Report(kernel=kernel, headers="/usr/src/linux-headers-6.1.0-18-amd64", seconds=0.5,
                  results=[Result(c, *statuses.get(c.name, (OK, ""))) for c in CAPABILITIES])


def test_capabilities_are_named_once_with_a_version_and_a_consequence() -> None:
    names = [c.name for c in CAPABILITIES]
    assert len(names) == len(set(names))
    for c in CAPABILITIES:
        assert re.fullmatch(r"\d+\.\d+", c.since), c.name
        assert c.title and c.needed_for, c.name
        assert c.maps or c.program or c.name in ("clsact", "test-run"), f"{c.name} asks the kernel nothing"
        for helper in c.helpers:
            assert f"{helper}(" in c.program, f"{c.name} lists {helper} but does not call it"


def test_what_the_lab_relies_on_is_listed() -> None:
    expected = {"tc-programs": "4.7", "clsact": "4.5", "hash-maps": "3.19", "percpu-hash-maps": "4.6",
                "lru-hash-maps": "4.10", "lpm-trie-maps": "4.11", "ringbuf-maps": "5.8", "sk-lookup": "4.20",
                "skc-lookup": "5.2", "sk-assign": "5.7", "test-run": "5.2"}
    assert {n: selfcheck.BY_NAME[n].since for n in expected} == expected
    assert selfcheck.minimum_kernel() == "5.8"


def test_a_capability_requires_only_capabilities_asked_before_it() -> None:
    seen: set[str] = set()
    for c in CAPABILITIES:
        assert set(c.requires) <= seen, c.name
        seen.add(c.name)


def test_an_ok_line_and_a_missing_line() -> None:
    assert selfcheck.format_result(Result(RINGBUF, OK)) == "ring buffer maps (Linux 5.8): ok"
    line = selfcheck.format_result(Result(RINGBUF, MISSING, "the kernel refused a ring buffer map: Invalid argument"),
                                   "5.4.0-150-generic")
    assert line == ("ring buffer maps (Linux 5.8): missing — flow events cannot be delivered "
                    "(the kernel refused a ring buffer map: Invalid argument)")


def test_a_kernel_new_enough_that_lacks_a_capability_is_told_why() -> None:
    line = selfcheck.format_result(Result(SK_ASSIGN, MISSING, "the verifier said: unknown func"), "6.8.0-31-generic")
    assert "bpf_sk_assign at tc ingress (Linux 5.7): missing — flows cannot be handed to the L7 proxy" in line
    assert "Linux 6.8.0-31-generic is new enough" in line
    assert "new enough" not in selfcheck.format_result(Result(SK_ASSIGN, MISSING, ""), "5.4.0")


def test_an_untested_line_says_what_it_waited_for() -> None:
    line = selfcheck.format_result(Result(SK_ASSIGN, UNTESTED, "needs socket lookup helpers"))
    assert line == "bpf_sk_assign at tc ingress (Linux 5.7): not tested — needs socket lookup helpers"


def test_the_text_report_has_one_line_per_capability_and_a_verdict() -> None:
    text = selfcheck.format_text(_report())
    lines = text.splitlines()
    assert "6.1.0-18-amd64" in lines[0] and "/usr/src/linux-headers-6.1.0-18-amd64" in lines[0]
    assert len(lines) == len(CAPABILITIES) + 2
    assert all(line.endswith(": ok") for line in lines[1:-1])
    assert lines[-1].startswith(f"self-check: all {len(CAPABILITIES)} capabilities present")


def test_the_text_report_of_a_missing_capability() -> None:
    report = _report({"ringbuf-maps": (MISSING, "the kernel refused a ring buffer map: Invalid argument")},
                     kernel="5.4.0-150-generic")
    assert not report.ok
    text = selfcheck.format_text(report)
    assert "  ring buffer maps (Linux 5.8): missing — flow events cannot be delivered" in text
    assert sum(": ok" in line for line in text.splitlines()) == len(CAPABILITIES) - 1
    assert text.splitlines()[-1] == (f"self-check: FAILED, 1 of {len(CAPABILITIES)} capabilities missing or not "
                                     "tested; the lab needs Linux 5.8 or newer with all of them")


def test_a_check_that_could_not_start_says_why() -> None:
    report = Report(kernel="6.1.0", error="not root: creating maps and loading BPF programs needs root",
                    results=[Result(c, UNTESTED, "not asked") for c in CAPABILITIES])
    assert not report.ok
    text = selfcheck.format_text(report)
    assert "cannot check: not root" in text
    assert ": not tested —" not in text  # one reason, not thirteen
    assert "FAILED" in text.splitlines()[-1]
    assert not Report(kernel="6.1.0").ok  # nothing asked is not a pass


def test_the_json_report() -> None:
    report = _report({"sk-assign": (MISSING, "the verifier said: unknown func bpf_sk_assign#124"),
                      "test-run": (UNTESTED, "needs tc BPF programs")})
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["ok"] is False and doc["error"] is None
    assert doc["kernel"] == "6.1.0-18-amd64" and doc["minimum_kernel"] == "5.8"
    assert [c["name"] for c in doc["capabilities"]] == [c.name for c in CAPABILITIES]
    by_name = {c["name"]: c for c in doc["capabilities"]}
    assert by_name["sk-assign"] == {"name": "sk-assign", "title": "bpf_sk_assign at tc ingress", "since": "5.7",
                                    "status": "missing", "needed_for": SK_ASSIGN.needed_for,
                                    "detail": "the verifier said: unknown func bpf_sk_assign#124"}
    assert by_name["test-run"]["status"] == "untested"
    assert {c["status"] for n, c in by_name.items() if n not in ("sk-assign", "test-run")} == {"ok"}
    assert json.loads(json.dumps(_report().to_json()))["ok"] is True


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("missing", [False, True])
def test_main_prints_the_report_and_exits_non_zero_when_something_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], as_json: bool, missing: bool) -> None:
    report = _report({"ringbuf-maps": (MISSING, "Invalid argument")} if missing else None)
    monkeypatch.setattr(selfcheck, "run", lambda: report)
    rc = selfcheck.main(["--json"] if as_json else [])
    out = capsys.readouterr().out
    assert rc == (1 if missing else 0)
    if as_json:
        assert json.loads(out)["ok"] is (not missing)
    else:
        assert ("ring buffer maps (Linux 5.8): missing" in out) is missing


def test_there_is_no_option_to_skip_or_fake_a_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        selfcheck.main(["--help"])
    assert set(re.findall(r"--[a-z-]+", capsys.readouterr().out)) == {"--help", "--json"}


def test_the_probe_source_holds_every_program_once() -> None:
    source = selfcheck.probe_source(list(CAPABILITIES))
    for c in CAPABILITIES:
        assert source.count(f"int {c.program_name}(") == (1 if c.program else 0)
    assert "#define" not in source
    assert "#include <linux/" not in source  # uapi headers only: the compile stays fast


def test_the_probe_source_leaves_out_the_maps_the_kernel_refused() -> None:
    source = selfcheck.probe_source([c for c in CAPABILITIES if c is not RINGBUF])
    assert "BPF_RINGBUF_OUTPUT" not in source and RINGBUF.program_name not in source
    assert "BPF_LPM_TRIE" in source


def test_a_simulated_lack_replaces_one_helper_in_one_program() -> None:
    source = selfcheck.probe_source(list(CAPABILITIES), simulate="sk-assign")
    define = "#define bpf_sk_assign ((__typeof__(bpf_sk_assign))0xffff)"
    assert source.count(define) == 1 and source.count("#undef bpf_sk_assign") == 1
    inside = source.split(define)[1].split("#undef bpf_sk_assign")[0]
    assert f"int {SK_ASSIGN.program_name}(" in inside and inside.count("int probe_") == 1


def test_only_map_kinds_and_helpers_can_be_simulated_missing() -> None:
    for name in ("ringbuf-maps", "sk-assign", "lpm-trie-maps", "tc-programs"):
        selfcheck.check_simulation(name)
    for name in ("clsact", "test-run", "no-such-thing"):
        with pytest.raises(ValueError, match="cannot simulate"):
            selfcheck.check_simulation(name)


def test_the_throwaway_namespace_is_a_valid_lab_shaped_name() -> None:
    names = {selfcheck.throwaway_netns() for _ in range(5)}
    assert len(names) == 5
    for ns in names:
        assert ns.startswith("l7lab-selfcheck-") and ns.endswith(".check")
        lab = safety.lab_of_netns(ns)
        assert lab is not None and safety.is_lab_name(lab)


def test_docs_list_every_capability_as_the_check_names_it() -> None:
    text = (REPO / "docs" / "datapath.md").read_text()
    section = text.split("## Kernel capabilities (the setup self-check)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    assert rows == [f"| {c.title} | {c.since} | {c.needed_for} |" for c in CAPABILITIES]
    assert "python -m dataplane.selfcheck" in section and f"Linux {selfcheck.minimum_kernel()} or newer" in section
    assert "python -m dataplane.selfcheck" in (REPO / "README.md").read_text()


def test_without_root_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selfcheck.os, "geteuid", lambda: 1000)
    report = selfcheck.run()
    assert not report.ok and report.error.startswith("not root")
    assert report.results == []
    assert "cannot check: not root" in selfcheck.format_text(report)


def test_the_first_line_says_which_headers_bcc_uses_or_that_there_are_none() -> None:
    assert "BCC uses the headers in /usr/src/linux-headers-6.1.0-18-amd64" in selfcheck.format_text(_report())
    bare = Report(kernel="6.1.0-18-amd64", error="no BCC")
    assert "no kernel headers at /lib/modules/6.1.0-18-amd64/build for BCC" in selfcheck.format_text(bare)
