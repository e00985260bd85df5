"""The l7lab command line: verbs only, each a thin call into the library.

Exit codes: 0 success; 1 setup error (invalid input, not root, lab already up, ...);
2 usage error; 3 a probe did not meet its expectation.

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
from typing import Any, Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import lab as labmod
from .errors import ErrorList, L7LabError, SourceError
from .runner import KernelExecutor, OracleExecutor, RunReport, run_scenario
from .safety import UnsafePathError
from .scenario import load_scenario

EXIT_OK, EXIT_SETUP, EXIT_USAGE, EXIT_EXPECTATION = 0, 1, 2, 3

# Wide enough for the probe table when output goes to a file or a CI log.
_width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
# Markup stays on for stdout only because `observe` prints flowrender.describe()'s styled lines;
# everything else is given to it as Text (see _say and _cell).
console = Console(width=_width, emoji=False, highlight=False)
errconsole = Console(stderr=True, width=_width, markup=False, emoji=False, highlight=False)


class UsageError(Exception):
    """The command line asks for something it cannot mean (exit 2)."""


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _cell(value: object) -> Text:
    """A table cell (or title) as plain text: brackets and colons in it are the user's."""
    return value if isinstance(value, Text) else Text(str(value))


def _say(message: object, style: str = "") -> None:
    """One line on stdout, verbatim and unwrapped."""
    console.print(Text(str(message), style=style), soft_wrap=True)


def _print_error(message: object) -> None:
    """One error on stderr, verbatim and unwrapped (only the 'error:' label is styled)."""
    errconsole.print(Text.assemble(("error:", "bold red"), " ", str(message)), soft_wrap=True)


def _error(exc: BaseException) -> int:
    errors = exc.errors if isinstance(exc, ErrorList) else [exc]
    for err in errors:
        _print_error(err)
    return EXIT_SETUP


def _policy_engine(scenario: Any) -> Any:
    from .policy import PolicyEngine  # noqa: PLC0415 - the policy layer is optional for `up`

    return PolicyEngine(scenario)


# --- up / down / clean / status / exec ---------------------------------------------------------


def _datapath(scenario: Any) -> Any:
    from .datapath import Datapath  # noqa: PLC0415 - the only module that imports bcc

    return Datapath(audit=scenario.settings.audit)


def cmd_up(args: argparse.Namespace) -> int:
    from . import agent  # noqa: PLC0415

    scenario = load_scenario(args.scenario)
    _policy_engine(scenario)  # every policy is valid before anything is built
    labmod.check_environment()
    name = args.name or scenario.name
    labmod.validate_lab_name(name)
    metrics = None
    if args.metrics:
        from .metrics import parse_listen  # noqa: PLC0415

        metrics = parse_listen(args.metrics)
    # The agent builds the lab and stays with it (flows, metrics, policy changes) until `down`.
    info = agent.start(scenario, name, metrics)
    if args.json:
        _emit_json(info)
    else:
        _say(f"lab {name} is up: {info['endpoints']} endpoints in namespace {info['node']}, "
             f"agent pid {info['agent']}; 'l7lab status' shows them, 'l7lab observe {name}' its flows, "
             f"'l7lab down {name}' removes them")
        if info.get("metrics"):
            console.print(f"Prometheus metrics: {info['metrics']}", highlight=False)
    return EXIT_OK


def _lab_list(labs: list[str]) -> str:
    return f"labs up or left over: {', '.join(labs)}" if labs else "no lab is up"


def _targets(args: argparse.Namespace, every: Callable[[], list[str]]) -> list[str]:
    """The labs `down`/`clean` act on: the one named, or with --all every one `every` lists."""
    if args.lab is not None:
        if args.all:
            raise UsageError("give a lab name or --all, not both")
        return [args.lab]
    labs = every()
    if not args.all:
        raise UsageError(f"which lab? give its name, or --all to remove every lab on this "
                         f"machine ({_lab_list(labs)})")
    return labs


def _remove_labs(args: argparse.Namespace, remove: Any, labs: list[str]) -> tuple[dict[str, list[str]], int]:
    """Run `remove` on every lab, saying what goes; an error for one lab does not stop the others."""
    if args.all and not args.json:
        _say(f"{args.verb} --all: {'removing labs ' + ', '.join(labs) if labs else 'no lab is up'}")
    report: dict[str, list[str]] = {}
    status = EXIT_OK
    for name in labs:
        try:
            report[name] = remove(name)
        except UnsafePathError as exc:  # raised before anything of the lab is removed
            _print_error(f"{exc}; nothing of lab {name} was removed")
            status = EXIT_SETUP
            continue
        except L7LabError as exc:
            _print_error(f"lab {name}: {exc}")
            status = EXIT_SETUP
            continue
        if not args.json:
            for item in report[name]:
                _say(f"lab {name}: removed {item}")
            _say(f"lab {name}: removed {len(report[name])} resources" if report[name]
                 else f"lab {name}: nothing left to remove")
    return report, status


def cmd_down(args: argparse.Namespace) -> int:
    labs = _targets(args, labmod.running_labs)
    report, status = _remove_labs(args, labmod.down, labs)
    if args.json:
        _emit_json(report)
    return status


def cmd_clean(args: argparse.Namespace) -> int:
    labs = _targets(args, labmod.known_labs)
    report, status = _remove_labs(args, labmod.clean, labs)
    if args.json:
        _emit_json({"removed": [item for items in report.values() for item in items]})
    elif not args.lab:
        total = sum(len(items) for items in report.values())
        _say(f"clean: {total} resources removed" if total else "clean: nothing to remove")
    return status


def cmd_status(args: argparse.Namespace) -> int:
    if args.lab is not None and labmod.LabRecord.load(args.lab) is None and not labmod.has_leftovers(args.lab):
        raise L7LabError(f"no lab named {args.lab!r} is up ({_lab_list(labmod.running_labs())})")
    labs = [args.lab] if args.lab is not None else labmod.running_labs()
    out = []
    for name in labs:
        rec = labmod.LabRecord.load(name)
        if rec is None:
            out.append({"lab": name, "status": f"leftover (no record; 'l7lab clean {name}' removes it)",
                        "endpoints": []})
            continue
        out.append({"lab": name, "status": rec.status, "scenario": rec.scenario, "node": rec.node,
                    "agent": _agent_status(name),
                    "endpoints": [{"name": e.key, "kind": e.kind, "ip": e.ip, "interface": e.ifname,
                                   "netns": e.netns, "labels": e.labels,
                                   "ports": [f"{p['port']}/{p['protocol']}" + (f" ({p['name']})" if p['name'] else "")
                                             for p in e.ports]}
                                  for e in rec.endpoints.values()]})
    if args.json:
        _emit_json(out)
        return EXIT_OK
    if not out:
        _say("no lab is up")
    for lab in out:
        agent_info = lab.get("agent")
        if agent_info and agent_info.get("running"):
            caption = (f"agent pid {agent_info['pid']}; {_proxy_caption(agent_info.get('proxy'))}; "
                       f"policies: {', '.join(agent_info['policies']) or 'none'}")
            if agent_info.get("metrics_url"):
                caption += f"; metrics: {agent_info['metrics_url']}"
        elif agent_info:
            caption = f"agent not answering: {agent_info.get('error', '')}"
        else:
            caption = "no agent: flows are not recorded and policy changes are refused" if lab["status"] == "up" else ""
        table = Table(title=_cell(f"lab {lab['lab']}: {lab['status']}"), title_justify="left", caption=_cell(caption),
                      caption_justify="left")
        for col in ("endpoint", "kind", "address", "ports", "interface", "labels"):
            table.add_column(col)
        for e in lab["endpoints"]:
            table.add_row(*map(_cell, (e["name"], e["kind"], e["ip"], ", ".join(e["ports"]), e["interface"],
                                       ",".join(f"{k}={v}" for k, v in e["labels"].items()))))
        console.print(table)
    return EXIT_OK


def _agent_status(lab: str) -> dict[str, Any] | None:
    """What the lab's agent says (pid, policies in force), or None for a lab without one."""
    from . import agent  # noqa: PLC0415

    if not agent.socket_path(lab).exists():
        return None
    try:
        reply = agent.request(lab, {"op": "status"}, timeout=agent.STATUS_TIMEOUT)
    except L7LabError as exc:
        return {"running": False, "error": str(exc)}
    return {"running": True, "pid": reply.get("pid"), "policies": reply.get("policies", []),
            "metrics_url": reply.get("metrics_url"), "proxy": reply.get("proxy")}


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


def _one_lab(name: str | None) -> labmod.LabRecord:
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


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise L7LabError("no command given: l7lab exec POD -- COMMAND [ARGS...]")
    rec = _one_lab(args.lab)
    matches = [e for k, e in rec.endpoints.items() if k == args.pod or k.split("/")[-1] == args.pod]
    if len(matches) != 1:
        names = ", ".join(sorted(rec.endpoints))
        raise L7LabError(f"{'ambiguous' if matches else 'unknown'} endpoint {args.pod!r} in lab {rec.lab}; endpoints: {names}")
    from . import confine  # noqa: PLC0415

    # As the invoking user (or --user), in a mount namespace where the lab's control directory
    # is hidden: what a pod's own processes see (dataplane/confine.py, docs/security.md).
    user = confine.resolve_user(args.user) if args.user is not None else confine.invoking_user()
    os.execvp("ip", ["ip", "netns", "exec", matches[0].netns, *confine.command(user, [str(labmod.run_dir())], command)])
    return EXIT_SETUP  # not reached


def cmd_observe(args: argparse.Namespace) -> int:
    """Kernel flow records (from the lab agent) and L7 records (from the proxy), merged by time;
    with --last / --since it starts near the end of the files instead of reading them whole."""
    import time  # noqa: PLC0415

    from .flowrecord import record_type  # noqa: PLC0415
    from .flowrender import describe, json_line  # noqa: PLC0415
    from .flows import OBSERVE_TYPES, RecordTail  # noqa: PLC0415

    rec = _one_lab(args.lab)
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


# --- apply / delete / label (through the lab agent) ----------------------------------------------

_KIND_ALIASES = {"networkpolicy": "NetworkPolicy", "netpol": "NetworkPolicy",
                 "ciliumnetworkpolicy": "CiliumNetworkPolicy", "cnp": "CiliumNetworkPolicy",
                 "ciliumclusterwidenetworkpolicy": "CiliumClusterwideNetworkPolicy",
                 "ccnp": "CiliumClusterwideNetworkPolicy"}


def _change(lab: str | None, payload: dict[str, Any], as_json: bool) -> int:
    from . import agent  # noqa: PLC0415

    rec = _one_lab(lab)
    reply = agent.request(rec.lab, {"op": "change", **payload})
    if as_json:
        _emit_json(reply)
    if not reply.get("ok"):
        if not as_json:
            for err in reply.get("errors", []):
                _print_error(err)
            errconsole.print(f"lab {rec.lab}: nothing changed", soft_wrap=True)
        return EXIT_SETUP
    if not as_json:
        for name in reply["added"]:
            _say(f"applied {name}")
        for name in reply["removed"]:
            _say(f"deleted {name}")
        for warning in reply.get("warnings", []):
            errconsole.print(f"warning: {warning}", soft_wrap=True)
        _say(f"lab {rec.lab}: {len(reply['policies'])} policies in force, {reply['map_writes']} map entries written")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from . import limits  # noqa: PLC0415
    from .errors import SourceLocation  # noqa: PLC0415
    from .yamlsource import Budget, load_documents, read_source  # noqa: PLC0415

    # Each file is read only up to the size bound and parsed here within every bound first, so
    # that hostile YAML is refused before it reaches the lab's agent (which checks it again).
    files, total, budget = [], 0, Budget(what="one change")
    for path in args.files:
        text = read_source(path)
        total += len(text.encode("utf-8"))
        if total > limits.MAX_CHANGE_BYTES:
            raise SourceError(SourceLocation(path), f"the files of one apply together exceed the limit of "
                                                    f"{limits.MAX_CHANGE_BYTES} bytes")
        load_documents(text, path, budget)
        files.append({"path": path, "text": text})
    return _change(args.lab, {"apply": files}, args.json)


def cmd_delete(args: argparse.Namespace) -> int:
    kind = _KIND_ALIASES.get(args.kind.lower())
    if kind is None:
        raise L7LabError(f"unknown policy kind {args.kind!r}: expected NetworkPolicy (netpol), "
                         "CiliumNetworkPolicy (cnp) or CiliumClusterwideNetworkPolicy (ccnp)")
    namespace = "" if kind == "CiliumClusterwideNetworkPolicy" else (args.namespace or "default")
    return _change(args.lab, {"delete": [{"kind": kind, "name": args.name, "namespace": namespace}]}, args.json)


def cmd_label(args: argparse.Namespace) -> int:
    target = {"pod": "pod", "pods": "pod", "po": "pod", "namespace": "namespace", "namespaces": "namespace",
              "ns": "namespace"}.get(args.target.lower())
    if target is None:
        raise L7LabError(f"label: expected 'pod' or 'namespace', got {args.target!r}")
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for item in args.labels:
        key, sep, value = item.partition("=")
        if sep and key:
            set_labels[key] = value
        elif item.endswith("-") and len(item) > 1 and not sep:
            remove.append(item[:-1])
        else:
            raise L7LabError(f"label: expected KEY=VALUE or KEY- (to remove), got {item!r}")
    name = args.name
    if target == "pod" and "/" not in name:  # a short pod name, as `exec` takes, if it is unique
        rec = _one_lab(args.lab)
        matches = [k for k, e in rec.endpoints.items() if e.kind == "pod" and k.split("/")[-1] == name]
        if len(matches) != 1:
            raise L7LabError(f"label: {'ambiguous' if matches else 'unknown'} pod {name!r} in lab {rec.lab}; "
                             f"pods: {', '.join(sorted(k for k, e in rec.endpoints.items() if e.kind == 'pod'))}")
        name = matches[0]
    return _change(args.lab, {"relabel": [{"target": target, "name": name, "set": set_labels,
                                           "remove": remove}]}, args.json)


# --- run ---------------------------------------------------------------------------------------


def _print_report(report: RunReport) -> None:
    table = Table(title=_cell(f"{report.scenario} ({report.mode})"), title_justify="left")
    for col in ("step", "from", "to", "request", "expected", "observed", "result"):
        table.add_column(col, overflow="fold")
    if any(r.oracle is not None for r in report.results):
        table.add_column("oracle")
    kernel = any(r.kernel for r in report.results)
    if kernel:
        table.add_column("kernel", overflow="fold")
    for r in report.results:
        row = [str(r.step + 1), r.probe.source, f"{r.probe.destination} {r.probe.protocol}", r.probe.request_text,
               r.probe.expect, r.observed.outcome + (f" ({r.observed.detail})" if r.observed.detail and not r.passed else ""),
               Text("pass", style="green") if r.passed else Text(r.verdict_text, style="bold red")]
        if r.oracle is not None or any(x.oracle is not None for x in report.results):
            row.append(r.oracle or "")
        if kernel:
            row.append(r.kernel or "")
        table.add_row(*map(_cell, row))
    console.print(table)
    total = len(report.results)
    if report.passed:
        _say(f"all {total} probes met their expectations", style="green")
    else:
        _say(f"{report.failed} of {total} probes did not meet their expectations", style="bold red")


def _keep(lab: labmod.Lab) -> None:
    """`run --keep`: an agent takes the lab over (its maps stay readable and changeable)."""
    from . import agent  # noqa: PLC0415

    try:
        pid = agent.adopt(lab)
    except L7LabError as exc:
        errconsole.print(f"lab {lab.name} kept up without an agent ({exc}): it enforces its last policy; "
                         f"'l7lab down {lab.name}' removes it", soft_wrap=True)
        return
    errconsole.print(f"lab {lab.name} kept up (agent pid {pid}): 'l7lab observe {lab.name}' shows its flows, "
                     f"'l7lab down {lab.name}' removes it", soft_wrap=True)


def cmd_run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    if args.dry_run:
        report = run_scenario(scenario, OracleExecutor(_policy_engine(scenario)))
    else:
        policy = _policy_engine(scenario)  # every policy is valid before anything is built
        labmod.check_environment()
        with _datapath(scenario) as datapath:
            lab = labmod.Lab(scenario, args.name, datapath=datapath, policy=policy)
            lab.up()
            try:
                report = run_scenario(scenario, KernelExecutor(lab, policy), lab.name)
            finally:
                if args.keep:
                    _keep(lab)
                else:
                    lab.down()
    if args.json:
        _emit_json(report.to_json())
    else:
        _print_report(report)
    return EXIT_OK if report.passed else EXIT_EXPECTATION


# --- validate / explain ------------------------------------------------------------------------


def _is_scenario(path: str) -> bool:
    """A scenario: one mapping without apiVersion and kind. An empty file (no document at all)
    counts as one, so that `validate` rejects it with the error `run` gives."""
    from .yamlsource import load_file  # noqa: PLC0415

    docs = load_file(path)
    if not docs:
        return True
    return len(docs) == 1 and isinstance(docs[0].data, dict) and "apiVersion" not in docs[0].data and "kind" not in docs[0].data


def cmd_validate(args: argparse.Namespace) -> int:
    from .policy import validate_policy_file  # noqa: PLC0415

    results: dict[str, list[str]] = {}
    for path in args.files:
        errors: list[BaseException] = []
        try:
            if _is_scenario(path):
                _policy_engine(load_scenario(path))  # the scenario and every policy it applies
            else:
                errors.extend(validate_policy_file(path))
        except (SourceError, ErrorList) as exc:
            errors.extend(exc.errors if isinstance(exc, ErrorList) else [exc])
        results[path] = [str(e) for e in errors]
    if args.json:
        _emit_json({"valid": not any(results.values()), "files": results})
    else:
        for path, errors in results.items():
            if errors:
                for e in errors:
                    _print_error(e)
            else:
                _say(f"{path}: valid")
    return EXIT_SETUP if any(results.values()) else EXIT_OK


def _parse_http(text: str | None, headers: list[str]) -> Any:
    """The request `explain` checks. What the L7 proxy would answer 400 Bad Request (a method
    or header name that is not an HTTP token, a control character in a value) is refused here
    with the reason: no policy verdict applies to a request the proxy never parses."""
    from l7.http import HTTP_TOKEN_CHARS, is_header_value, is_http_token  # noqa: PLC0415
    from .scenario import HttpRequest  # noqa: PLC0415

    if text is None:
        if headers:
            raise L7LabError("--header needs --http: headers belong to an HTTP request")
        return None
    parts = text.split()
    if len(parts) != 2:
        raise L7LabError(f"--http expects 'METHOD /path', got {text!r}")
    if not is_http_token(parts[0]):
        raise L7LabError(f"--http {text!r}: the method {parts[0]!r} is not an HTTP token ({HTTP_TOKEN_CHARS}); "
                         "the L7 proxy answers such a request 400 Bad Request")
    hdrs = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep:
            raise L7LabError(f"--header expects 'Name: value', got {h!r}")
        if not is_http_token(name):
            raise L7LabError(f"--header {h!r}: {name!r} is not a valid header name (an HTTP token: "
                             f"{HTTP_TOKEN_CHARS}, no spaces): the request is malformed, and the L7 proxy "
                             "answers it 400 Bad Request")
        if not is_header_value(value):
            raise L7LabError(f"--header {h!r}: the value has a control character; the L7 proxy answers "
                             "such a request 400 Bad Request")
        hdrs[name] = value.strip(" \t")
    return HttpRequest(parts[0], parts[1], hdrs)


def cmd_explain(args: argparse.Namespace) -> int:
    from .policy import Flow, explain_text  # noqa: PLC0415
    from .scenario import make_probe  # noqa: PLC0415

    scenario = load_scenario(args.scenario)
    engine = _policy_engine(scenario)
    last = len(scenario.steps) if args.step is None else args.step - 1
    if not 0 <= last <= len(scenario.steps):
        raise L7LabError(f"--step must be between 1 and {len(scenario.steps) + 1}, got {args.step}")
    for step in scenario.steps[:last]:
        if step.kind != "probes":
            engine.apply_step(step)
    dns = None
    if args.dns:
        if args.http:
            raise L7LabError("--http and --dns exclude each other: a flow is an HTTP request or a DNS query")
        from .scenario import DnsQuery  # noqa: PLC0415

        dns = DnsQuery(args.dns.rstrip(".").lower())
    protocol = args.protocol or ("UDP" if dns else "TCP")
    probe = make_probe(scenario, args.source, args.to, protocol, _parse_http(args.http, args.header), dns=dns)
    decision = engine.verdict(Flow.from_probe(probe))
    if args.json:
        _emit_json(decision.to_json())
    else:
        _say(explain_text(decision))
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l7lab",
        description="Kubernetes and Cilium network policy on a real Linux kernel: pods in network "
                    "namespaces, L3/L4 verdicts in eBPF, L7 rules in an HTTP proxy.",
        epilog="exit codes: 0 ok, 1 setup or input error, 2 usage error, 3 a probe missed its expectation")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(verb_parser=p)
        return p

    def lab_arguments(p: argparse.ArgumentParser, help_text: str) -> None:
        """The lab as a positional argument or as --lab, as every verb that takes one accepts it."""
        p.add_argument("lab", nargs="?", help=f"{help_text} (or --lab)")
        p.add_argument("--lab", dest="lab_option", metavar="LAB", help=help_text)

    p = verb("up", "build a scenario's lab (namespaces, links, servers) and leave it running")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--name", help="lab name (default: the scenario's name)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback only, e.g. 127.0.0.1:9464)")
    p.set_defaults(func=cmd_up)

    p = verb("down", "remove a lab: everything its record lists, then anything with its prefix")
    lab_arguments(p, "the lab to remove")
    p.add_argument("--all", action="store_true", help="remove every lab on this machine")
    p.set_defaults(func=cmd_down)

    p = verb("clean", "remove whatever carries a lab's prefix, with or without a record")
    lab_arguments(p, "the lab to remove")
    p.add_argument("--all", action="store_true", help="remove whatever carries the l7lab prefix, every lab")
    p.set_defaults(func=cmd_clean)

    p = verb("status", "list running labs with their endpoints, addresses and ports")
    lab_arguments(p, "only this lab")
    p.set_defaults(func=cmd_status)

    p = verb("exec", "run a command inside a pod or world host, as the invoking user with the lab's control "
                     "directory hidden: l7lab exec POD -- CMD...", json_flag=False)
    p.add_argument("--lab", help="lab name (needed when several labs are up)")
    p.add_argument("--user", metavar="NAME|UID",
                   help="run as this user (default: the invoking user, the one behind sudo if run through sudo)")
    p.add_argument("pod", help="pod (name or namespace/name) or world host")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments, after --")
    p.set_defaults(func=cmd_exec)

    p = verb("run", "bring a lab up, run its steps, print every probe against its expectation, take it down")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--name", help="lab name (default: the scenario's name)")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--dry-run", action="store_true", help="answer every probe with the policy oracle alone (no root, no kernel)")
    p.set_defaults(func=cmd_run)

    p = verb("observe", "print a running lab's flows: the kernel's L3/L4 verdicts and the proxy's L7 records")
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
    p.set_defaults(func=cmd_observe)

    p = verb("apply", "apply policy manifests to a running lab (all or nothing)")
    p.add_argument("files", nargs="+", metavar="FILE", help="NetworkPolicy / CiliumNetworkPolicy / CCNP YAML")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")
    p.set_defaults(func=cmd_apply)

    p = verb("delete", "delete a policy from a running lab: l7lab delete cnp NAME -n NAMESPACE")
    p.add_argument("kind", help="NetworkPolicy (netpol), CiliumNetworkPolicy (cnp) or CiliumClusterwideNetworkPolicy (ccnp)")
    p.add_argument("name", help="the policy's metadata.name")
    p.add_argument("-n", "--namespace", help="the policy's namespace (default: default; none for ccnp)")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")
    p.set_defaults(func=cmd_delete)

    p = verb("label", "change a pod's or namespace's labels in a running lab: l7lab label pod NS/NAME k=v k-")
    p.add_argument("target", metavar="pod|namespace")
    p.add_argument("name", help="NAMESPACE/POD or NAMESPACE")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-", help="set a label, or remove it with a trailing -")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")
    p.set_defaults(func=cmd_label)

    p = verb("validate", "check scenario and policy files; report every error found")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = verb("explain", "show, step by step, the verdict the policy gives a flow and why")
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--from", dest="source", required=True, metavar="POD", help="source pod")
    p.add_argument("--to", required=True, metavar="DEST[:PORT]", help="pod, world host or DNS name, with an optional port")
    p.add_argument("--protocol", choices=("TCP", "UDP"), help="default TCP (UDP with --dns)")
    p.add_argument("--http", metavar="'METHOD /path'", help="an HTTP request to check against L7 rules")
    p.add_argument("--header", action="append", default=[], metavar="'Name: value'", help="request header (repeatable)")
    p.add_argument("--dns", metavar="NAME", help="a DNS query for NAME (over UDP) to check against DNS rules")
    p.add_argument("--step", type=int, help="the policy state before step N (default: after every step)")
    p.set_defaults(func=cmd_explain)
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
        return _error(exc)
    except KeyboardInterrupt:
        errconsole.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
