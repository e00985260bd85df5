"""Verbs that change a running lab's policy through its agent: `apply`, `delete`, `label`,
`audit`. Each is one all-or-nothing change (`dataplane/agent`): confirmed to the caller, or not
applied."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import L7LabError, SourceError
from .common import EXIT_OK, EXIT_SETUP, Verbs, emit_json, errconsole, one_lab, print_error, say


_KIND_ALIASES = {"networkpolicy": "NetworkPolicy", "netpol": "NetworkPolicy",
                 "ciliumnetworkpolicy": "CiliumNetworkPolicy", "cnp": "CiliumNetworkPolicy",
                 "ciliumclusterwidenetworkpolicy": "CiliumClusterwideNetworkPolicy",
                 "ccnp": "CiliumClusterwideNetworkPolicy"}


def _change(lab: str | None, payload: dict[str, Any], as_json: bool) -> int:
    from .. import agent  # noqa: PLC0415

    rec = one_lab(lab)
    reply = agent.request(rec.lab, {"op": "change", **payload})
    if as_json:
        emit_json(reply)
    if not reply.get("ok"):
        if not as_json:
            for err in reply.get("errors", []):
                print_error(err)
            errconsole.print(f"lab {rec.lab}: nothing changed", soft_wrap=True)
        return EXIT_SETUP
    if not as_json:
        for name in reply["added"]:
            say(f"applied {name}")
        for name in reply.get("replaced", []):
            say(f"applied {name} (replaced the version in force)")
        for name in reply["removed"]:
            say(f"deleted {name}")
        if reply.get("audit_on"):
            say(f"audit mode on: {', '.join(reply['audit_on'])}")
        if reply.get("audit_off"):
            say(f"audit mode off (enforcing): {', '.join(reply['audit_off'])}")
        for notice in reply.get("notices", []):
            say(f"notice: {notice}")
        for warning in reply.get("warnings", []):
            errconsole.print(f"warning: {warning}", soft_wrap=True)
        audited = reply.get("audit", [])
        say(f"lab {rec.lab}: {len(reply['policies'])} policies in force, {reply['map_writes']} map entries written"
            + (f"; in audit mode: {', '.join(audited)}" if audited else ""))
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from .. import limits  # noqa: PLC0415
    from ..errors import SourceLocation  # noqa: PLC0415
    from ..yamlsource import Budget, load_documents, read_source  # noqa: PLC0415

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
        rec = one_lab(args.lab)
        matches = [k for k, e in rec.endpoints.items() if e.kind == "pod" and k.split("/")[-1] == name]
        if len(matches) != 1:
            raise L7LabError(f"label: {'ambiguous' if matches else 'unknown'} pod {name!r} in lab {rec.lab}; "
                             f"pods: {', '.join(sorted(k for k, e in rec.endpoints.items() if e.kind == 'pod'))}")
        name = matches[0]
    return _change(args.lab, {"relabel": [{"target": target, "name": name, "set": set_labels,
                                           "remove": remove}]}, args.json)


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit mode on or off for pods ('NS/POD' or a unique short name), namespaces, or (no
    target) every endpoint of the lab. The agent reads each name as a pod if the lab has one,
    else a namespace, and checks every name before anything changes."""
    on = {"on": True, "off": False}.get(args.mode.lower())
    if on is None:
        raise L7LabError(f"audit: expected 'on' or 'off', got {args.mode!r}")
    items = [{"target": "name", "name": name, "on": on} for name in args.targets] or \
        [{"target": "all", "name": "", "on": on}]
    return _change(args.lab, {"audit": items}, args.json)


def register(verbs: Verbs) -> None:
    """Add apply, delete, label and audit."""
    p = verbs.add("apply", "apply policy manifests to a running lab (all or nothing)", cmd_apply)
    p.add_argument("files", nargs="+", metavar="FILE", help="NetworkPolicy / CiliumNetworkPolicy / CCNP YAML")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")

    p = verbs.add("delete", "delete a policy from a running lab: l7lab delete cnp NAME -n NAMESPACE", cmd_delete)
    p.add_argument("kind", help="NetworkPolicy (netpol), CiliumNetworkPolicy (cnp) or CiliumClusterwideNetworkPolicy (ccnp)")
    p.add_argument("name", help="the policy's metadata.name")
    p.add_argument("-n", "--namespace", help="the policy's namespace (default: default; none for ccnp)")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")

    p = verbs.add("label", "change a pod's or namespace's labels in a running lab: l7lab label pod NS/NAME k=v k-", cmd_label)
    p.add_argument("target", metavar="pod|namespace")
    p.add_argument("name", help="NAMESPACE/POD or NAMESPACE")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-", help="set a label, or remove it with a trailing -")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")

    p = verbs.add("audit", "switch audit mode of a running lab's endpoints: l7lab audit on|off [POD|NAMESPACE ...]",
                  cmd_audit)
    p.add_argument("mode", metavar="on|off", help="on: would-be drops pass and are reported as AUDIT; off: enforce")
    p.add_argument("targets", nargs="*", metavar="POD|NAMESPACE",
                   help="NS/POD, a unique pod name, or a namespace (every pod in it); none: every endpoint")
    p.add_argument("--lab", help="lab name (needed when several labs are up)")
