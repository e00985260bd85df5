"""`python -m proxy`: run the L7 proxy of one lab (inside the lab's node namespace).

    python -m proxy --lab NAME --state /run/l7lab/NAME/policy.json [--port PORT (15001)] [--events FILE]
                    [--fqdn-socket PATH]

Prints `READY <host>:<port>` on stdout once listening. SIGHUP reloads the state file (a file that
cannot be loaded replaces the policy by an empty one: everything is denied until a good file is
loaded -- fail closed). SIGTERM/SIGINT stop it cleanly (exit 0). Exit 2 if the state file cannot
be loaded at start or the port cannot be bound.

--fqdn-socket PATH: the Unix socket of the lab's FQDN learner; every DNS answer with addresses is
told to it before it is released to the client (proxy.fqdn). Without it nothing is learned.

Limits (see proxy.limits; defaults in parentheses): --idle-timeout S (60), --header-timeout S (10),
--progress-timeout S (300), --max-connections N (512), --max-connections-per-identity N (128),
--learn-timeout S (2);
or all of them as one list, `--limits idle-timeout=5,max-connections=100` (the lab passes the
environment variable L7LAB_PROXY_LIMITS that way); a flag of its own wins over the list. The soft
limit on open files is raised to what max-connections needs (two descriptors per connection);
if the hard limit is lower, max-connections is lowered to fit, with a warning.

Test-only options: --host (default 0.0.0.0), --original-dst IP:PORT (every connection is treated
as addressed to it; disables IP_TRANSPARENT), --no-mark (no SO_MARK on upstream sockets: needs
no CAP_NET_ADMIN).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from dataplane import timescale
from dataplane.abi import PROXY_PORT
from dataplane.logfiles import bound_stderr

from .events import EventLog
from .fqdn import FqdnLearner
from .limits import Limits, flag_name
from .server import ProxyServer, install_uvloop
from .state import Snapshot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m proxy", description="l7lab transparent HTTP proxy")
    ap.add_argument("--lab", required=True, help="lab name (for messages)")
    ap.add_argument("--state", required=True, help="MapState JSON written by the lab")
    ap.add_argument("--port", type=int, default=PROXY_PORT)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--events", help="append one JSON line per request to this file")
    ap.add_argument("--fqdn-socket", metavar="PATH", help="Unix socket of the lab's FQDN learner (DNS answers' "
                                                          "addresses are learned before they are released)")
    ap.add_argument("--original-dst", help="IP:PORT: testing only; overrides getsockname()")
    ap.add_argument("--no-mark", action="store_true", help="testing only: no SO_MARK on upstream sockets")
    for f in fields(Limits):
        kind = int if f.type in (int, "int") else float
        ap.add_argument(f"--{flag_name(f.name)}", type=positive(kind), metavar="N" if kind is int else "SECONDS",
                        help=f"default {f.default:g}")
    ap.add_argument("--limits", default="", metavar="NAME=VALUE,...", help="several limits at once")
    args = ap.parse_args(argv)
    try:
        limits = Limits.parse(args.limits)
        args.limits = replace(limits, **{f.name: getattr(args, f.name) for f in fields(Limits)
                                         if getattr(args, f.name) is not None})
    except ValueError as exc:
        ap.error(f"--limits (in a lab: the environment variable L7LAB_PROXY_LIMITS): {exc}")
    return args


def positive(kind: type) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, not {text!r}")
        return value
    return convert


# Descriptors beside the client connections: the listeners, the event log, DNS queries in flight
# (an upstream and an answer socket each), refused connections being closed, a margin.
FD_RESERVE = 2 * 256 + 64 + 64


def fit_open_files(limits: Limits, lab: str) -> Limits:
    """Raise the soft RLIMIT_NOFILE to what the caps need; lower max-connections if it cannot."""
    need = 2 * limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fit = max(1, (soft - FD_RESERVE) // 2)
        print(f"l7proxy[{lab}]: only {soft} open files allowed: max-connections lowered from "
              f"{limits.max_connections} to {fit}", file=sys.stderr, flush=True)
        return replace(limits, max_connections=fit)
    return limits


def load(path: str, lab: str) -> Snapshot:
    try:
        return Snapshot.load(path)
    except Exception as exc:  # noqa: BLE001 -- any bad file: deny everything
        print(f"l7proxy[{lab}]: cannot load {path}: {exc}; denying every request", file=sys.stderr, flush=True)
        return Snapshot.empty()


def acknowledge(path: str) -> None:
    """Write the digest of the state now in force to PATH.loaded: the lab waits for it after a
    SIGHUP, so that a policy change is in force in the proxy before the kernel redirects by it."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        tmp = Path(path + ".loaded.tmp")
        tmp.write_text(digest)
        os.replace(tmp, path + ".loaded")
    except OSError as exc:
        print(f"l7proxy: cannot acknowledge {path}: {exc}", file=sys.stderr, flush=True)


def reload(server: ProxyServer, args: argparse.Namespace) -> None:
    server.reload(load(args.state, args.lab))
    acknowledge(args.state)


async def serve(args: argparse.Namespace) -> int:
    try:
        snapshot = Snapshot.load(args.state)
    except Exception as exc:  # noqa: BLE001
        print(f"l7proxy[{args.lab}]: cannot load {args.state}: {exc}", file=sys.stderr, flush=True)
        return 2
    original = None
    if args.original_dst:
        ip, _, port = args.original_dst.rpartition(":")
        original = (ip, int(port))
    limits = fit_open_files(args.limits, args.lab)
    # The learner's own budget (dataplane/fqdn/learner.py SYNC_BUDGET_S) is scaled to the machine's
    # speed: the wait for it is scaled alike, or a slow machine would release answers unlearned.
    learner = FqdnLearner(args.fqdn_socket, timescale.scaled(limits.learn_timeout)) if args.fqdn_socket else None
    server = ProxyServer(snapshot, args.host, args.port, transparent=original is None, mark=not args.no_mark,
                         original_dst=original, events=EventLog(args.events), limits=limits, learner=learner)
    try:
        await server.start()
    except OSError as exc:
        print(f"l7proxy[{args.lab}]: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(server, args))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    acknowledge(args.state)
    print(f"READY {args.host}:{server.port}", flush=True)
    await stop.wait()
    await server.stop()
    if learner is not None:
        await learner.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bound_stderr()  # errors are logged per connection: keep proxy.log under the logs' cap
    install_uvloop()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
