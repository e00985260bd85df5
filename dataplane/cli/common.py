"""What every verb of the command line shares: exit codes, the usage error, the consoles and
how text reaches them, the subcommand registry each group adds its verbs to, and the few
look-ups several groups make (the one lab meant, the policy engine, the datapath).

Output is plain text: what is printed carries user input (names, patterns, file names) that
must come out verbatim, so errors go through a console with markup, emoji codes and highlighting
off, every message is printed as `rich.text.Text` (never parsed as markup), table cells are
`Text` too, and messages are never wrapped in the middle (a long command stays one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from .. import lab as labmod
from ..errors import ErrorList, L7LabError

if TYPE_CHECKING:
    from ..datapath import Datapath
    from ..policy.engine import PolicyEngine
    from ..scenario import Scenario

EXIT_OK, EXIT_SETUP, EXIT_USAGE, EXIT_EXPECTATION = 0, 1, 2, 3

# Wide enough for the probe table when output goes to a file or a CI log.
_width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
# Markup is off on both: styled output is given as Text (see say and cell), and anything else
# printed (names, addresses) comes out as written.
console = Console(width=_width, markup=False, emoji=False, highlight=False)
errconsole = Console(stderr=True, width=_width, markup=False, emoji=False, highlight=False)

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """The command line asks for something it cannot mean (exit 2)."""


class Verbs:
    """The subcommands of `l7lab`: each group of verbs adds its own (`register(verbs)`)."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub  # what ArgumentParser.add_subparsers returned (its class is argparse's own)

    def add(self, name: str, help_text: str, func: Command, json_flag: bool = True) -> argparse.ArgumentParser:
        """A verb running `func(args)`; with `json_flag`, it takes --json."""
        p = self._sub.add_parser(name, help=help_text, description=help_text)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(verb_parser=p, func=func)
        return p


def lab_arguments(p: argparse.ArgumentParser, help_text: str) -> None:
    """The lab as a positional argument or as --lab, as every verb that takes one accepts it."""
    p.add_argument("lab", nargs="?", help=f"{help_text} (or --lab)")
    p.add_argument("--lab", dest="lab_option", metavar="LAB", help=help_text)


def flow_arguments(p: argparse.ArgumentParser, sources: str, backend_help: str, http_help: str, dns_help: str) -> None:
    """The words of one flow, shared by `explain` and `trace` (those of a scenario probe)."""
    p.add_argument("--from", dest="source", required=True, metavar="SOURCE", help=sources)
    p.add_argument("--to", required=True, metavar="DEST[:PORT]",
                   help="pod, world host, DNS name, node (the lab node's own address), or a service (name, "
                        "namespace/name or DNS name), with an optional port")
    p.add_argument("--backend", metavar="POD", help=backend_help)
    p.add_argument("--protocol", choices=("TCP", "UDP", "SCTP", "ICMP"),
                   help="default TCP (UDP with --dns); SCTP: an INIT; ICMP: an echo request (ping)")
    p.add_argument("--http", metavar="'METHOD /path'", help=http_help)
    p.add_argument("--header", action="append", default=[], metavar="'Name: value'", help="request header (repeatable)")
    p.add_argument("--dns", metavar="NAME", help=dns_help)


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def cell(value: object) -> Text:
    """A table cell (or title) as plain text: brackets and colons in it are the user's."""
    return value if isinstance(value, Text) else Text(str(value))


def say(message: object, style: str = "") -> None:
    """One line on stdout, verbatim and unwrapped."""
    console.print(Text(str(message), style=style), soft_wrap=True)


def print_error(message: object) -> None:
    """One error on stderr, verbatim and unwrapped (only the 'error:' label is styled)."""
    errconsole.print(Text.assemble(("error:", "bold red"), " ", str(message)), soft_wrap=True)


def report_errors(exc: BaseException) -> int:
    errors = exc.errors if isinstance(exc, ErrorList) else [exc]
    for err in errors:
        print_error(err)
    return EXIT_SETUP


def policy_engine(scenario: Scenario) -> PolicyEngine:
    from .. import policy  # noqa: PLC0415 - the policy layer is optional for `up`

    return policy.PolicyEngine(scenario)


def load_datapath(scenario: Scenario) -> Datapath:
    from .. import datapath  # noqa: PLC0415 - the only module that imports bcc

    # Audit mode is per endpoint (the endpoints map's audit flag, from the resolver), so that
    # it can be switched at runtime; settings.audit only sets every endpoint's flag at start.
    return datapath.Datapath()


def lab_list(labs: list[str]) -> str:
    return f"labs up or left over: {', '.join(labs)}" if labs else "no lab is up"


def one_lab(name: str | None) -> labmod.LabRecord:
    """The record of lab `name`, or of the only lab that is up."""
    labs = [name] if name is not None else [n for n in labmod.running_labs() if labmod.LabRecord.load(n)]
    if not labs:
        raise L7LabError("no lab is up")
    if len(labs) > 1:
        raise L7LabError(f"several labs are up ({', '.join(labs)}): choose one with --lab")
    rec = labmod.LabRecord.load(labs[0])
    if rec is None:
        raise L7LabError(f"no lab named {labs[0]!r} is up")
    return rec

