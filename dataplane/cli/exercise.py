"""The `check` verb: run an exercise (a scenario whose probes are the answer key) against the
learner's policies and say whether it is solved; for each probe not met yet, a hint from the
kernel's trace of that probe and the oracle's reason. Exit 0 solved, 3 not yet, 1 setup error."""

from __future__ import annotations

import argparse

from rich.text import Text

from .. import lab as labmod
from ..exercise import Grade, grade, load_exercise
from ..runner import KernelExecutor, OracleExecutor, run_scenario
from .common import EXIT_EXPECTATION, EXIT_OK, Verbs, console, emit_json, load_datapath, policy_engine, say


def _print_grade(result: Grade, policy_file: str | None) -> None:
    which = f" with {policy_file}" if policy_file else ""
    if result.solved:
        say(f"{result.exercise}{which}: solved: all {result.probes} probes met their expectations ({result.mode})",
            style="bold green")
        return
    say(f"{result.exercise}{which}: not yet: {len(result.misses)} of {result.probes} probes missed their "
        f"expectations ({result.mode})", style="bold red")
    for miss in result.misses:
        r, p = miss.result, miss.result.probe
        console.print()
        say(f"step {r.step + 1} ({r.step_name}): {p.source} -> {p.destination} {p.protocol} {p.request_text}: "
            f"expected {p.expect}, got {r.outcome}"
            + (f" (the oracle says {r.oracle}: kernel and oracle disagree)" if r.disagrees else "") + f"  [{p.location}]")
        console.print(Text.assemble(("  hint: ", "bold"), miss.hint), soft_wrap=True)
        if miss.reason and miss.reason != miss.hint:
            console.print(Text.assemble(("  oracle: ", "bold"), miss.reason), soft_wrap=True)


def cmd_check(args: argparse.Namespace) -> int:
    if args.name is not None:
        labmod.validate_lab_name(args.name)
    scenario = load_exercise(args.exercise, args.policy)
    engine = policy_engine(scenario)  # every policy is valid before anything is built
    if args.dry_run:
        report = run_scenario(scenario, OracleExecutor(engine), explain=True)
    else:
        labmod.check_environment()
        with load_datapath(scenario) as datapath:
            with labmod.Lab(scenario, args.name, datapath=datapath, policy=engine) as lab:
                report = run_scenario(scenario, KernelExecutor(lab, engine), lab.name, explain=True)
    result = grade(report, engine)
    if args.json:
        emit_json(result.to_json() | {"policy_file": args.policy})
    else:
        _print_grade(result, args.policy)
    return EXIT_OK if result.solved else EXIT_EXPECTATION


def register(verbs: Verbs) -> None:
    """Add check."""
    p = verbs.add("check", "check an exercise: run its answer-key probes against your policies, say solved or "
                           "not yet, with a hint for each probe not met", cmd_check)
    p.add_argument("exercise", metavar="EXERCISE.yaml", help="exercise file (exercises/*.yaml)")
    p.add_argument("--policy", metavar="FILE",
                   help="your policy file, in place of the one the exercise names (its inline policies stay)")
    p.add_argument("--name", help="lab name (default: the exercise's name)")
    p.add_argument("--dry-run", action="store_true",
                   help="answer every probe with the policy oracle alone (no root, no kernel; the hint is the oracle's)")
