"""Verbs that read files only (no root, no kernel): `validate` checks scenario and policy files,
`explain` shows the oracle's verdict for one flow and why."""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING, Any

from ..errors import ErrorList, L7LabError, SourceError
from ..scenario import load_scenario
from .common import EXIT_OK, EXIT_SETUP, Verbs, emit_json, flow_arguments, policy_engine, print_error, say

if TYPE_CHECKING:
    from ..fqdn.lookup import Lookup


def _is_scenario(path: str) -> bool:
    """A scenario: one mapping without apiVersion and kind. An empty file (no document at all)
    counts as one, so that `validate` rejects it with the error `run` gives."""
    from ..yamlsource import load_file  # noqa: PLC0415

    docs = load_file(path)
    if not docs:
        return True
    return len(docs) == 1 and isinstance(docs[0].data, dict) and "apiVersion" not in docs[0].data and "kind" not in docs[0].data


def cmd_validate(args: argparse.Namespace) -> int:
    from ..policy import validate_policy_file  # noqa: PLC0415

    results: dict[str, list[str]] = {}
    notices: dict[str, list[str]] = {}
    for path in args.files:
        errors: list[BaseException] = []
        try:
            if _is_scenario(path):
                scenario = load_scenario(path)
                policy_engine(scenario)  # the scenario and every policy it applies
                notices[path] = _scenario_notices(scenario)
                errors.extend(_step_refusals(scenario))
            else:
                errors.extend(validate_policy_file(path))
                if not errors:
                    notices[path] = _file_notices(path)
        except (SourceError, ErrorList) as exc:
            errors.extend(exc.errors if isinstance(exc, ErrorList) else [exc])
        results[path] = [str(e) for e in errors]
    if args.json:
        emit_json({"valid": not any(results.values()), "files": results,
                   "notices": {path: lines for path, lines in notices.items() if lines and not results[path]}})
    else:
        for path, errors in results.items():
            if errors:
                for e in errors:
                    print_error(e)
            else:
                say(f"{path}: valid")
                for line in notices.get(path, []):
                    say(f"  notice: {line}")
    return EXIT_SETUP if any(results.values()) else EXIT_OK


def _file_notices(path: str) -> list[str]:
    """What the lab enforces differently in a valid policy file (`policy.notices`)."""
    from ..policy.notices import policy_notices  # noqa: PLC0415
    from ..policy.parse import parse_documents  # noqa: PLC0415
    from ..yamlsource import load_file  # noqa: PLC0415

    return policy_notices(parse_documents(load_file(path)))


def _scenario_notices(scenario: Any) -> list[str]:
    """The notices of every policy a valid scenario applies, at its start or in a step."""
    from ..policy.notices import policy_notices  # noqa: PLC0415
    from ..policy.parse import parse_documents  # noqa: PLC0415

    from ..fqdn.oracle import lookup_races  # noqa: PLC0415

    groups = [scenario.policies] + [step.apply for step in scenario.steps if step.apply]
    lines: list[str] = []
    for group in groups:
        lines += [n for n in policy_notices(parse_documents([s.document for s in group])) if n not in lines]
    return lines + lookup_races(policy_engine(scenario))


def _step_refusals(scenario: Any) -> list[BaseException]:
    """What `run` would refuse in the scenario's later steps, though every policy parses: HTTP
    rules on a port where a world host serves TLS (policy/tlsports.py; the policies it starts
    with are checked by the engine)."""
    from ..policy.parse import parse_documents  # noqa: PLC0415
    from ..policy.tlsports import tls_http_refusals  # noqa: PLC0415

    return [e for step in scenario.steps if step.apply
            for e in tls_http_refusals(parse_documents([s.document for s in step.apply]), scenario)]


def _parse_http(text: str | None, headers: list[str]) -> Any:
    """The request `explain` checks. What the L7 proxy would answer 400 Bad Request (a method
    or header name that is not an HTTP token, a control character in a value) is refused here
    with the reason: no policy verdict applies to a request the proxy never parses."""
    from l7.http import HTTP_TOKEN_CHARS, is_header_value, is_http_token  # noqa: PLC0415
    from ..scenario import HttpRequest  # noqa: PLC0415

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
    from ..fqdn.oracle import FqdnOracle  # noqa: PLC0415
    from ..policy import explain_text  # noqa: PLC0415
    from ..scenario import make_probe  # noqa: PLC0415

    scenario = load_scenario(args.scenario)
    engine = policy_engine(scenario)
    last = len(scenario.steps) if args.step is None else args.step - 1
    if not 0 <= last <= len(scenario.steps):
        raise L7LabError(f"--step must be between 1 and {len(scenario.steps) + 1}, got {args.step}")
    # The steps before, as a dry run takes them: what their probes' lookups taught counts.
    fqdn = FqdnOracle(engine)
    for step in scenario.steps[:last]:
        if step.kind == "probes":
            for p in step.probes:
                with contextlib.suppress(ValueError):
                    fqdn.judge(p)
            fqdn.end_step()
        elif step.kind == "expire":
            fqdn.expire(step.expire)
        else:
            engine.apply_step(step)
    dns = None
    if args.dns:
        if args.http:
            raise L7LabError("--http and --dns exclude each other: a flow is an HTTP request or a DNS query")
        from ..scenario import DnsQuery  # noqa: PLC0415

        dns = DnsQuery(args.dns.rstrip(".").lower())
    protocol = args.protocol or ("UDP" if dns else "TCP")
    probe = make_probe(scenario, args.source, args.to, protocol, _parse_http(args.http, args.header), dns=dns,
                       backend=args.backend)
    try:
        decision, lookup, _ = fqdn.judge(probe)
    except ValueError as exc:  # a backend the service does not have (now)
        raise L7LabError(str(exc)) from None
    if args.json:
        out = decision.to_json() if decision is not None else {"outcome": "unresolved"}
        if lookup is not None:
            out["lookup"] = {**lookup.to_json(), "learned": lookup.learned}
        emit_json(out)
        return EXIT_OK
    if lookup is not None:
        say(lookup_text(lookup))
    say(explain_text(decision) if decision is not None else f"unresolved: {lookup.why if lookup else ''}")
    return EXIT_OK


def lookup_text(lookup: Lookup) -> str:
    """The lookup a pod's resolver makes before it connects, query by query."""
    lines = [f"lookup of {lookup.name} through the cluster DNS (search path, ndots:5):"]
    lines += [f"  {name}: {what}" for name, what in lookup.queries]
    if lookup.learned:
        lines.append(f"  the DNS proxy relayed the answer: learned {', '.join(lookup.learned)} before releasing it")
    elif lookup.resolved:
        lines.append("  no DNS rule sent the query through the DNS proxy: nothing learned, toFQDNs selectors "
                     "select nothing new")
    return "\n".join(lines)


def register(verbs: Verbs) -> None:
    """Add validate and explain."""
    p = verbs.add("validate", "check scenario and policy files; report every error found", cmd_validate)
    p.add_argument("files", nargs="+", metavar="FILE")

    p = verbs.add("explain", "show, step by step, the verdict the policy gives a flow and why", cmd_explain)
    p.add_argument("scenario", help="scenario YAML file")
    flow_arguments(p, "source pod, a world host (traffic from outside the cluster) or node (the node's own stack)",
                   "to a service: the backend pod the flow reaches (default: the first, as a scenario's probe)",
                   "an HTTP request to check against L7 rules", "a DNS query for NAME (over UDP; --protocol TCP: over TCP) to check against DNS rules")
    p.add_argument("--step", type=int, help="the policy state before step N (default: after every step)")
