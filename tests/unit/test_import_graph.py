"""The layering of the packages, read from the source with `ast`.

The oracle (`dataplane.policy`) and the enforcer (`proxy`) meet only in the `l7` seam: no
module of `proxy/` imports the policy package, nothing in `dataplane/` imports `proxy`, and
`l7` imports neither of them (nor anything of `dataplane`). And no import cycle between
modules of the three packages. Every import counts: inside functions (they run) and under
`if TYPE_CHECKING:` (a module that needs another's types depends on it all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dataplane", "proxy", "l7")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _named_imports(name: str, path: Path, modules: dict[str, Path]):
    """(line, what the import names) for every import of `name`'s file: `import a.b` names
    `a.b`; `from a import b` names `a.b` when that is a module, else `a` (b is an attribute);
    relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
            continue
        if node.level:
            base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            yield node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for _, target in _named_imports(name, path, modules):
            # `import a.b.c` imports a module of ours if some prefix of it is one.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_the_imports_it_must_see() -> None:
    """The walk itself: known edges of each kind are found (relative, absolute, from-package,
    under TYPE_CHECKING), and a cycle is a cycle."""
    graph = import_graph()
    assert "dataplane.mapstate" in graph["dataplane.policy.resolver"]  # from ..mapstate import ...
    assert "dataplane.policy.api" in graph["dataplane.policy.resolver"]  # from .api import ...
    assert "l7.ruleset" in graph["dataplane.mapstate"]  # from l7.ruleset import ...
    assert "dataplane.limits" in graph["dataplane.policy.parse_cilium"]  # from .. import limits
    assert "l7.decide" in graph["dataplane.policy.engine"]
    assert "proxy.state" in graph["proxy.dns"]  # under TYPE_CHECKING there
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_oracle_and_proxy_meet_only_in_l7() -> None:
    wrong = []
    for module, targets in import_graph().items():
        for target in sorted(targets):
            if _in(module, "proxy") and _in(target, "dataplane.policy"):
                wrong.append(f"{module} imports the policy engine ({target})")
            if _in(module, "dataplane") and _in(target, "proxy"):
                wrong.append(f"{module} imports the proxy ({target})")
            if _in(module, "l7") and (_in(target, "dataplane") or _in(target, "proxy")):
                wrong.append(f"{module} (the neutral seam) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_import_of_our_packages_names_a_module_that_exists():
    """A module that moved leaves no import behind: one inside a function would fail only when
    that function runs (`from ..policy.l7 import ...` after the L7 rules moved to `l7`)."""
    modules = _modules()
    stale = sorted({f"{path.relative_to(ROOT)}:{line}: {target}"
                    for name, path in modules.items() for line, target in _named_imports(name, path, modules)
                    if target.split(".")[0] in PACKAGES and target not in modules})
    assert not stale, "imports of modules that do not exist:\n" + "\n".join(stale)
