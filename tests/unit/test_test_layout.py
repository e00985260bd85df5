"""The tests' own layout: helpers live in one importable package, `tests.support`.

No test edits `sys.path` (a helper reached that way is loaded under a second name when someone
imports it properly), every test directory is a package (so each module has exactly one name),
and no tier imports another tier's modules: tests/unit never imports tests/kernel and vice
versa, nothing imports a test module, and benchmarks/ and fuzz/ reach test helpers only through
`tests.support`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

TESTS = REPO / "tests"
SHARED = ("tests.support", "tests.conftest")  # importable from anywhere


def python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (REPO / top).rglob("*.py") if "fuzz_corpus" not in p.parts)


def imported_modules(path: Path, package: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in the file, relative imports resolved."""
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            yield node.lineno, base
            for alias in node.names:  # `from tests.support import http` names a module too
                yield node.lineno, f"{base}.{alias.name}"


def sys_path_uses(path: Path) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def tier(dotted: str) -> str | None:
    """tests.unit / tests.kernel for a module of a tier, None for anything else."""
    parts = dotted.split(".")
    return ".".join(parts[:2]) if parts[0] == "tests" and len(parts) > 1 and parts[1] in ("unit", "kernel") else None


def test_no_test_edits_sys_path() -> None:
    found = {str(p.relative_to(REPO)): lines for p in python_files("tests", "benchmarks", "fuzz")
             if (lines := sys_path_uses(p))}
    assert found == {}


def test_every_test_directory_is_a_package() -> None:
    missing = [str(d.relative_to(REPO)) for d in [TESTS, *TESTS.rglob("*")]
               if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert missing == []


def test_helpers_are_imported_from_tests_support_only() -> None:
    top_level_helpers = {p.stem for p in TESTS.rglob("*.py")}  # `import _harness` style, via sys.path
    wrong: list[str] = []
    for path in python_files("tests", "benchmarks", "fuzz"):
        own = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
        for line, name in imported_modules(path):
            where = f"{path.relative_to(REPO)}:{line}: {name}"
            if name.split(".")[0] in top_level_helpers:
                wrong.append(f"{where} (a test module imported by bare name)")
            if name.startswith(SHARED) or not name.startswith("tests."):
                continue
            if any(part.startswith("test_") for part in name.split(".")):
                wrong.append(f"{where} (a test module; shared things belong in tests.support)")
            elif tier(name) is not None and tier(name) != tier(own):
                wrong.append(f"{where} (another tier)")
    assert wrong == []


def test_the_checks_see_what_they_forbid(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.path.insert(0, 'x')\nfrom .conftest import klab\n")
    assert sys_path_uses(bad) == [2]
    assert list(imported_modules(bad, "tests.kernel")) == [(1, "sys"), (3, "tests.kernel.conftest"),
                                                           (3, "tests.kernel.conftest.klab")]
    assert tier("tests.kernel.conftest") == "tests.kernel" and tier("tests.support.http") is None
