"""The `ui` verb: a running lab's service map in the browser, served on loopback until
interrupted (dataplane/ui; docs/ui.md)."""

from __future__ import annotations

import argparse
import json

from .. import lab as labmod
from ..ui import DEFAULT_LISTEN
from .common import EXIT_OK, Verbs, lab_arguments, one_lab, say


def cmd_ui(args: argparse.Namespace) -> int:
    """Bind the port first (a busy one is an error at once), then serve until Ctrl-C."""
    from ..ui import graph, server  # noqa: PLC0415 - aiohttp only for this verb

    host, port = server.parse_listen(args.listen)
    rec = one_lab(args.lab)
    sock = server.bind_listen(host, port)
    service_map = graph.ServiceMap(graph.lab_nodes(rec.endpoints))

    def ready(url: str) -> None:
        if args.json:
            print(json.dumps({"lab": rec.lab, "url": url}), flush=True)
        else:
            say(f"service map of lab {rec.lab} at {url} (loopback only; Ctrl-C to stop)")

    def lab_nodes() -> list[graph.MapNode] | None:
        now = labmod.LabRecord.load(rec.lab)
        return graph.lab_nodes(now.endpoints) if now is not None else None

    server.run(rec.lab, labmod.lab_dir(rec.lab), service_map, sock, ready, lab_nodes)
    return EXIT_OK


def register(verbs: Verbs) -> None:
    """Add ui."""
    p = verbs.add("ui", "serve a running lab's service map in the browser (loopback only)", cmd_ui)
    lab_arguments(p, "lab name (needed when several labs are up)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to listen, a loopback address only (default {DEFAULT_LISTEN})")
