"""The `run` verb: bring a scenario's lab up (or, with --dry-run, only the policy oracle), run
its steps, print every probe against its expectation, and take the lab down or hand it to an
agent (--keep). With --explain, each probe that missed its expectation is followed by the
oracle's reasoning (beside the kernel's trace summary when the probe was traced)."""

from __future__ import annotations

import argparse
from itertools import zip_longest

from rich.table import Table
from rich.text import Text

from .. import lab as labmod
from ..errors import L7LabError
from ..runner import KernelExecutor, OracleExecutor, ProbeResult, RunReport, run_scenario
from ..scenario import load_scenario
from .common import (EXIT_EXPECTATION, EXIT_OK, Verbs, cell, console, emit_json, errconsole, load_datapath,
                     policy_engine, say)


def _print_report(report: RunReport) -> None:
    table = Table(title=cell(f"{report.scenario} ({report.mode})"), title_justify="left")
    for col in ("step", "from", "to", "request", "expected", "observed", "result"):
        table.add_column(col, overflow="fold")
    if any(r.oracle is not None for r in report.results):
        table.add_column("oracle")
    kernel = any(r.kernel for r in report.results)
    if kernel:
        table.add_column("kernel", overflow="fold")
    for r in report.results:
        row = [str(r.step + 1), r.probe.source, f"{r.probe.destination} {r.probe.protocol}", r.probe.request_text,
               r.probe.expect, r.outcome + (f" ({r.observed.detail})" if r.observed.detail and not r.passed else ""),
               Text("pass", style="green") if r.passed else Text(r.verdict_text, style="bold red")]
        if r.oracle is not None or any(x.oracle is not None for x in report.results):
            row.append(r.oracle or "")
        if kernel:
            row.append(r.kernel or "")
        table.add_row(*map(cell, row))
    console.print(table)
    total = len(report.results)
    if report.passed:
        say(f"all {total} probes met their expectations", style="green")
    else:
        say(f"{report.failed} of {total} probes did not meet their expectations", style="bold red")


def probe_title(r: ProbeResult) -> str:
    """One line naming a probe and what it missed: the title of its explanation."""
    p = r.probe
    return (f"step {r.step + 1}: {p.source} -> {p.destination} {p.protocol} {p.request_text}: "
            f"expected {p.expect}, observed {r.outcome}"
            + (f", oracle {r.oracle}" if r.disagrees else ""))


def trace_lines(r: ProbeResult) -> list[str]:
    """The kernel's side of an explanation: the trace's summary, or why there is none."""
    if r.trace is not None:
        return [*r.trace.summary(), f"hint: {r.trace.hint()}"]
    return [f"no trace: {r.trace_error}"] if r.trace_error else []


def print_explanation(r: ProbeResult, kernel: bool) -> None:
    """The kernel's trace summary and the oracle's reasoning in two columns (the oracle's alone
    in a dry run)."""
    from ..policy import explain_text  # noqa: PLC0415 - the policy layer is loaded only when needed

    reasoning = explain_text(r.reasoning).splitlines() if r.reasoning is not None else []
    table = Table(title=cell(probe_title(r)), title_justify="left", show_lines=False)
    if kernel:
        table.add_column("kernel (the probe traced again)", overflow="fold", ratio=1)
    table.add_column("oracle (the policy's reasoning)", overflow="fold", ratio=1)
    if kernel:
        for left, right in zip_longest(trace_lines(r), reasoning, fillvalue=""):
            table.add_row(cell(left), cell(right))
    else:
        for line in reasoning:
            table.add_row(cell(line))
    console.print(table)


def _keep(lab: labmod.Lab) -> None:
    """`run --keep`: an agent takes the lab over (its maps stay readable and changeable)."""
    from .. import agent  # noqa: PLC0415

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
        report = run_scenario(scenario, OracleExecutor(policy_engine(scenario)), explain=args.explain)
    else:
        policy = policy_engine(scenario)  # every policy is valid before anything is built
        labmod.check_environment()
        with load_datapath(scenario) as datapath:
            lab = labmod.Lab(scenario, args.name, datapath=datapath, policy=policy)
            lab.up()
            try:
                report = run_scenario(scenario, KernelExecutor(lab, policy), lab.name, explain=args.explain)
            finally:
                if args.keep:
                    _keep(lab)
                else:
                    lab.down()
    if args.json:
        emit_json(report.to_json())
    else:
        _print_report(report)
        for r in report.results:
            if r.explained:
                print_explanation(r, kernel=r.trace is not None or r.trace_error is not None)
    return EXIT_OK if report.passed else EXIT_EXPECTATION


def register(verbs: Verbs) -> None:
    """Add run."""
    p = verbs.add("run", "bring a lab up, run its steps, print every probe against its expectation, take it down", cmd_run)
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--name", help="lab name (default: the scenario's name)")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--dry-run", action="store_true", help="answer every probe with the policy oracle alone (no root, no kernel)")
    p.add_argument("--explain", action="store_true",
                   help="for each probe that misses its expectation, print the kernel's trace of it (the probe sent "
                        "again with tracing on) beside the oracle's reasoning, taken right after the probe's "
                        "step, before the next step changes the policy")
