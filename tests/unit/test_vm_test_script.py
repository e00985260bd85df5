"""scripts/vm-test.sh refuses bad options before it builds or boots anything.

The VM run itself takes an hour under software emulation and is not part of the suite; what
the suite checks is that a mistyped option is named with what was expected, that nothing is
created for a run that was refused, and that the help text lists every option the parser takes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "vm-test.sh"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--accel", "hvf"], "--accel must be auto, kvm or tcg, got 'hvf'"),
        (["--cpus", "0"], "--cpus must be a positive number, got '0'"),
        (["--memory", "lots"], "--memory must be a size in MB"),
        (["--timeout", "-5"], "--timeout must be a number of minutes, got '-5'"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_bad_option_is_named_and_exits_3(args: list[str], named: str) -> None:
    result = run_script(*args)
    assert result.returncode == 3
    assert named in result.stderr


def test_results_directory_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    (tmp_path / "earlier-run.log").write_text("kept\n")
    result = run_script("--results", str(tmp_path), "--image-only")
    assert result.returncode == 3
    assert f"--results {tmp_path} is not an empty directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier-run.log"]


def test_help_lists_every_option_the_parser_takes() -> None:
    result = run_script("--help")
    assert result.returncode == 0
    parsed = set(re.findall(r"^\s+(--[a-z-]+)\)", SCRIPT.read_text(), re.MULTILINE))
    helped = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.MULTILINE))
    assert parsed - {"--help"} <= helped, f"options without help: {sorted(parsed - helped)}"
    assert "set -euo" not in result.stdout
