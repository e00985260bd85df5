"""Running walkthroughs: every command of a walkthrough, in order, on a real lab, then `check`
(compare with the recorded output, a unified diff when it differs) or `regenerate` (write what
the commands printed back into the file). The command line is scripts/walkthroughs.py.

Each command runs with bash from the repository root, as a learner would type it there:
`l7lab` on PATH is this checkout's (a small launcher running `python -m dataplane.cli` with
the interpreter running this module), rich tables are printed at a fixed width with no color,
stdout and stderr go to one pipe in the order they were written.

A walkthrough brings its labs up itself (`l7lab up`, `l7lab run --keep`) and ends with them
down. Before anything runs, none of those labs may be up already; a command that should bring
one up and fails (somebody else's lab of that name came up in between, say) stops the
walkthrough there. Afterwards, whatever happened, every lab the walkthrough brought up and that
is still up is taken down (never another), and a walkthrough that left one up fails its check.

Exit codes: 0 every walkthrough matches (or was written), 3 some recorded output differs (or a
walkthrough left a lab up), 1 a setup error (a file that is no walkthrough, a lab in the way,
a command that hung).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import timescale
from . import walkthrough as wt

REPO = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_SETUP, EXIT_MISMATCH = 0, 1, 3
WIDTH = 160  # the project's own width for tables printed to a file (dataplane/cli/common.py)
# Seconds of an ordinary machine, scaled to this one at use (dataplane/timescale.py).
COMMAND_TIMEOUT = 300.0  # a whole `l7lab run` of a scenario fits in far less
# `observe` reads what the lab's agent has recorded so far, and the agent writes a flow a moment
# after the traffic that made it: a read-only command of this kind is read again, until it
# prints the recorded output or this deadline passes.
SETTLE_SECONDS = 15.0
SETTLING = ("l7lab observe",)
FIRST_SETTLE_SECONDS = 2.0


class SetupError(Exception):
    """The walkthrough could not be run as written (exit 1)."""


@dataclass
class Outcome:
    path: Path
    status: str  # "match", "mismatch", "written", "error"
    diff: str = ""
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"match": EXIT_OK, "written": EXIT_OK, "mismatch": EXIT_MISMATCH}.get(self.status, EXIT_SETUP)

    def to_json(self) -> dict[str, object]:
        return {"file": str(self.path), "status": self.status, "diff": self.diff, "messages": self.messages}


@contextmanager
def command_environment() -> Iterator[dict[str, str]]:
    """The environment commands run in, with this checkout's `l7lab` first on PATH."""
    with tempfile.TemporaryDirectory(prefix="l7lab-walkthrough-") as bindir:
        launcher = Path(bindir) / "l7lab"
        launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dataplane.cli "$@"\n')
        launcher.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
        env.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                   PYTHONPATH=str(REPO), COLUMNS=str(WIDTH), NO_COLOR="1", TERM="dumb",
                   PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        yield env


def run_command(command: wt.Command, env: dict[str, str]) -> tuple[list[str], int]:
    """What the command printed (stdout and stderr interleaved as written) and its exit status."""
    try:
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=REPO, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timescale.scaled(COMMAND_TIMEOUT), check=False)
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"line {command.line}: `{command.text}` did not finish in {timescale.scaled(COMMAND_TIMEOUT):.0f} s") from exc
    text = done.stdout.decode("utf-8", errors="replace").replace("\r\n", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines, done.returncode


def _settles(command: wt.Command) -> bool:
    text = command.text.strip()
    return text.startswith(SETTLING) and "--follow" not in text and " -f" not in text


def command_labs(command: wt.Command) -> list[str]:
    """The labs one command brings up and leaves running: `--name`, else the scenario's own `name`."""
    names: list[str] = []
    for scenario, name in wt.lab_starts(command):
        if name is None:
            path = REPO / scenario
            try:
                document = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise SetupError(f"line {command.line}: cannot read the lab's name from {scenario}: {exc}") from exc
            name = document.get("name") if isinstance(document, dict) else None
            if not isinstance(name, str):
                raise SetupError(f"line {command.line}: {scenario} has no 'name'")
        names.append(name)
    return names


def lab_names(walkthrough: wt.Walkthrough) -> list[str]:
    """The labs the walkthrough's commands leave running, in order."""
    names: list[str] = []
    for command in walkthrough.commands:
        names += [name for name in command_labs(command) if name not in names]
    return names


def labs_up() -> set[str]:
    from . import lab as labmod  # noqa: PLC0415 - netlink, only when running

    return set(labmod.running_labs())


def execute(walkthrough: wt.Walkthrough, recorded: dict[int, list[str]] | None = None) -> tuple[list[wt.Command], list[str]]:
    """Every command run in order: (the commands with what they printed now, the labs the
    walkthrough left up, which were taken down). `recorded` (command index -> comparable lines)
    lets a settling command be read again until it prints what was recorded."""
    names = lab_names(walkthrough)
    in_the_way = sorted(set(names) & labs_up())
    if in_the_way:
        raise SetupError(f"lab {', '.join(in_the_way)} is already up; this walkthrough brings it up itself: "
                         f"take it down first (l7lab down {in_the_way[0]})")
    results: list[wt.Command] = []
    left_up: list[str] = []
    brought_up: list[str] = []  # only these are ever taken down here
    with command_environment() as env:
        try:
            for index, command in enumerate(walkthrough.commands):
                done = _run_settled(command, env, (recorded or {}).get(index))
                results.append(done)
                starts = command_labs(command)
                if starts and done.exit_code:
                    # Somebody else's lab of that name may have come up since the check above:
                    # nothing after this command may run, and nothing of that lab is touched.
                    tail = "\n    ".join(done.output[-3:])
                    raise SetupError(f"line {command.line}: `{command.text}` did not bring lab {', '.join(starts)} up "
                                     f"(exit {done.exit_code}); nothing after it was run:\n    {tail}")
                brought_up += [name for name in starts if name not in brought_up]
        finally:
            up = labs_up()
            for name in brought_up:
                if name in up:
                    left_up.append(name)
                    subprocess.run(["l7lab", "down", name], cwd=REPO, env=env, capture_output=True, check=False)
    return results, left_up


def _run_settled(command: wt.Command, env: dict[str, str], expected: list[str] | None) -> wt.Command:
    if _settles(command) and (expected is None or expected == wt.Command(command.text).transcript()):
        # Nothing recorded yet to wait for: give the agent a moment, then take what it has.
        time.sleep(timescale.scaled(FIRST_SETTLE_SECONDS))
        expected = None
    deadline = time.monotonic() + (timescale.scaled(SETTLE_SECONDS) if expected is not None else 0)
    while True:
        started = time.monotonic()
        output, code = run_command(command, env)
        if os.environ.get("L7LAB_WALKTHROUGH_TIMES"):
            print(f"  {time.monotonic() - started:6.2f} s  {command.text}", file=sys.stderr, flush=True)
        now = wt.Command(command.text, output, code, command.line)
        if not _settles(command) or wt.comparable(now) == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.3)


def _transcript(commands: list[wt.Command]) -> list[str]:
    return [line for c in commands for line in wt.comparable(c)]


def check(path: Path) -> Outcome:
    """Run the walkthrough and compare every command's normalized output with the recorded one."""
    try:
        walkthrough = wt.load(path)
        recorded = {i: wt.comparable(c) for i, c in enumerate(walkthrough.commands)}
        results, left_up = execute(walkthrough, recorded)
    except (wt.WalkthroughError, SetupError) as exc:
        return Outcome(path, "error", messages=[f"{path}: {exc}" if isinstance(exc, SetupError) else str(exc)])
    diff = "".join(difflib.unified_diff([line + "\n" for line in _transcript(walkthrough.commands)],
                                        [line + "\n" for line in _transcript(results)],
                                        f"{path} (recorded)", f"{path} (this run)"))
    messages = [f"{path}: left lab {name} up (taken down now): end the walkthrough with `l7lab down {name}`"
                for name in left_up]
    return Outcome(path, "mismatch" if diff or left_up else "match", diff, messages)


def regenerate(path: Path) -> Outcome:
    """Run the walkthrough and write what every command printed into its block. A command whose
    output matches the recorded one after normalization keeps the recorded text, so the file
    changes only where the lab's answer changed."""
    try:
        walkthrough = wt.load(path)
        recorded = {i: wt.comparable(c) for i, c in enumerate(walkthrough.commands)}
        results, left_up = execute(walkthrough, recorded)
    except (wt.WalkthroughError, SetupError) as exc:
        return Outcome(path, "error", messages=[f"{path}: {exc}" if isinstance(exc, SetupError) else str(exc)])
    messages = [f"{path}:{c.line}: `{c.text}` exited with {c.exit_code}" for c in results if c.exit_code]
    if left_up:
        messages += [f"{path}: left lab {name} up (taken down now): end the walkthrough with `l7lab down {name}`"
                     for name in left_up]
        return Outcome(path, "mismatch", messages=messages + [f"{path}: not written"])
    for old, new in zip(walkthrough.commands, results):
        if wt.comparable(old) != wt.comparable(new):
            old.output, old.exit_code = new.output, new.exit_code
    text = walkthrough.render()
    if any(line.lstrip().startswith(("```", "~~~")) for c in results for line in c.output):
        return Outcome(path, "error", messages=[*messages, f"{path}: a command printed a code fence; not written"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return Outcome(path, "written", messages=messages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/walkthroughs.py",
        description="Run walkthroughs (docs/walkthroughs/*.md) on real labs: check that their recorded output "
                    "still matches, or regenerate it.",
        epilog="exit codes: 0 match / written, 1 setup error, 2 usage error, 3 recorded output differs")
    parser.add_argument("action", choices=("check", "regenerate"))
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: walkthroughs run real labs: run this as root", file=sys.stderr)
        return EXIT_SETUP
    outcomes: list[Outcome] = []
    for path in args.files:
        outcome = (check if args.action == "check" else regenerate)(path)
        outcomes.append(outcome)
        if args.json:
            print(json.dumps(outcome.to_json()), flush=True)
            continue
        print(f"{path}: {outcome.status}", flush=True)
        for message in outcome.messages:
            print(f"  {message}", flush=True)
        if outcome.diff:
            sys.stdout.write(outcome.diff)
            sys.stdout.flush()
    codes = {o.exit_code for o in outcomes}
    return EXIT_SETUP if EXIT_SETUP in codes else max(codes)
