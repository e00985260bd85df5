"""YAML loading that remembers where every value came from.

`load_documents` parses one file (possibly multi-document) into plain Python data and keeps,
for every field path, the line it was written on, so that validation errors can point at the
exact line. Duplicate keys are an error (PyYAML silently keeps the last one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SourceError, SourceLocation

PathKey = tuple[str | int, ...]


def format_path(path: PathKey) -> str:
    """('pods', 2, 'ports', 0, 'port') -> 'pods[2].ports[0].port'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def describe_value(value: Any) -> str:
    """How a value is named in an error: "string 'x'", "number 3", "a list", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    return "a list" if isinstance(value, list) else "a mapping"


@dataclass
class Document:
    """One YAML document: its data, the file it came from and a line for every field path."""

    data: Any
    source: str
    lines: dict[PathKey, int] = field(default_factory=dict)
    base: PathKey = ()

    def line(self, path: PathKey) -> int:
        """Line of `path` (relative to this document), or of its closest known parent."""
        full = self.base + tuple(path)
        while full:
            if full in self.lines:
                return self.lines[full]
            full = full[:-1]
        return self.lines.get((), 0)

    def location(self, path: PathKey) -> SourceLocation:
        return SourceLocation(self.source, self.line(path), format_path(self.base + tuple(path)))

    def error(self, path: PathKey, message: str, obj: str = "") -> SourceError:
        return SourceError(self.location(path), message, obj)

    def sub(self, path: PathKey) -> "Document":
        """A view of a nested value that keeps reporting full paths and lines."""
        data = self.data
        for part in path:
            data = data[part]
        return Document(data, self.source, self.lines, self.base + tuple(path))


def _construct(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], source: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SourceError(SourceLocation(source, key_node.start_mark.line + 1, format_path(path)),
                                  "YAML merge keys (<<) are not supported")
            key = _construct(key_node, path + ("<key>",), {}, source)
            if isinstance(key, (dict, list)):
                raise SourceError(SourceLocation(source, key_node.start_mark.line + 1, format_path(path)),
                                  "mapping keys must be scalars")
            if key in out:
                raise SourceError(SourceLocation(source, key_node.start_mark.line + 1, format_path(path + (str(key),))),
                                  f"duplicate key {key!r}")
            out[key] = _construct(value_node, path + (str(key),), lines, source)
            lines[path + (str(key),)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), lines, source) for i, item in enumerate(node.value)]
    return _SCALARS.construct_object(node)  # safe resolution of int, float, bool, null, str


_SCALARS = yaml.SafeLoader("")


def load_documents(text: str, source: str) -> list[Document]:
    """Parse every document of `text`; empty documents are skipped."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        raise SourceError(SourceLocation(source, line), f"invalid YAML: {problem}") from None
    docs = []
    for node in nodes:
        if node is None:
            continue
        lines: dict[PathKey, int] = {}
        data = _construct(node, (), lines, source)
        docs.append(Document(data, source, lines))
    return docs


def load_file(path: str | Path) -> list[Document]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(SourceLocation(str(path)), f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SourceError(SourceLocation(str(path)), "file is not UTF-8 text") from None
    return load_documents(text, str(path))
