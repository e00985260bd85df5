"""The `observe` verb: a running lab's flow records (the kernel's L3/L4 verdicts, the proxy's L7
records and its lifecycle), merged by time, from the end of the files or a point in time."""

from __future__ import annotations

import argparse
from typing import Any

from .. import lab as labmod
from .common import EXIT_OK, Verbs, console, lab_arguments, one_lab


def cmd_observe(args: argparse.Namespace) -> int:
    """Kernel flow records (from the lab agent) and L7 records (from the proxy), merged by time;
    with --last / --since it starts near the end of the files instead of reading them whole."""
    import time  # noqa: PLC0415

    from ..flowrecord import record_type  # noqa: PLC0415
    from ..flowrender import describe, json_line  # noqa: PLC0415
    from ..flows import OBSERVE_TYPES, RecordTail  # noqa: PLC0415

    rec = one_lab(args.lab)
    kinds = OBSERVE_TYPES[args.type]
    tail = RecordTail.of_types(labmod.lab_dir(rec.lab), kinds)
    since = args.since() if args.since is not None else None  # relative to now, when observing starts
    if args.last is not None:
        tail.start_at_last(args.last)
    elif since is not None:
        tail.start_at_time(since)
    deadline = time.monotonic() + args.follow if args.follow else 0.0
    first = True
    while True:
        records = [r for r in tail.read() if record_type(r) in kinds and (since is None or r.time >= since)]
        if first and args.last is not None:
            records = records[-args.last:] if args.last else []  # the last N of all the files together
        first = False
        for record in records:
            if args.json:
                print(json_line(record), flush=True)
            else:
                console.print(describe(record), highlight=False, soft_wrap=True)
        if time.monotonic() >= deadline:
            return EXIT_OK
        time.sleep(0.2)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of records (0 or more), got {text!r}")
    return value


def _since(text: str) -> Any:
    """--since: a duration back from now (30s, 5m, 1h, 2d), a unix time, or an ISO 8601 time
    (local time unless it says otherwise). Returns a function giving the start time, so that a
    duration counts back from when observing starts."""
    import datetime  # noqa: PLC0415
    import re  # noqa: PLC0415
    import time  # noqa: PLC0415

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return lambda: time.time() - seconds
    try:
        when = float(text)
    except ValueError:
        try:
            when = datetime.datetime.fromisoformat(text.strip()).timestamp()
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a duration (30s, 5m, 1h, 2d), a unix time or an ISO 8601 time "
                f"(2024-05-01T12:00:00), got {text!r}") from None
    return lambda: when


def register(verbs: Verbs) -> None:
    """Add observe."""
    p = verbs.add("observe", "print a running lab's flows: the kernel's L3/L4 verdicts and the proxy's L7 records", cmd_observe)
    lab_arguments(p, "lab name (needed when several labs are up)")
    p.add_argument("--type", choices=("all", "flows", "l7"), default="all",
                   help="only kernel flow records (flows) or only L7 records (l7)")
    p.add_argument("--follow", type=float, default=0.0, metavar="SECONDS",
                   help="keep printing new records for this many seconds")
    p.add_argument("--last", type=_count, metavar="N",
                   help="start with the last N records (read from the end of the files; with --since, "
                        "the last N of those since WHEN)")
    p.add_argument("--since", type=_since, metavar="WHEN",
                   help="start with the records since WHEN: a duration back from now (30s, 5m, 1h, 2d), "
                        "a unix time or an ISO 8601 time")
