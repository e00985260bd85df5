"""Every walkthrough is listed in docs/walkthroughs/README.md, runs a scenario that exists at the
top of scenarios/ (so tests/kernel/test_scenarios.py runs it too), brings its labs up under names
no other walkthrough uses, and takes each of them down at its end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dataplane import walkthrough as wt
from tests.conftest import REPO

HERE = REPO / "docs" / "walkthroughs"
WALKTHROUGHS = sorted(p for p in HERE.glob("*.md") if p.name != "README.md")
INDEX = HERE / "README.md"


def index_links() -> list[str]:
    return re.findall(r"\]\(([^)#]+\.md)\)", INDEX.read_text())


def test_there_are_walkthroughs_and_an_index() -> None:
    assert WALKTHROUGHS and INDEX.is_file()


def test_the_index_lists_every_walkthrough_and_nothing_else() -> None:
    links = index_links()
    assert sorted(links) == sorted(p.name for p in WALKTHROUGHS)
    assert len(set(links)) == len(links)


def test_the_index_says_how_to_regenerate_and_check() -> None:
    text = INDEX.read_text()
    assert "scripts/walkthroughs.py regenerate docs/walkthroughs/*.md" in text
    assert "scripts/walkthroughs.py check" in text


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=[p.stem for p in WALKTHROUGHS])
def test_a_walkthrough_runs_scenarios_that_exist(path: Path) -> None:
    named = {s for c in wt.load(path).commands for s in wt.scenarios_named(c)}
    assert named, f"{path.name} names no scenario"
    for scenario in named:
        assert (REPO / scenario).is_file(), f"{path.name}: {scenario} does not exist"
        assert (REPO / scenario).parent == REPO / "scenarios", f"{path.name}: {scenario} is not run by CI"


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=[p.stem for p in WALKTHROUGHS])
def test_a_walkthrough_takes_down_every_lab_it_brings_up(path: Path) -> None:
    from dataplane.walkthroughrun import lab_names  # noqa: PLC0415 - reads the scenarios' names

    walkthrough = wt.load(path)
    names = lab_names(walkthrough)
    assert names, f"{path.name} brings no lab up"
    last_down = {c.text.split()[2] for c in walkthrough.commands if c.text.startswith("l7lab down ")}
    assert set(names) <= last_down
    assert walkthrough.commands[-1].text.startswith("l7lab down ")


def test_walkthroughs_use_labs_of_their_own() -> None:
    from dataplane.walkthroughrun import lab_names  # noqa: PLC0415

    seen: dict[str, str] = {}
    for path in WALKTHROUGHS:
        for name in lab_names(wt.load(path)):
            assert name not in seen, f"{path.name} and {seen[name]} both bring up lab {name}"
            seen[name] = path.name


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=[p.stem for p in WALKTHROUGHS])
def test_the_prose_cites_code_lines_the_output_shows(path: Path) -> None:
    """After `regenerate`, a citation the trace no longer points at must be updated by hand."""
    assert wt.stale_code_citations(wt.load(path)) == []


def test_a_citation_the_output_does_not_show_is_stale(tmp_path: Path) -> None:
    text = ("Step 1 (`from_container.c:76`, `:77`) and `lib/policy.h:27`.\n\n"
            "```\n$ l7lab trace demo --from a --to b\n"
            "  1. [kernel] hook\n       at tc ingress x; code dataplane/bpf/from_container.c:76 run\n"
            "  2. [kernel] parse\n       at tc ingress x; code dataplane/bpf/from_container.c:78 run\n```\n")
    path = tmp_path / "w.md"
    path.write_text(text)
    assert wt.stale_code_citations(wt.load(path)) == ["from_container.c:77", "lib/policy.h:27"]
