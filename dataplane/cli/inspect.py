"""The `policy get`, `identity list` and `fqdn cache` verbs: a running lab's policy map as the
kernel holds it, checked against the resolver's intended state, its identities, and what DNS
answers taught it (as `cilium bpf policy get`, `cilium identity list` and `cilium fqdn cache
list` show them).

`fqdn cache` asks the lab's FQDN learner directly (its socket in the lab's directory, served by
the agent, or by `l7lab run` while it runs).

The lab's agent holds the datapath, so both ask it ("policy-dump", "identity-list"); the naming
and the comparison are `dataplane/policymap.py`'s. `policy get` exits 3 when the kernel's map
and the intended state differ (the check did not hold), as a probe that misses does.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from rich.table import Table

from .. import lab as labmod
from ..policy.host import HOST_ENDPOINT_NAME
from ..errors import L7LabError
from .common import (EXIT_EXPECTATION, EXIT_OK, UsageError, Verbs, cell, console, emit_json, lab_arguments, one_lab,
                     say)

POLICY_EXAMPLE = """\
examples:
  l7lab policy get retail retail/inventory-api   # one endpoint's entries
  l7lab policy get LAB host                      # the node's, once a host policy selects it
  l7lab policy get inventory-api                 # the only lab that is up; a pod's short name will do
  l7lab policy get retail --json                 # every endpoint, for machines
exit codes: 0 the kernel's map is the intended state, 3 they differ, 1 no such lab or pod, 2 usage
"""


def lab_and_pod(first: str | None, second: str | None, lab_option: str | None,
                running: list[str]) -> tuple[str | None, str | None]:
    """(LAB, POD) from `policy get [LAB] [POD]`: two words are both; one word is the lab if a lab
    of that name is up (and --lab is not given), else the pod (of --lab, or of the only lab up)."""
    if second is not None:
        if lab_option is not None and lab_option != first:
            raise UsageError(f"the lab is given twice, as {first!r} and --lab {lab_option!r}")
        return first, second
    if first is None:
        return lab_option, None
    if lab_option is None and first in running:
        return first, None
    return lab_option, first


def pod_key(rec: labmod.LabRecord, pod: str) -> str:
    """The "namespace/name" of pod `pod` (either form) in the lab."""
    matches = [k for k, e in rec.endpoints.items() if e.kind == "pod" and (k == pod or k.split("/")[-1] == pod)]
    if len(matches) != 1:
        pods = ", ".join(sorted(k for k, e in rec.endpoints.items() if e.kind == "pod"))
        raise L7LabError(f"{'ambiguous' if matches else 'no'} pod {pod!r} in lab {rec.lab}; pods: {pods}")
    return matches[0]


def _ask(lab: str, payload: dict[str, Any]) -> dict[str, Any]:
    from .. import agent  # noqa: PLC0415

    reply = agent.request(lab, payload, timeout=agent.INSPECT_TIMEOUT, reply_limit=agent.MAX_DUMP_REPLY)
    if not reply.get("ok"):
        raise L7LabError("; ".join(reply.get("errors", ["the agent refused the request"])))
    return reply


# -- policy get ---------------------------------------------------------------------------------
def _endpoint_title(ep: dict[str, Any]) -> str:
    if ep["endpoint"] is None:
        return f"endpoint {ep['endpoint_id']}: not an endpoint of the resolver's state"
    def enforced(flag: bool) -> str:
        return "enforced" if flag else "not enforced"
    return (f"{ep['endpoint']} (endpoint {ep['endpoint_id']}, identity {ep['identity']}; "
            f"ingress {enforced(ep['ingress_enforced'])}, egress {enforced(ep['egress_enforced'])})")


def _endpoint_caption(ep: dict[str, Any]) -> str:
    if not ep["kernel_entries"] and not ep["intended_entries"]:
        return "no entries"
    if ep["differences"]:
        return (f"{ep['differences']} difference(s) between the kernel's map ({ep['kernel_entries']} entries) "
                f"and the resolver's intended state ({ep['intended_entries']} entries)")
    return f"{ep['kernel_entries']} entries in the kernel's map, as the resolver intends"


def render_policy(endpoints: list[dict[str, Any]]) -> None:
    """One table per endpoint, a row per entry as `cilium bpf policy get` prints them, with a
    CHECK column where the kernel and the intended state differ."""
    from ..policymap import difference_text  # noqa: PLC0415

    for ep in endpoints:
        say(_endpoint_title(ep), style="bold")
        if ep["entries"]:
            table = Table()
            columns = ["DIRECTION", "IDENTITY", "LABELS", "PORT/PROTO", "VERDICT", "PROXY PORT", "RULE"]
            if ep["differences"]:
                columns.append("CHECK")
            for column in columns:  # labels and rule names come out whole, folded if they must
                table.add_column(column, overflow="fold")
            for row in ep["entries"]:
                values = [row["direction"], row["identity"], "\n".join(row["identity_labels"]), row["ports"],
                          row["verdict"], row["proxy_port"] or "-", "\n".join(r["rule"] for r in row["rules"]) or "-"]
                if ep["differences"]:
                    values.append(difference_text(row))
                table.add_row(*map(cell, values))
            console.print(table)
        say(_endpoint_caption(ep), style="bold red" if ep["differences"] else "")
        say("")


def cmd_policy(args: argparse.Namespace) -> int:
    from ..policymap import PolicyDump  # noqa: PLC0415

    lab, pod = lab_and_pod(args.lab_or_pod, args.pod, args.lab, labmod.running_labs())
    if lab is not None:
        labmod.validate_lab_name(lab)
    rec = one_lab(lab)
    payload: dict[str, Any] = {"op": "policy-dump"}
    if pod is not None:
        # "host": the host endpoint a host policy (nodeSelector) adds, unless a pod has that name.
        is_host = pod == HOST_ENDPOINT_NAME and not any(
            e.kind == "pod" and k.split("/")[-1] == pod for k, e in rec.endpoints.items())
        payload["endpoint"] = HOST_ENDPOINT_NAME if is_host else pod_key(rec, pod)
    endpoints = PolicyDump.from_reply(_ask(rec.lab, payload)).endpoints()
    differences = sum(ep["differences"] for ep in endpoints)
    if args.json:
        emit_json({"lab": rec.lab, "differences": differences, "endpoints": endpoints})
    else:
        render_policy(endpoints)
        if differences:
            say(f"the kernel's policy map differs from the resolver's intended state: {differences} "
                "difference(s), see CHECK", style="bold red")
        else:
            say("the kernel's policy map holds exactly the resolver's intended state")
    return EXIT_EXPECTATION if differences else EXIT_OK


# -- identity list ------------------------------------------------------------------------------
def render_identities(identities: list[dict[str, Any]]) -> None:
    table = Table()
    for column in ("ID", "LABELS", "ENDPOINTS", "PREFIXES"):
        table.add_column(column, overflow="fold")
    for ident in identities:
        prefixes = [*ident["prefixes"], *(f"({name})" for name in ident["dns_names"])]
        table.add_row(*map(cell, (ident["id"], "\n".join(ident["labels"]), "\n".join(ident["endpoints"]),
                                  "\n".join(prefixes))))
    console.print(table)


def cmd_identity(args: argparse.Namespace) -> int:
    rec = one_lab(args.lab)
    identities = _ask(rec.lab, {"op": "identity-list"})["identities"]
    if args.json:
        emit_json({"lab": rec.lab, "identities": identities})
    else:
        render_identities(identities)
    return EXIT_OK


# -- fqdn cache ---------------------------------------------------------------------------------
def render_fqdn_cache(rows: list[dict[str, Any]]) -> None:
    table = Table()
    for column in ("ENDPOINT", "NAME", "ADDRESS", "TTL", "EXPIRES", "LOOKUP", "SELECTORS"):
        table.add_column(column, overflow="fold")
    for row in rows:
        left = row["expires_in"]
        expires = ("expired, kept: connection open" if row["zombie"] else
                   f"in {left:g}s" if left > 0 else "expired")
        learned = datetime.fromtimestamp(row["learned_wall"]).strftime("%H:%M:%S.%f")[:-3] if row["learned_wall"] else ""
        table.add_row(*map(cell, (row["endpoint"], row["name"], row["address"], row["ttl"], expires,
                                  f"{row['query']} at {learned}".strip(), "\n".join(row["selectors"]) or "-")))
    console.print(table)


def cmd_fqdn(args: argparse.Namespace) -> int:
    from ..fqdn.learner import ask, socket_path  # noqa: PLC0415

    rec = one_lab(args.lab)
    path = socket_path(rec.lab)
    try:
        reply = ask(path, {"op": "cache"})
    except (OSError, ValueError) as exc:
        raise L7LabError(f"lab {rec.lab} has no FQDN learner serving ({exc}): is its agent running? "
                         f"('l7lab status {rec.lab}')") from None
    if not reply.get("ok"):
        raise L7LabError(f"the FQDN learner of lab {rec.lab} refused: {reply.get('error')}")
    rows = reply["cache"]
    if args.name:
        rows = [r for r in rows if r["name"] == args.name.lower().rstrip(".")]
    if args.json:
        emit_json({"lab": rec.lab, "entries": rows})
    elif rows:
        render_fqdn_cache(rows)
    else:
        say("no names learned" + (f" for {args.name}" if args.name else "") + ": no DNS answer went through the "
            "DNS proxy (a DNS rule sends queries there), or every entry expired")
    return EXIT_OK


def register(verbs: Verbs) -> None:
    """Add policy (get), identity (list) and fqdn (cache)."""
    p = verbs.add("policy", "policy get: an endpoint's policy map as the kernel holds it, checked against "
                            "the resolver's intended state", cmd_policy)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = POLICY_EXAMPLE
    p.add_argument("action", choices=("get",), help="what to do with the policy map")
    p.add_argument("lab_or_pod", nargs="?", metavar="LAB", help="the lab (up, served by its agent; or --lab)")
    p.add_argument("pod", nargs="?", metavar="POD", help="namespace/pod or pod (default: every endpoint)")
    p.add_argument("--lab", dest="lab_option", metavar="LAB", help="the lab")
    p.set_defaults(lab=None)  # chosen from LAB, POD and --lab by the command

    p = verbs.add("identity", "identity list: the lab's security identities, their labels, endpoints and prefixes",
                  cmd_identity)
    p.add_argument("action", choices=("list",), help="what to do with the identities")
    lab_arguments(p, "the lab (up, served by its agent)")

    p = verbs.add("fqdn", "fqdn cache: names and addresses DNS answers taught the lab, per endpoint, with their "
                          "TTLs, expiry and the toFQDNs selectors they feed", cmd_fqdn)
    p.add_argument("action", choices=("cache",), help="what to show")
    lab_arguments(p, "the lab (up, served by its agent)")
    p.add_argument("--name", help="only this DNS name")
