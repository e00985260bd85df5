"""Scenario files written for a test, and the errors loading one gives."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dataplane.errors import ErrorList, SourceError
from dataplane.scenario import load_scenario


def write_scenario(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    """`text` (dedented) as the file `name` in `tmp_path`."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def scenario_errors(path: Path) -> list[str]:
    """Every error loading the scenario at `path` reports; the test fails if it loads."""
    with pytest.raises((SourceError, ErrorList)) as info:
        load_scenario(path)
    exc = info.value
    return [str(e) for e in (exc.errors if isinstance(exc, ErrorList) else [exc])]
