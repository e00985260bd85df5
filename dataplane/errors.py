"""Error types shared by every layer.

`SourceError` is what bad input raises: it names the file, the line where known, the field path
and what was expected. `ErrorList` carries every error found in one pass so that a user sees all
of them at once. `SetupError` is for the environment (not root, no BCC, a lab that already
exists), as opposed to a failed expectation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLocation:
    """Where a value came from: file, 1-based line (0 when unknown) and dotted field path."""

    file: str
    line: int = 0
    path: str = ""

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
        if self.path:
            where += f": {self.path}"
        return where


class L7LabError(Exception):
    """Base class of every error l7lab raises on purpose."""


class SourceError(L7LabError):
    """Invalid input: names the file, line, field path and what was expected."""

    def __init__(self, location: SourceLocation, message: str, obj: str = "") -> None:
        self.location = location
        self.message = message
        self.obj = obj
        super().__init__(str(self))

    def __str__(self) -> str:
        loc = self.location
        where = loc.file + (f":{loc.line}" if loc.line else "")
        what = " ".join(x for x in (self.obj and f"{self.obj}:", loc.path and f"{loc.path}:") if x)
        return f"{where}: {what + ' ' if what else ''}{self.message}"


class ErrorList(L7LabError):
    """Several `SourceError`s found together; raised so that nothing is half-applied."""

    def __init__(self, errors: list[SourceError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    @classmethod
    def raise_if_any(cls, errors: list[SourceError]) -> None:
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise cls(errors)


class SetupError(L7LabError):
    """The environment cannot do what was asked (permissions, missing tools, name clashes)."""
