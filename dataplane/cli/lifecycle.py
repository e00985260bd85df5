"""Verbs for a lab's life: `up` builds it (handing it to an agent), `down` and `clean` remove it,
`status` lists what is up, and `exec` runs a command inside one of its pods."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from rich.table import Table

from .. import lab as labmod
from ..errors import L7LabError
from ..safety import UnsafePathError
from ..scenario import load_scenario
from .common import (EXIT_OK, EXIT_SETUP, UsageError, Verbs, cell, console, emit_json, lab_arguments, lab_list,
                     one_lab, policy_engine, print_error, say)


def cmd_up(args: argparse.Namespace) -> int:
    from .. import agent  # noqa: PLC0415

    scenario = load_scenario(args.scenario)
    engine = policy_engine(scenario)  # every policy is valid before anything is built
    labmod.check_environment()
    name = args.name or scenario.name
    labmod.validate_lab_name(name)
    metrics = None
    if args.metrics:
        from ..metrics import parse_listen  # noqa: PLC0415

        metrics = parse_listen(args.metrics)
    # The agent builds the lab and stays with it (flows, metrics, policy changes) until `down`.
    info = agent.start(engine, name, metrics)
    if args.json:
        emit_json(info)
    else:
        say(f"lab {name} is up: {info['endpoints']} endpoints in namespace {info['node']}, "
             f"agent pid {info['agent']}; 'l7lab status' shows them, 'l7lab observe {name}' its flows, "
             f"'l7lab down {name}' removes them")
        if info.get("metrics"):
            console.print(f"Prometheus metrics: {info['metrics']}", highlight=False)
    return EXIT_OK


def _targets(args: argparse.Namespace, every: Callable[[], list[str]]) -> list[str]:
    """The labs `down`/`clean` act on: the one named, or with --all every one `every` lists."""
    if args.lab is not None:
        if args.all:
            raise UsageError("give a lab name or --all, not both")
        return [args.lab]
    labs = every()
    if not args.all:
        raise UsageError(f"which lab? give its name, or --all to remove every lab on this "
                         f"machine ({lab_list(labs)})")
    return labs


def _remove_labs(args: argparse.Namespace, remove: Any, labs: list[str]) -> tuple[dict[str, list[str]], int]:
    """Run `remove` on every lab, saying what goes; an error for one lab does not stop the others."""
    if args.all and not args.json:
        say(f"{args.verb} --all: {'removing labs ' + ', '.join(labs) if labs else 'no lab is up'}")
    report: dict[str, list[str]] = {}
    status = EXIT_OK
    for name in labs:
        try:
            report[name] = remove(name)
        except UnsafePathError as exc:  # raised before anything of the lab is removed
            print_error(f"{exc}; nothing of lab {name} was removed")
            status = EXIT_SETUP
            continue
        except L7LabError as exc:
            print_error(f"lab {name}: {exc}")
            status = EXIT_SETUP
            continue
        if not args.json:
            for item in report[name]:
                say(f"lab {name}: removed {item}")
            say(f"lab {name}: removed {len(report[name])} resources" if report[name]
                 else f"lab {name}: nothing left to remove")
    return report, status


def cmd_down(args: argparse.Namespace) -> int:
    labs = _targets(args, labmod.running_labs)
    report, status = _remove_labs(args, labmod.down, labs)
    if args.json:
        emit_json(report)
    return status


def cmd_clean(args: argparse.Namespace) -> int:
    labs = _targets(args, labmod.known_labs)
    report, status = _remove_labs(args, labmod.clean, labs)
    if args.json:
        emit_json({"removed": [item for items in report.values() for item in items]})
    elif not args.lab:
        total = sum(len(items) for items in report.values())
        say(f"clean: {total} resources removed" if total else "clean: nothing to remove")
    return status


def cmd_status(args: argparse.Namespace) -> int:
    if args.lab is not None and labmod.LabRecord.load(args.lab) is None and not labmod.has_leftovers(args.lab):
        raise L7LabError(f"no lab named {args.lab!r} is up ({lab_list(labmod.running_labs())})")
    labs = [args.lab] if args.lab is not None else labmod.running_labs()
    out = []
    for name in labs:
        rec = labmod.LabRecord.load(name)
        if rec is None:
            out.append({"lab": name, "status": f"leftover (no record; 'l7lab clean {name}' removes it)",
                        "endpoints": []})
            continue
        agent_info = _agent_status(name)
        audited = set((agent_info or {}).get("audit", []))  # the agent's engine knows audit mode
        out.append({"lab": name, "status": rec.status, "scenario": rec.scenario, "node": rec.node,
                    "agent": agent_info,
                    "endpoints": [{"name": e.key, "kind": e.kind, "ip": e.ip, "interface": e.ifname,
                                   "netns": e.netns, "labels": e.labels, "audit": e.key in audited,
                                   "ports": [f"{p['port']}/{p['protocol']}" + (f" ({p['name']})" if p['name'] else "")
                                             for p in e.ports]}
                                  for e in rec.endpoints.values()]})
    if args.json:
        emit_json(out)
        return EXIT_OK
    if not out:
        say("no lab is up")
    for lab in out:
        agent_info = lab.get("agent")
        if agent_info and agent_info.get("running"):
            caption = (f"agent pid {agent_info['pid']}; {_proxy_caption(agent_info.get('proxy'))}; "
                       f"policies: {', '.join(agent_info['policies']) or 'none'}")
            if agent_info.get("metrics_url"):
                caption += f"; metrics: {agent_info['metrics_url']}"
            if agent_info.get("audit"):
                caption += f"; audit mode (would-be drops pass): {', '.join(agent_info['audit'])}"
        elif agent_info:
            caption = f"agent not answering: {agent_info.get('error', '')}"
        else:
            caption = "no agent: flows are not recorded and policy changes are refused" if lab["status"] == "up" else ""
        table = Table(title=cell(f"lab {lab['lab']}: {lab['status']}"), title_justify="left", caption=cell(caption),
                      caption_justify="left")
        for col in ("endpoint", "kind", "address", "ports", "interface", "labels"):
            table.add_column(col)
        for e in lab["endpoints"]:
            table.add_row(*map(cell, (e["name"], e["kind"], e["ip"], ", ".join(e["ports"]), e["interface"],
                                       ",".join(f"{k}={v}" for k, v in e["labels"].items()))))
        console.print(table)
        services = (agent_info or {}).get("services") or []
        if services:
            svc_table = Table(title=cell(f"services of lab {lab['lab']} (backends as translated now)"),
                              title_justify="left")
            for col in ("service", "address", "backends"):
                svc_table.add_column(col)
            for s in services:
                svc_table.add_row(*map(cell, (s["service"] + (" (ClientIP affinity)" if s["affinity"] else ""),
                                              s["address"], ", ".join(s["backends"]) or "none: dropped")))
            console.print(svc_table)
    return EXIT_OK


def _agent_status(lab: str) -> dict[str, Any] | None:
    """What the lab's agent says (pid, policies in force), or None for a lab without one."""
    from .. import agent  # noqa: PLC0415

    if not agent.socket_path(lab).exists():
        return None
    try:
        reply = agent.request(lab, {"op": "status"}, timeout=agent.STATUS_TIMEOUT)
    except L7LabError as exc:
        return {"running": False, "error": str(exc)}
    return {"running": True, "pid": reply.get("pid"), "policies": reply.get("policies", []),
            "metrics_url": reply.get("metrics_url"), "proxy": reply.get("proxy"), "audit": reply.get("audit", []),
            "services": reply.get("services", [])}


def _proxy_caption(proxy: dict[str, Any] | None) -> str:
    """The L7 proxy as the agent supervises it: running, restarting or down, and since when."""
    import time  # noqa: PLC0415

    if not proxy:
        return "proxy: unknown"
    since = time.strftime("%H:%M:%S", time.localtime(proxy.get("since", 0)))
    restarts = f" (restarts: {proxy['restarts']})" if proxy.get("restarts") else ""
    if proxy.get("state") == "running":
        return f"proxy pid {proxy.get('pid')}{restarts}"
    if proxy.get("state") == "starting":
        return f"proxy RESTARTING (pid {proxy.get('pid')}, down since {since}: {proxy.get('last_exit', '')}){restarts}"
    return (f"proxy DOWN since {since} ({proxy.get('last_exit', '')}), next restart in "
            f"{proxy.get('next_restart_in', 0):g}s{restarts}; L7 flows are dropped meanwhile")


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise L7LabError("no command given: l7lab exec POD -- COMMAND [ARGS...]")
    rec = one_lab(args.lab)
    matches = [e for k, e in rec.endpoints.items() if k == args.pod or k.split("/")[-1] == args.pod]
    if len(matches) != 1:
        names = ", ".join(sorted(rec.endpoints))
        raise L7LabError(f"{'ambiguous' if matches else 'unknown'} endpoint {args.pod!r} in lab {rec.lab}; endpoints: {names}")
    from .. import confine  # noqa: PLC0415

    # As the invoking user (or --user), in a mount namespace where the lab's control directory
    # is hidden: what a pod's own processes see (dataplane/confine.py, docs/security.md).
    user = confine.resolve_user(args.user) if args.user is not None else confine.invoking_user()
    os.execvp("ip", ["ip", "netns", "exec", matches[0].netns, *confine.command(user, [str(labmod.run_dir())], command)])
    return EXIT_SETUP  # not reached


def register(verbs: Verbs) -> None:
    """Add up, down, clean, status and exec."""
    p = verbs.add("up", "build a scenario's lab (namespaces, links, servers) and leave it running", cmd_up)
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--name", help="lab name (default: the scenario's name)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback only, e.g. 127.0.0.1:9464)")

    p = verbs.add("down", "remove a lab: everything its record lists, then anything with its prefix", cmd_down)
    lab_arguments(p, "the lab to remove")
    p.add_argument("--all", action="store_true", help="remove every lab on this machine")

    p = verbs.add("clean", "remove whatever carries a lab's prefix, with or without a record", cmd_clean)
    lab_arguments(p, "the lab to remove")
    p.add_argument("--all", action="store_true", help="remove whatever carries the l7lab prefix, every lab")

    p = verbs.add("status", "list running labs with their endpoints, addresses and ports", cmd_status)
    lab_arguments(p, "only this lab")

    p = verbs.add("exec", "run a command inside a pod or world host, as the invoking user with the lab's control "
                     "directory hidden: l7lab exec POD -- CMD...", cmd_exec, json_flag=False)
    p.add_argument("--lab", help="lab name (needed when several labs are up)")
    p.add_argument("--user", metavar="NAME|UID",
                   help="run as this user (default: the invoking user, the one behind sudo if run through sudo)")
    p.add_argument("pod", help="pod (name or namespace/name) or world host")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments, after --")
