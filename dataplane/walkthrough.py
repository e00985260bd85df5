"""The walkthrough format: Markdown lessons whose command blocks carry the output the commands
printed, read, written back and compared (pure: no process is run here; walkthroughrun.py runs
them).

A walkthrough is prose around *command blocks*. A command block is a fenced block (``` or ~~~)
whose first non-blank line starts with `$ `. In it, every line starting with `$ ` is a command
(a line ending in a backslash continues it on the next line, as in a shell), and the lines
after it, up to the next command, are what it printed, stdout and stderr together as a terminal
shows them. A command that exited with a status other than 0 ends its output with the line
`[exit N]`. Every other fenced block (YAML, a sketch) is prose and is never run.

Recorded output is compared after normalization: what changes from run to run (times, dates,
durations, process ids, ephemeral ports, uuids) is replaced by a placeholder and trailing
blanks are dropped, so only what a learner should see stay the same is compared.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = "$ "
EXIT_LINE_RE = re.compile(r"\[exit (\d+)\]")
_FENCE_RE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class WalkthroughError(Exception):
    """A walkthrough file that cannot be read as one: names the file, the line and the problem."""


@dataclass
class Command:
    """One `$ ` command of a block, with what it printed when it was last run."""

    text: str  # as typed, continuation lines included (joined with newlines)
    output: list[str] = field(default_factory=list)  # printed lines, without the `[exit N]` line
    exit_code: int = 0
    line: int = 0  # 1-based line of the `$ ` in the file

    def transcript(self) -> list[str]:
        """The command and its output as the block shows them."""
        lines = [PROMPT + first if i == 0 else first for i, first in enumerate(self.text.split("\n"))]
        lines += self.output
        if self.exit_code:
            lines.append(f"[exit {self.exit_code}]")
        return lines


@dataclass
class Block:
    """A command block: its fence lines as written and its commands."""

    opening: str
    closing: str
    commands: list[Command]
    line: int  # 1-based line of the opening fence


@dataclass
class Walkthrough:
    """A parsed walkthrough: the text between command blocks kept verbatim, and the blocks."""

    path: Path
    parts: list[str | Block]

    @property
    def blocks(self) -> list[Block]:
        return [p for p in self.parts if isinstance(p, Block)]

    @property
    def commands(self) -> list[Command]:
        return [c for b in self.blocks for c in b.commands]

    def render(self) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            body = [line for c in part.commands for line in c.transcript()]
            out.append("\n".join([part.opening, *body, part.closing]) + "\n")
        return "".join(out)


def _fenced(lines: list[str]) -> Iterator[tuple[int, int, str]]:
    """(index of opening fence, index of closing fence, fence) of every fenced block; an
    unclosed fence runs to the end of the file, as CommonMark reads it."""
    i = 0
    while i < len(lines):
        m = _FENCE_RE.match(lines[i])
        if m is None or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        fence = m.group("fence")
        end = i + 1
        while end < len(lines):
            close = _FENCE_RE.match(lines[end])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("info").strip():
                break
            end += 1
        yield i, end, fence
        i = end + 1


def _commands(body: list[str], first_line: int, where: str) -> list[Command]:
    commands: list[Command] = []
    i = 0
    while i < len(body):
        line = body[i]
        if not line.startswith(PROMPT):
            raise WalkthroughError(f"{where}:{first_line + i}: output before any command in a command block")
        text = [line[len(PROMPT):]]
        start = i
        while text[-1].endswith("\\") and i + 1 < len(body):
            i += 1
            text.append(body[i])
        i += 1
        output: list[str] = []
        while i < len(body) and not body[i].startswith(PROMPT):
            output.append(body[i])
            i += 1
        while output and not output[-1].strip():  # blank lines before the next command or the fence
            output.pop()
        exit_code = 0
        if output and (m := EXIT_LINE_RE.fullmatch(output[-1])):
            exit_code = int(m.group(1))
            output.pop()
        commands.append(Command("\n".join(text), output, exit_code, first_line + start))
    return commands


def parse(text: str, path: Path) -> Walkthrough:
    """The walkthrough in `text` (read from `path`, which errors name)."""
    lines = text.split("\n")
    parts: list[str | Block] = []
    done = 0  # lines[:done] are in parts
    for start, end, _fence in _fenced(lines):
        body = lines[start + 1:end]
        first = next((line for line in body if line.strip()), "")
        if not first.startswith(PROMPT):
            continue
        if end >= len(lines):
            raise WalkthroughError(f"{path}:{start + 1}: command block is never closed")
        skip = next(i for i, line in enumerate(body) if line.strip())
        commands = _commands(body[skip:], start + 2 + skip, str(path))
        parts.append("".join(line + "\n" for line in lines[done:start]))
        parts.append(Block(lines[start], lines[end], commands, start + 1))
        done = end + 1
    parts.append("\n".join(lines[done:]))
    return Walkthrough(path, [p for p in parts if p != ""])


def load(path: Path) -> Walkthrough:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WalkthroughError(f"{path}: cannot read it: {exc}") from exc
    walkthrough = parse(text, path)
    if not walkthrough.commands:
        raise WalkthroughError(f"{path}: no command block (a fenced block whose first line starts with '$ ')")
    return walkthrough


# What varies from run to run, each with its placeholder. Order matters: dates before times.
_ISO_TIME = r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
_HTTP_DATE = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT"
_HUBBLE_TIME = r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?"
_CLOCK = r"\b\d\d:\d\d:\d\d\.\d+\b"
_UNIX_TIME = r"\b1[5-9]\d{8}(?:\.\d+)?\b"  # 2017 to 2033, as a record's "time" may be written
_DURATION = r"\b\d+(?:\.\d+)?(?:ns|us|µs|ms|s| milliseconds| seconds)\b"
_UUID = r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
_PID = r"\b(pids?|process|agent pid|proxy pid|PID)( |: |\": )\d+\b"
_LATENCY = r"(\"latency_ns\": \"?)\d+"
# Linux's default ephemeral range (net.ipv4.ip_local_port_range 32768-60999), after a colon, a
# port field or the word "port" (`l7lab trace`: "client port 58633", "policy port 58633"): the
# client side of a connection. The lab's server ports are below it and stay.
_EPHEMERAL = (r"(?:(?<=:)|(?<=port\": )|(?<=port=)|(?<=port ))"
              r"(?:3276[89]|327[7-9]\d|32[89]\d\d|3[3-9]\d{3}|[45]\d{4}|60\d{3})\b")

# curl words one connect timeout two ways, depending on where its connect loop was when the
# time ran out: "Connection timed out after 501 milliseconds" and "Connection timeout after
# 499 ms". Both say the SYN got no answer: the first wording stands for both.
_CURL_CONNECT_TIMEOUT = r"curl: \(28\) Connection timeout after \d+ ms"

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(_CURL_CONNECT_TIMEOUT), "curl: (28) Connection timed out after 0 milliseconds"),
    (re.compile(_ISO_TIME), "<TIME>"),
    (re.compile(_HTTP_DATE), "<TIME>"),
    (re.compile(_HUBBLE_TIME), "<TIME>"),
    (re.compile(_CLOCK), "<TIME>"),
    (re.compile(_UUID), "<UUID>"),
    (re.compile(_LATENCY), r"\1<DURATION>"),
    (re.compile(_PID), r"\1\2<PID>"),
    (re.compile(_EPHEMERAL), "<PORT>"),
    (re.compile(_UNIX_TIME), "<TIME>"),
    (re.compile(_DURATION), "<DURATION>"),
]


def normalize_line(line: str) -> str:
    """One output line with what varies between runs replaced by placeholders."""
    for pattern, placeholder in _RULES:
        line = pattern.sub(placeholder, line)
    return line.rstrip()


def normalize(lines: list[str]) -> list[str]:
    out = [normalize_line(line) for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def comparable(command: Command) -> list[str]:
    """What check compares for a command: its text, its normalized output, its exit status."""
    return Command(command.text, normalize(command.output), command.exit_code).transcript()


def scenarios_named(command: Command) -> list[str]:
    """The scenario files (scenarios/*.yaml) a command names, as written."""
    try:
        words = shlex.split(command.text.replace("\\\n", " "))
    except ValueError:
        return []
    return [w for w in words if re.fullmatch(r"(?:\./)?scenarios/[^/]+\.ya?ml", w)]


def lab_starts(command: Command) -> list[tuple[str, str | None]]:
    """(scenario, --name or None) for each `l7lab up` / `l7lab run --keep` in the command: the labs
    it leaves running. A pipeline or list of commands is split on its operators."""
    try:
        lexer = shlex.shlex(command.text.replace("\\\n", " "), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return []
    found: list[tuple[str, str | None]] = []
    simple: list[str] = []
    for word in [*words, ";"]:
        if word not in (";", "&&", "||", "|", "&"):
            simple.append(word)
            continue
        if len(simple) >= 3 and Path(simple[0]).name == "l7lab" and (
                simple[1] == "up" or (simple[1] == "run" and "--keep" in simple)):
            name = next((simple[i + 1] for i, w in enumerate(simple[:-1]) if w == "--name"), None)
            name = name or next((w.split("=", 1)[1] for w in simple if w.startswith("--name=")), None)
            scenario = next((w for w in simple[2:] if w.endswith((".yaml", ".yml"))), None)
            if scenario is not None:
                found.append((scenario, name))
        simple = []
    return found


_POINTER_RE = re.compile(r"\bcode (\S+):(\d+)\b")
_CITATION_RE = re.compile(r"`(?P<file>[\w./-]+\.(?:c|h|py))?:(?P<line>\d+)`")


def stale_code_citations(walkthrough: Walkthrough) -> list[str]:
    """Code lines the prose cites (`from_container.c:76`, or `:91` for the file cited last) that
    no recorded output points at: the prose explains a trace whose pointers move whenever the
    code does, so a citation the output no longer shows is out of date."""
    pointers = {(path, int(line)) for c in walkthrough.commands for out in c.output
                for path, line in _POINTER_RE.findall(out)}
    stale: list[str] = []
    last_file = ""
    for part in walkthrough.parts:
        if not isinstance(part, str):
            continue
        for m in _CITATION_RE.finditer(part):
            last_file = m.group("file") or last_file
            if not last_file:
                continue
            line = int(m.group("line"))
            if not any(p == last_file or p.endswith("/" + last_file) for p, n in pointers if n == line):
                stale.append(f"{last_file}:{line}")
    return stale
