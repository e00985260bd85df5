"""The l7lab command line: verbs only, each a thin call into the library.

Exit codes: 0 success; 1 setup error (invalid input, not root, lab already up, ...);
2 usage error; 3 a probe did not meet its expectation.

The verbs are grouped by subject, each group a module that registers its own subcommands
(`register(verbs)`), in the order `l7lab --help` lists them:

    lifecycle   up, down, clean, status, exec   a lab's life, and a command inside its pods
    run         run                             a scenario end to end (or --dry-run)
    observe     observe, monitor                a running lab's flows (as hubble observe) and events (as cilium monitor)
    changes     apply, delete, label, audit     policy changes through the lab's agent
    check       validate, explain               files only: errors, and the oracle's reasons
    exercise    check                           an exercise against the learner's policies: solved or not yet
    trace       trace                           one probe's path through a running lab, step by step
    inspect     policy get, identity list,      a running lab's policy map as the kernel holds it (checked
                fqdn cache                      against the resolver's state), its identities, and what
                                                DNS answers taught it
    ui          ui                              a running lab's service map in the browser

`common` holds what they share: exit codes, the consoles, the registry, the lab look-up.
"""

from __future__ import annotations

import argparse
import sys

from .. import lab as labmod
from ..errors import ErrorList, L7LabError, SourceError
from . import changes, check, exercise, inspect, lifecycle, observe, run, trace, ui
from .common import EXIT_EXPECTATION, EXIT_OK, EXIT_SETUP, EXIT_USAGE, UsageError, Verbs, errconsole, report_errors

GROUPS = (lifecycle, run, observe, changes, check, exercise, trace, inspect, ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l7lab",
        description="Kubernetes and Cilium network policy on a real Linux kernel: pods in network "
                    "namespaces, L3/L4 verdicts in eBPF, L7 rules in an HTTP proxy.",
        epilog="exit codes: 0 ok, 1 setup or input error, 2 usage error, 3 a probe missed its expectation")
    verbs = Verbs(parser.add_subparsers(dest="verb", required=True, metavar="VERB"))
    for group in GROUPS:
        group.register(verbs)
    return parser


def _check_lab_arguments(args: argparse.Namespace) -> None:
    """One lab, named once: positional and --lab must agree; every lab name given (LAB, --lab,
    up/run --name) is checked before any verb touches a path, a namespace or a process."""
    option = getattr(args, "lab_option", None)
    if option is not None:
        if args.lab is not None and args.lab != option:
            raise UsageError(f"the lab is given twice, as {args.lab!r} and --lab {option!r}")
        args.lab = option
    if getattr(args, "lab", None) is not None:
        labmod.validate_lab_name(args.lab)
    if args.verb in ("up", "run") and args.name is not None:
        labmod.validate_lab_name(args.name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_lab_arguments(args)
        return int(args.func(args))
    except UsageError as exc:
        args.verb_parser.print_usage(sys.stderr)
        print(f"l7lab {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SourceError, ErrorList, L7LabError) as exc:
        return report_errors(exc)
    except KeyboardInterrupt:
        errconsole.print("interrupted")
        return 130


__all__ = ["EXIT_EXPECTATION", "EXIT_OK", "EXIT_SETUP", "EXIT_USAGE", "UsageError", "build_parser", "main"]
