"""YAML loading that remembers where every value came from.

`load_documents` parses one file (possibly multi-document) into plain Python data and keeps,
for every field path, the line it was written on, so that validation errors can point at the
exact line. Duplicate keys are an error (PyYAML silently keeps the last one).

Input is bounded (`dataplane.limits`): a file is measured before it is read whole, and the
data is built from the parser's events one at a time, without recursion, stopping at the first
value past a bound (nesting, values, collection entries, scalar length, documents). YAML
anchors and aliases are refused, since one alias can stand for a whole subtree ("billion
laughs"). PyYAML's own composer would recurse per nesting level and expand every alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from . import limits
from .errors import SourceError, SourceLocation

PathKey = tuple[str | int, ...]


_DEPTH_MESSAGE = f"lists and mappings nest deeper than {limits.MAX_DEPTH} levels (the limit is {limits.MAX_DEPTH})"

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


class _Limit(Exception):
    """Raised inside the builder; turned into a SourceError with the file name."""

    def __init__(self, line: int, path: PathKey, message: str) -> None:
        super().__init__(message)
        self.line, self.path, self.message = line, path, message


@dataclass
class Budget:
    """Values still allowed: one file, or a scenario and every policy file it names together."""

    nodes: int = field(default_factory=lambda: limits.MAX_NODES)
    what: str = "one file"


# libyaml's parser when PyYAML was built with it (ten times faster); the same events either way.
_EVENT_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "timestamp")}
_MAPPING_TAGS = (None, "!", "tag:yaml.org,2002:map")
_SEQUENCE_TAGS = (None, "!", "tag:yaml.org,2002:seq")
_KEY = object()  # a mapping frame waiting for its next key


class _Frame:
    """An open list or mapping while its events arrive."""

    __slots__ = ("value", "path", "key", "key_line")

    def __init__(self, value: list | dict, path: PathKey) -> None:
        self.value = value
        self.path = path
        self.key: Any = _KEY
        self.key_line = 0


def _scalar(event: yaml.ScalarEvent, line: int, path: PathKey) -> Any:
    """A scalar resolved as PyYAML's safe loader does (int, float, bool, null, timestamp, str)."""
    if len(event.value) > limits.MAX_SCALAR_CHARS:
        raise _Limit(line, path, f"a value of {len(event.value)} characters is longer than the limit of "
                                 f"{limits.MAX_SCALAR_CHARS} characters")
    tag = event.tag
    if tag is None or tag == "!":
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag not in _SCALAR_TAGS:
        raise _Limit(line, path, f"YAML tag {tag!r} is not supported (value {event.value[:80]!r})")
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
    try:
        return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise _Limit(line, path, f"invalid {tag.rsplit(':', 1)[-1]} value {event.value[:80]!r}: {problem}") from None


def _build(events: Iterator[yaml.Event], budget: Budget) -> list[tuple[Any, dict[PathKey, int]]]:
    """Documents as (data, lines) from a stream of parser events, without recursion.

    Every bound is checked as the event arrives, so a hostile input stops at the first value
    past a bound: nesting, values, entries of one collection, scalar length, documents; an
    alias or anchor stops it at once (aliases are how a few hundred bytes stand for billions
    of values).
    """
    docs: list[tuple[Any, dict[PathKey, int]]] = []
    stack: list[_Frame] = []
    lines: dict[PathKey, int] = {}
    root: Any = None
    for event in events:
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.DocumentStartEvent):
            if len(docs) >= limits.MAX_DOCUMENTS:
                raise _Limit(line, (), f"more than {limits.MAX_DOCUMENTS} YAML documents in one file "
                                       f"(the limit is {limits.MAX_DOCUMENTS})")
            stack, lines, root = [], {}, None
            continue
        if isinstance(event, yaml.DocumentEndEvent):
            docs.append((root, lines))
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            stack.pop()
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue  # stream start/end
        top = stack[-1] if stack else None
        path: PathKey = top.path if top is not None else ()
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            if top is not None and not (isinstance(top.value, dict) and top.key is _KEY):
                path = path + ((len(top.value),) if isinstance(top.value, list) else (str(top.key),))
            raise _Limit(line, path, "YAML anchors and aliases (&name, *name) are not supported: "
                                     "write the value out in full")
        budget.nodes -= 1
        if budget.nodes < 0:
            raise _Limit(line, path, f"more than {limits.MAX_NODES} values in {budget.what} "
                                     f"(the limit is {limits.MAX_NODES})")
        if isinstance(top, _Frame) and isinstance(top.value, dict) and top.key is _KEY:
            # A mapping key: a scalar, not a duplicate, not a merge (<<).
            if not isinstance(event, yaml.ScalarEvent):
                raise _Limit(line, path, "mapping keys must be scalars")
            if event.tag is None and event.implicit[0] and event.value == "<<":
                raise _Limit(line, path, "YAML merge keys (<<) are not supported")
            key = _scalar(event, line, path)
            if key in top.value:
                raise _Limit(line, path + (str(key),), f"duplicate key {key!r}")
            if len(top.value) >= limits.MAX_COLLECTION_ITEMS:
                raise _Limit(line, path, f"more than {limits.MAX_COLLECTION_ITEMS} entries in one mapping "
                                         f"(the limit is {limits.MAX_COLLECTION_ITEMS})")
            top.key, top.key_line = key, line
            continue
        if top is not None:
            if isinstance(top.value, list):
                if len(top.value) >= limits.MAX_COLLECTION_ITEMS:
                    raise _Limit(line, path, f"more than {limits.MAX_COLLECTION_ITEMS} items in one list "
                                             f"(the limit is {limits.MAX_COLLECTION_ITEMS})")
                path = path + (len(top.value),)
            else:
                path = path + (str(top.key),)
        if isinstance(event, yaml.ScalarEvent):
            value: Any = _scalar(event, line, path)
        else:
            if len(stack) >= limits.MAX_DEPTH:
                raise _Limit(line, path, _DEPTH_MESSAGE)
            mapping = isinstance(event, yaml.MappingStartEvent)
            if event.tag not in (_MAPPING_TAGS if mapping else _SEQUENCE_TAGS):
                raise _Limit(line, path, f"YAML tag {event.tag!r} is not supported")
            value = {} if mapping else []
        lines[path] = line
        if top is None:
            root = value
        elif isinstance(top.value, list):
            top.value.append(value)
        else:
            top.value[top.key] = value
            lines[path] = top.key_line  # a field's line is its key's
            top.key = _KEY
        if not isinstance(event, yaml.ScalarEvent):
            stack.append(_Frame(value, path))
    return docs


def load_documents(text: str, source: str, budget: Budget | None = None) -> list[Document]:
    """Parse every document of `text`, within the bounds of `dataplane.limits`.

    `budget` is shared when several files make up one input (a scenario and its policy files);
    by default `text` has a budget of its own.
    """
    _check_size(len(text) if len(text) > limits.MAX_FILE_BYTES else len(text.encode("utf-8", "surrogatepass")), source)
    events = yaml.parse(text, Loader=_EVENT_LOADER)
    try:
        built = _build(events, budget or Budget())
    except _Limit as exc:
        raise SourceError(SourceLocation(source, exc.line, _short_path(exc.path)), exc.message) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        if "maximum nesting depth" in problem:
            # libyaml 0.2.5 and later (Debian's python3-yaml) stop at 1000 levels in their scanner,
            # which reads ahead of the events checked above: the same input, the same error.
            raise SourceError(SourceLocation(source, line), _DEPTH_MESSAGE) from None
        raise SourceError(SourceLocation(source, line), f"invalid YAML: {problem}{_quote_hint(text, line)}") from None
    finally:
        events.close()  # frees the parser at once, also when a bound stopped it midway
    return [Document(data, source, lines) for data, lines in built]


def _short_path(path: PathKey) -> str:
    """A field path short enough to read: a path nested past the depth bound is cut."""
    if len(path) <= 12:
        return format_path(path)
    return f"{format_path(path[:8])}...({len(path)} levels)"


def _check_size(size: int, source: str) -> None:
    if size > limits.MAX_FILE_BYTES:
        raise SourceError(SourceLocation(source), f"file is larger than the limit of {limits.MAX_FILE_BYTES} bytes "
                                                  f"({limits.MAX_FILE_BYTES // (1024 * 1024)} MiB)")


def read_source(path: str | Path) -> str:
    """The text of a file, read only up to the size limit: a huge file is refused, not read."""
    try:
        with open(path, "rb") as f:
            data = f.read(limits.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SourceError(SourceLocation(str(path)), f"cannot read file: {exc.strerror}") from None
    _check_size(len(data), str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SourceError(SourceLocation(str(path), line), "file is not UTF-8 text") from None


def load_file(path: str | Path, budget: Budget | None = None) -> list[Document]:
    return load_documents(read_source(path), str(path), budget)


# Quote marks a word processor or a web page puts where YAML wants ASCII ' or ".
TYPOGRAPHIC_QUOTES = "\u201c\u201d\u201e\u201f\u2018\u2019\u201a\u201b\u00ab\u00bb\u2039\u203a\u2033\u2032\uff02\uff07"


def _quote_hint(text: str, line: int) -> str:
    """A YAML error after a line holding a typographic quote is most often that quote's doing
    ('port: "80\u201d' opens an ASCII quote that a typographic one never closes): name it."""
    for number, content in enumerate(text.splitlines()[:line or None], 1):
        mark = next((c for c in content if c in TYPOGRAPHIC_QUOTES), None)
        if mark is not None:
            return (f" (line {number} has a typographic quote {mark}: YAML quotes a value with ASCII "
                    f"\" or ' only: {content.strip()[:80]})")
    return ""

