"""The `observe` and `monitor` verbs: a running lab's flows, as `hubble observe` and `cilium
monitor` show them.

`observe` prints the Hubble flows of the lab's records (the kernel's verdicts and the proxy's L7
records, merged by time) that pass Hubble's filter flags (`dataplane/hubblefilter.py`), in one
of Hubble's outputs (`-o compact|dict|json|jsonpb`), or l7lab's own records with `--json`; from
the start of the files, the last N (`--last`), a point in time (`--since`, `--until`), and
then, with `--follow`, what comes next. `monitor` streams what comes next as `cilium monitor`
prints it. The reading is `dataplane/hubbleobserve.py`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import lab as labmod
from .common import EXIT_OK, UsageError, Verbs, lab_arguments, one_lab

OUTPUTS = ("compact", "dict", "json", "jsonpb")
DICT_SEPARATOR = "------------"  # Hubble's, between two flows of `-o dict`

# The filter flags, with Hubble's help texts (hubble/cmd/observe/flows.go), in `--help`'s order.
FILTER_HELP = {
    "verdict": ("VERDICT", "show only flows with this verdict (FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR)"),
    "type": ("TYPE[:SUBTYPE]", "filter by event type: l7, drop, policy-verdict, trace (trace:to-endpoint, "
                               "trace:to-proxy, trace:to-stack ...), agent"),
    "pod": ("[NS/]POD", "flows related to the given pod name prefix (either side; no namespace: 'default')"),
    "from-pod": ("[NS/]POD", "flows originating in the given pod name prefix"),
    "to-pod": ("[NS/]POD", "flows terminating in the given pod name prefix"),
    "namespace": ("NS", "flows related to the given namespace"),
    "from-namespace": ("NS", "flows originating in the given namespace"),
    "to-namespace": ("NS", "flows terminating in the given namespace"),
    "label": ("SELECTOR", "flows related to an endpoint with the given labels (app=x, k8s:app=x, "
                          "'app in (a,b)', !app, reserved:world)"),
    "from-label": ("SELECTOR", "flows originating in an endpoint with the given labels"),
    "to-label": ("SELECTOR", "flows terminating in an endpoint with the given labels"),
    "identity": ("ID", "flows related to an endpoint with the given security identity (number or world, host ...)"),
    "from-identity": ("ID", "flows originating at an endpoint with the given security identity"),
    "to-identity": ("ID", "flows terminating at an endpoint with the given security identity"),
    "ip": ("IP", "flows originating or terminating at the given IP address or CIDR"),
    "from-ip": ("IP", "flows originating at the given IP address or CIDR"),
    "to-ip": ("IP", "flows terminating at the given IP address or CIDR"),
    "fqdn": ("NAME", "flows from or to a world host of this DNS name (*.example.com: any name under it)"),
    "from-fqdn": ("NAME", "flows originating at a world host of this DNS name"),
    "to-fqdn": ("NAME", "flows terminating at a world host of this DNS name"),
    "protocol": ("PROTO", "flows of the given L4 or L7 protocol (tcp, udp, icmp, sctp, http, dns)"),
    "port": ("PORT", "flows with the given port on either side"),
    "from-port": ("PORT", "flows with the given source port"),
    "to-port": ("PORT", "flows with the given destination port"),
    "tcp-flags": ("FLAGS", "flows with the given TCP flags (syn, ack, fin, rst, psh; syn,ack: both)"),
    "traffic-direction": ("DIR", "flows in the given direction (ingress, egress)"),
    "http-method": ("METHOD", "flows with this HTTP method (any case)"),
    "http-path": ("REGEX", "flows whose HTTP path matches this regular expression (RE2, searched)"),
    "http-url": ("REGEX", "flows whose HTTP URL matches this regular expression (RE2, searched)"),
    "http-status": ("CODE", "flows with this HTTP status code (403) or prefix (4+, 40+): responses only"),
}
SHORT = {"type": "-t", "namespace": "-n", "label": "-l"}
# `--type` words of l7lab's earlier `observe` that stay: `all` (no type filter) and `flows`
# (the kernel's flows: their policy verdicts, drops and traces); `l7` is Hubble's own.
OLD_TYPES = {"all": (), "flows": ("policy-verdict", "drop", "trace")}


class _FilterFlag(argparse.Action):
    """Keeps every filter flag, in command-line order (`--not` negates the next one)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flags = list(getattr(namespace, "filter_flags", None) or [])
        name = self.dest.removeprefix("filter_").replace("_", "-")
        if name == "type" and values in OLD_TYPES:
            negated = bool(flags) and flags[-1][0] == "not"
            if negated and not OLD_TYPES[values]:
                raise argparse.ArgumentError(None, f"--type {values} filters nothing; it cannot be negated")
            # `--not` negates one flag: a negated word that stands for several types negates each.
            for i, value in enumerate(OLD_TYPES[values]):
                flags += [("not", ""), (name, value)] if negated and i else [(name, value)]
        else:
            flags.append((name, "" if values is None or values == [] else str(values)))
        namespace.filter_flags = flags


def filter_arguments(p: argparse.ArgumentParser, names: Iterable[str]) -> None:
    p.set_defaults(filter_flags=[])
    group = p.add_argument_group("filters (several values of one flag: any of them; different flags: all)")
    if "not" in names:
        group.add_argument("--not", dest="filter_not", action=_FilterFlag, nargs=0,
                           help="negate the filter flag after it: --not --verdict FORWARDED")
    for name in names:
        if name == "not":
            continue
        metavar, help_text = FILTER_HELP[name]
        flags = [SHORT[name], f"--{name}"] if name in SHORT else [f"--{name}"]
        group.add_argument(*flags, dest="filter_" + name.replace("-", "_"), action=_FilterFlag,
                           metavar=metavar, help=help_text)


def build_filters(args: argparse.Namespace) -> Any:
    from ..hubblefilter import FilterError, parse_filters  # noqa: PLC0415

    try:
        return parse_filters(args.filter_flags)
    except FilterError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- output


class Printer:
    """Prints Hubble events (or l7lab records, for `--json`) in one output format."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.count = 0

    def text(self, event: dict[str, Any]) -> str:
        from .. import hubble  # noqa: PLC0415

        if "agent_event" in event:
            agent = event["agent_event"]
            unknown = agent.get("unknown", {})
            details = f"type: {unknown.get('type', '')}, notification: {unknown.get('notification', '')}"
            if self.output == "dict":
                return "\n".join((f"  TIMESTAMP: {hubble.stamp(event)}", f"       TYPE: {agent['type']}",
                                  f"    DETAILS: {details}"))
            if self.output == "json":
                return json.dumps(agent)
            if self.output == "jsonpb":
                return json.dumps(event)
            return f"{hubble.stamp(event)}: {agent['type']} ({details})"
        if self.output == "dict":
            return hubble.dict_text(event)
        if self.output == "json":
            return json.dumps(event)
        if self.output == "jsonpb":
            return json.dumps(hubble.jsonpb(event))
        return hubble.compact(event)

    def events(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            if self.output == "dict" and self.count:
                print(DICT_SEPARATOR)
            print(self.text(event))
            self.count += 1
        sys.stdout.flush()

    def records(self, records: Iterable[Any]) -> None:
        from ..flowrender import json_line  # noqa: PLC0415

        for record in records:
            print(json_line(record))
        sys.stdout.flush()


def _until_interrupted(run: Callable[[], None]) -> int:
    """Run a stream; Ctrl-C (or a reader that went away, as `| head` does) ends it cleanly."""
    try:
        run()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so the flush at exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


# --------------------------------------------------------------------------- observe


def cmd_observe(args: argparse.Namespace) -> int:
    """The lab's Hubble flows that pass the filters, from the files and then as they come."""
    from ..hubbleobserve import Observer, Window, asks_for_agent_events  # noqa: PLC0415

    if args.json and args.output is not None:
        raise UsageError("--json prints l7lab's own records and -o/--output Hubble's flows: choose one")
    follow_for = args.follow_for
    if args.until is not None and (args.follow or follow_for is not None):
        raise UsageError("--until ends a window in the past; it cannot be combined with --follow or --follow-for")
    filters = build_filters(args)
    rec = one_lab(args.lab)
    since = args.since() if args.since is not None else None  # relative to now, when observing starts
    until = args.until() if args.until is not None else None
    window = Window(filters, since, until, agent_events=args.json or asks_for_agent_events(filters))
    observer = Observer(labmod.lab_dir(rec.lab), rec.lab, window, args.last, by_record=args.json)
    printer = Printer(args.output or "compact")

    def show(shown: Iterable[tuple[Any, list[dict[str, Any]]]]) -> None:
        for record, events in shown:
            if args.json:
                printer.records([record])
            else:
                printer.events(events)

    def run() -> None:
        show(observer.history())
        if args.follow or follow_for is not None:
            show(observer.follow(None if follow_for is None else time.monotonic() + follow_for))

    return _until_interrupted(run)


# --------------------------------------------------------------------------- monitor


def cmd_monitor(args: argparse.Namespace) -> int:
    """What the lab's datapath and proxy report from now on, as `cilium monitor` prints it."""
    from ..ciliummonitor import monitor_line  # noqa: PLC0415
    from ..hubbleobserve import Observer, Window  # noqa: PLC0415

    filters = build_filters(args)
    rec = one_lab(args.lab)
    observer = Observer(labmod.lab_dir(rec.lab), rec.lab, Window(filters))
    observer.start_at_end()

    def line(event: dict[str, Any]) -> str:
        if args.json:
            return json.dumps(event)
        if "agent_event" in event:
            unknown = event["agent_event"].get("unknown", {})
            return f">> {unknown.get('type', '')}: {unknown.get('notification', '')}"
        return monitor_line(event)

    def run() -> None:
        for _, events in observer.follow(None if args.for_seconds is None else time.monotonic() + args.for_seconds):
            for event in events:
                print(line(event))
            sys.stdout.flush()

    return _until_interrupted(run)


# --------------------------------------------------------------------------- values


def _count(text: str) -> int:
    """--last N: 0 to sys.maxsize (the longest list Python can keep), ASCII digits."""
    digits = text.strip()
    if not re.fullmatch(r"[0-9]+", digits) or len(digits.lstrip("0")) > len(str(sys.maxsize)) \
            or int(digits) > sys.maxsize:
        raise argparse.ArgumentTypeError(f"expected a number of flows (0 or more, at most {sys.maxsize}), "
                                         f"got {text!r}")
    return int(digits)


def _seconds(text: str) -> float:
    """--follow-for / --for: a finite number of seconds, 0 or more (inf and nan are no time)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 or more), got {text!r}")
    return value


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(text: str) -> Any:
    """--since / --until: a duration back from now (30s, 5m, 1h30m, 2d, as Hubble's relative
    times), a unix time, or an ISO 8601 / RFC 3339 time (local time unless it says otherwise).
    Returns a function giving the time, so that a duration counts back from when observing starts."""
    import datetime  # noqa: PLC0415

    spec = text.strip()
    expected = argparse.ArgumentTypeError(f"expected a duration (30s, 5m, 1h30m, 2d), a unix time or an ISO 8601 "
                                          f"time (2026-05-01T12:00:00Z), got {text!r}")
    if re.fullmatch(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+", spec):
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)", spec))
        if not math.isfinite(seconds):  # a duration of more digits than a float holds
            raise expected
        return lambda: time.time() - seconds
    try:
        when = float(spec)
    except ValueError:
        try:
            when = datetime.datetime.fromisoformat(spec.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise expected from None
    if not math.isfinite(when):  # nan, inf: no point in time (nan would compare false with every flow)
        raise expected
    return lambda: when


def register(verbs: Verbs) -> None:
    """Add observe and monitor."""
    p = verbs.add("observe", "print a running lab's flows as Hubble shows them: the kernel's verdicts and the "
                             "proxy's L7 requests, filtered with hubble observe's flags", cmd_observe, json_flag=False)
    lab_arguments(p, "lab name (needed when several labs are up)")
    p.add_argument("--json", action="store_true",
                   help="print l7lab's own records (the lines of the record files, docs/observability.md), "
                        "not Hubble's flows; the filters choose the records one of whose flows passes")
    p.add_argument("-o", "--output", choices=OUTPUTS, default=None,
                   help="Hubble's output: compact (the default, one line per flow), dict, json (one flow object "
                        "per line), jsonpb (one {\"flow\": ...} per line). --json prints l7lab's own records instead")
    p.add_argument("-f", "--follow", action="store_true",
                   help="after the flows already recorded, keep printing new ones until interrupted (Ctrl-C)")
    p.add_argument("--follow-for", type=_seconds, metavar="SECONDS",
                   help="like --follow, for this many seconds (for scripts)")
    p.add_argument("--last", type=_count, metavar="N",
                   help="the last N flows that pass the filters (with --json, the last N records)")
    p.add_argument("--since", type=_when, metavar="WHEN",
                   help="flows since WHEN: a duration back from now (30s, 5m, 1h30m, 2d), a unix time or an "
                        "ISO 8601 time")
    p.add_argument("--until", type=_when, metavar="WHEN", help="flows until WHEN (as --since)")
    filter_arguments(p, ("not", *FILTER_HELP))

    m = verbs.add("monitor", "stream a running lab's datapath and proxy events as cilium monitor prints them, "
                             "until interrupted", cmd_monitor, json_flag=False)
    lab_arguments(m, "lab name (needed when several labs are up)")
    m.add_argument("--json", action="store_true", help="one Hubble flow object per line (as observe -o json)")
    m.add_argument("--for", dest="for_seconds", type=_seconds, metavar="SECONDS",
                   help="stop after this many seconds (for scripts)")
    filter_arguments(m, ("type",))
    m.description = ("stream a running lab's events as cilium monitor prints them, until interrupted; "
                     "--type drop|policy-verdict|l7|trace|agent (several: any of them); --json: one Hubble "
                     "flow object per line")
