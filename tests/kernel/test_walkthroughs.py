"""The walkthroughs (docs/walkthroughs/*.md) still print what they say they print: each one is run
on a real lab with `scripts/walkthroughs.py check`, as its author regenerates it. And the check
itself: it fails with a diff when output differs, takes down the labs a failing walkthrough left
up, and never runs over a lab of the same name that was already up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataplane import lab as labmod
from dataplane.timescale import scaled
from tests.conftest import REPO, unique_lab
from tests.support.cli_lab import l7lab

WALKTHROUGHS = sorted(p for p in (REPO / "docs" / "walkthroughs").glob("*.md") if p.name != "README.md")


def walkthroughs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/walkthroughs.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=scaled(900))


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=[p.stem for p in WALKTHROUGHS])
def test_walkthrough_prints_what_it_records(path: Path) -> None:
    done = walkthroughs("check", str(path.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{path.relative_to(REPO)}: match"), done.stdout


def test_check_fails_with_a_diff_and_takes_down_what_a_failing_walkthrough_left_up(tmp_path: Path) -> None:
    name = unique_lab("wk")
    doc = tmp_path / "broken.md"
    doc.write_text(f"""# A walkthrough that went wrong

```console
$ l7lab up scenarios/allow-get-products.yaml --name {name} | cut -d: -f1
lab {name} is up
$ l7lab explain scenarios/allow-get-products.yaml --from inventory-api --to backend-app:80 | head -1
verdict: ALLOWED
$ false
```
""")
    up = l7lab("up", "scenarios/allow-get-products.yaml", "--name", name)  # somebody's lab of that name
    try:
        assert up.returncode == 0, up.stderr
        in_the_way = walkthroughs("check", str(doc))
        assert in_the_way.returncode == 1, in_the_way.stdout
        assert f"lab {name} is already up" in in_the_way.stdout
        assert name in labmod.running_labs()  # the check left it alone
    finally:
        assert l7lab("down", name).returncode == 0

    done = walkthroughs("check", str(doc))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "-verdict: ALLOWED\n+verdict: DROPPED\n" in done.stdout
    assert "+[exit 1]\n" in done.stdout
    assert f"left lab {name} up (taken down now)" in done.stdout
    assert name not in labmod.running_labs()
    assert "verdict: ALLOWED" in doc.read_text()  # check never writes
