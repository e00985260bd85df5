"""The walkthrough format (dataplane/walkthrough.py): which fenced blocks are command blocks, how
commands, output and exit statuses are read and written back, what normalization replaces and
what it keeps, and which labs a command leaves running."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane import walkthrough as wt

DOC = """\
# A lesson

Some prose with `$ inline` code.

```sh
# shown, never run: the block's first line is not a prompt
$ l7lab down --all
```

```yaml
name: x
$ not a command either
```

```console
$ l7lab up scenarios/retail.yaml
lab retail is up
$ l7lab exec --lab retail frontend-app -- curl -sS -m 0.5 \\
    http://inventory-api:8080/
curl: (28) Connection timed out after 500 milliseconds
[exit 28]

$ true
```

More prose.
~~~
$ echo tilde
tilde
~~~
"""


def test_only_blocks_that_start_with_a_prompt_are_command_blocks() -> None:
    doc = wt.parse(DOC, Path("lesson.md"))
    assert [b.line for b in doc.blocks] == [15, 27]
    assert [c.text for c in doc.commands] == [
        "l7lab up scenarios/retail.yaml",
        "l7lab exec --lab retail frontend-app -- curl -sS -m 0.5 \\\n    http://inventory-api:8080/",
        "true",
        "echo tilde",
    ]


def test_output_exit_status_and_lines_are_read() -> None:
    up, exec_, true, echo = wt.parse(DOC, Path("lesson.md")).commands
    assert (up.output, up.exit_code, up.line) == (["lab retail is up"], 0, 16)
    assert exec_.output == ["curl: (28) Connection timed out after 500 milliseconds"]
    assert exec_.exit_code == 28
    assert exec_.line == 18
    assert (true.output, true.exit_code) == ([], 0)  # the blank line before it is not output
    assert echo.output == ["tilde"]


def test_rendering_an_unchanged_walkthrough_gives_back_the_same_text() -> None:
    text = DOC.replace("[exit 28]\n\n$ true", "[exit 28]\n$ true")  # blank lines between commands are not kept
    assert wt.parse(text, Path("lesson.md")).render() == text


def test_new_output_is_written_into_its_block_and_nothing_else_changes() -> None:
    doc = wt.parse(DOC, Path("lesson.md"))
    up, exec_, true, _ = doc.commands
    up.output = ["lab retail is up: 4 endpoints"]
    exec_.output, exec_.exit_code = ["{}"], 0
    true.exit_code = 1
    text = doc.render()
    assert "lab retail is up: 4 endpoints\n$ l7lab exec" in text
    assert "http://inventory-api:8080/\n{}\n$ true\n[exit 1]\n```" in text
    assert "[exit 28]" not in text
    before, after = DOC.split("```console")[0], DOC.split("More prose.")[1]
    assert text.startswith(before) and text.endswith(after)


def test_an_unclosed_command_block_is_an_error() -> None:
    with pytest.raises(wt.WalkthroughError, match=r"lesson.md:2: command block is never closed"):
        wt.parse("text\n```console\n$ l7lab status\n", Path("lesson.md"))


def test_a_file_without_commands_is_no_walkthrough(tmp_path: Path) -> None:
    path = tmp_path / "empty.md"
    path.write_text("# nothing to run\n\n```yaml\na: 1\n```\n")
    with pytest.raises(wt.WalkthroughError, match="no command block"):
        wt.load(path)


@pytest.mark.parametrize(("line", "expected"), [
    ("Dec  1 11:32:38.740: shop/frontend-app:42690 (ID:257) -> shop/backend-app:80 (ID:256) http-request FORWARDED",
     "<TIME>: shop/frontend-app:<PORT> (ID:257) -> shop/backend-app:80 (ID:256) http-request FORWARDED"),
    ('{"time": "2026-12-01T11:29:29.021555Z", "l4": {"TCP": {"source_port": 52154, "destination_port": 8080}}}',
     '{"time": "<TIME>", "l4": {"TCP": {"source_port": <PORT>, "destination_port": 8080}}}'),
    ('"client": "10.200.0.1:34442", "server_port": 80}', '"client": "10.200.0.1:<PORT>", "server_port": 80}'),
    ("trace of demo/client -> demo/api:8080 TCP GET /api/items (client port 58633)",
     "trace of demo/client -> demo/api:8080 TCP GET /api/items (client port <PORT>)"),
    ("[kernel] parsed IPv4 (not a fragment), policy port 52822", "[kernel] parsed IPv4 (not a fragment), policy port <PORT>"),
    ("Date: Tue, 01 Dec 2026 11:32:38 GMT", "Date: <TIME>"),
    ("curl: (28) Connection timeout after 499 ms", "curl: (28) Connection timed out after <DURATION>"),
    ("curl: (28) Connection timed out after 501 milliseconds", "curl: (28) Connection timed out after <DURATION>"),
    ("http-response FORWARDED (HTTP/1.1 200 7ms (GET http://backend-app/data))",
     "http-response FORWARDED (HTTP/1.1 200 <DURATION> (GET http://backend-app/data))"),
    ("curl: (28) Connection timed out after 501 milliseconds", "curl: (28) Connection timed out after <DURATION>"),
    ('"latency_ns": "2828774"', '"latency_ns": "<DURATION>"'),
    ("lab x is up: 3 endpoints in namespace l7lab-x.node, agent pid 8298; 'l7lab status' shows them",
     "lab x is up: 3 endpoints in namespace l7lab-x.node, agent pid <PID>; 'l7lab status' shows them"),
    ("lab x: removed process 8350 (proxy l7-proxy)", "lab x: removed process <PID> (proxy l7-proxy)"),
    ("id 0b4bb5a4-5c4e-4f1e-9d3a-0c2b1f9e8a11 done", "id <UUID> done"),
    ('"time": 1764588578.25,', '"time": <TIME>,'),
    ("a padded table title          ", "a padded table title"),
])
def test_normalization_replaces_what_varies(line: str, expected: str) -> None:
    assert wt.normalize_line(line) == expected


@pytest.mark.parametrize("line", [
    "10.200.0.3 TCP/8080 GET /api/inventory/item123",  # server ports and addresses stay
    "REDIRECT to the L7 proxy (port 15001)",
    "parsed IPv4 (not a fragment), policy port 8080",
    "retail/payment-gateway:8443 (ID:257) 203.0.113.20:80",
    "lab retail: 2 policies in force, 4 map entries written",
    "identity 16777217 (fqdn:*.example.com)",  # an FQDN identity is no time
    "POST /process-payment/refund 403",
])
def test_normalization_keeps_what_a_learner_should_see_unchanged(line: str) -> None:
    assert wt.normalize_line(line) == line


def test_check_compares_normalized_output_and_the_exit_status() -> None:
    a = wt.Command("l7lab observe x", ["Dec  1 11:32:38.740: a:40252 -> b:80", ""], 0)
    b = wt.Command("l7lab observe x", ["Dec  2 09:01:00.001: a:50001 -> b:80   "], 0)
    assert wt.comparable(a) == wt.comparable(b) == ["$ l7lab observe x", "<TIME>: a:<PORT> -> b:80"]
    assert wt.comparable(wt.Command("false", [], 1)) == ["$ false", "[exit 1]"]


@pytest.mark.parametrize(("command", "starts"), [
    ("l7lab up scenarios/retail.yaml", [("scenarios/retail.yaml", None)]),
    ("l7lab up --name shop scenarios/retail.yaml", [("scenarios/retail.yaml", "shop")]),
    ("l7lab run --keep scenarios/k8s-tutorial.yaml --name=tut", [("scenarios/k8s-tutorial.yaml", "tut")]),
    ("l7lab run scenarios/retail.yaml", []),  # run takes its lab down itself
    ("l7lab down retail && l7lab up scenarios/a.yaml | tail -1", [("scenarios/a.yaml", None)]),
    ("l7lab explain scenarios/retail.yaml --from a --to b", []),
    ("echo 'l7lab up scenarios/retail.yaml'", []),
])
def test_the_labs_a_command_leaves_running_are_found(command: str, starts: list[tuple[str, str | None]]) -> None:
    assert wt.lab_starts(wt.Command(command)) == starts


def test_the_scenarios_a_command_names_are_found() -> None:
    command = wt.Command("l7lab explain scenarios/retail.yaml --from a \\\n  --to b && cat scenarios/policies/retail.yaml")
    assert wt.scenarios_named(command) == ["scenarios/retail.yaml"]


def test_a_lab_start_that_fails_stops_the_walkthrough_and_nothing_of_that_lab_is_touched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Somebody else's lab of the walkthrough's name came up after the check looked: the
    walkthrough's own `up` fails, nothing after it runs (its `down` would remove their lab), and
    the cleanup leaves that lab alone."""
    from dataplane import walkthroughrun  # noqa: PLC0415

    doc = wt.parse(
        "# x\n\n```console\n$ l7lab up scenarios/retail.yaml --name theirs\nlab theirs is up\n"
        "$ l7lab exec theirs frontend-app -- true\n$ l7lab down theirs\n```\n", Path("x.md"))
    ran: list[str] = []
    up_now: list[set[str]] = [set()]

    def run_command(command: wt.Command, env: dict[str, str]) -> tuple[list[str], int]:
        ran.append(command.text)
        return ["error: lab theirs is already up"], 1

    def labs_up() -> set[str]:
        seen = up_now[0]
        up_now[0] = {"theirs"}  # it comes up right after the first look
        return seen

    downs: list[list[str]] = []
    monkeypatch.setattr(walkthroughrun, "run_command", run_command)
    monkeypatch.setattr(walkthroughrun, "labs_up", labs_up)
    monkeypatch.setattr(walkthroughrun.subprocess, "run", lambda argv, **kw: downs.append(argv))
    with pytest.raises(walkthroughrun.SetupError, match=r"line 4: .* did not bring lab theirs up \(exit 1\); "
                                                        r"nothing after it was run"):
        walkthroughrun.execute(doc)
    assert ran == ["l7lab up scenarios/retail.yaml --name theirs"]
    assert downs == []
