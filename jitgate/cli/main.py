"""The `jitgate` command: policy checks, kubeconfigs that reach clusters only through the gateway,
and access requests, reviews and grants through the gateway's access API.

The access commands connect like kubectl: the kubeconfig context you use for the gateway gives its
address, CA and your OIDC ID token. Exit status: 0 done, 1 the gateway refused (its message is
printed as it wrote it) or a waited-for request was not approved, 2 no usable answer (configuration,
connection, TLS) or bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jitgate.access.errors import InvalidRequest
from jitgate.access.scope import Scope
from jitgate.cli.client import (
    ApiError,
    Client,
    ClientError,
    connection_flags,
    load_connection,
    parse_time,
)
from jitgate.cli.output import dump, output_flag, table
from jitgate.timefmt import format_duration

if TYPE_CHECKING:
    from jitgate.policy.loader import Policy

# jitgate.policy and jitgate.kubeconfig are imported where used: the policy pulls in boto3, which
# the access commands (run often, by people waiting) do not need.

DEFAULT_GATEWAY_CA = "certs/mitmproxy-ca-cert.pem"


def _policy(path: str) -> Policy:
    from jitgate.policy.document import PolicyError
    from jitgate.policy.loader import load_policy

    try:
        return load_policy(path)
    except PolicyError as e:
        raise SystemExit(f"jitgate: policy error: {e}") from None


def cmd_policy_check(args: argparse.Namespace) -> int:
    from jitgate.policy.document import PolicyError
    from jitgate.policy.loader import load_policy

    failed = False
    for path in args.paths:
        try:
            policy = load_policy(path)
        except PolicyError as e:
            print(f"{e}", file=sys.stderr)
            failed = True
            continue
        print(f"{path}: ok ({len(policy.clusters)} cluster(s), {len(policy.identity_providers)} identity provider(s), "
              f"{len(policy.access_rules)} access rule(s), {len(policy.webhooks)} webhook(s), "
              f"files: {', '.join(str(p) for p in policy.sources)})")
        for warning in policy.guardrails.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 1 if failed else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    """Which access rules and guardrails apply to a described call, and the outcome."""
    import json as _json
    import shlex

    from jitgate.access.authorize import scope_for_call
    from jitgate.access.errors import AccessError
    from jitgate.access.rules import choose_rule
    from jitgate.guardrails.decide import decide, line_rule
    from jitgate.guardrails.rules import CallFacts

    policy = _policy(args.policy)
    if args.cluster not in policy.by_name:
        raise SystemExit(f"jitgate: no cluster {args.cluster!r} in the policy (defined: {', '.join(policy.by_name)})")
    resource, _, subresource = args.resource.partition("/")
    resource, _, group = resource.partition(".")
    command = tuple(shlex.split(args.command)) if args.command else ()
    body = Path(args.body).read_bytes() if args.body else None
    groups = tuple(args.group)
    from jitgate.kube.request_info import ExecParams, RequestInfo

    info = RequestInfo(True, "", args.verb, api_group=group, namespace=args.namespace or "", resource=resource,
                       subresource=subresource, name=args.name or "", exec=ExecParams(command=command) if command else None)
    try:
        rule = choose_rule(policy.access_rules, groups, scope_for_call(args.cluster, info), args.access_rule)
        access = {"rule": rule.name, "approval": str(rule.approval.mode), "reviewers": list(rule.approval.reviewers)}
    except AccessError as e:
        rule, access = None, {"rule": None, "why": str(e)}
    facts = CallFacts(cluster=args.cluster, verb=args.verb, api_group=group, resource=resource, subresource=subresource,
                      namespace=args.namespace or "", name=args.name or "", username=args.user, groups=groups,
                      access_rule=args.access_rule or (rule.name if rule else ""), command=command)
    outcome = decide(policy.guardrails, facts, args.content_type, body)
    result: dict = {"access": access, "guardrails": [m.to_dict() for m in outcome.matches]}
    if outcome.unreadable:
        result["unreadable_body"] = outcome.unreadable
    if args.line:
        deny, hits = line_rule(policy.guardrails, facts, args.line)
        result["typed_line"] = {"line": args.line, "rules": [h.name for h in hits], "ends_session": deny.name if deny else None}
    if rule is None:
        result["outcome"] = "refused: no access rule covers this call"
    elif outcome.action is None:
        result["outcome"] = f"allowed under a grant of access rule {rule.name!r}"
    else:
        result["outcome"] = f"{outcome.action} by guardrail {outcome.rule.name!r}: {outcome.rule.why()}"
    if args.output == "json":
        print(_json.dumps(result, indent=2))
    else:
        print(f"access rule: {access.get('rule') or 'none'}" + (f" ({access['why']})" if access.get("why") else
                                                                  f" (approval {access['approval']})"))
        for m in outcome.matches:
            print(f"guardrail: {m.rule.name} -> {m.rule.action}{' (dry run)' if not m.effective else ''}: {m.rule.why()} "
                  f"[{m.rule.source}]")
        if not outcome.matches:
            print("guardrails: none apply")
        if "typed_line" in result:
            t = result["typed_line"]
            print(f"typed line {t['line']!r}: " + (f"ends the session (guardrail {t['ends_session']})" if t["ends_session"]
                                                   else "delivered"))
        print(f"outcome: {result['outcome']}")
    return 0


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from jitgate.policy.loader import policy_json_schema, policy_reference

    text = policy_reference() if args.markdown else policy_json_schema()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from jitgate.cli import kubeconfig

    policy = _policy(args.policy)
    cluster = policy.by_name.get(args.cluster)
    if cluster is None:
        raise SystemExit(f"jitgate: no cluster {args.cluster!r} in the policy (known: {', '.join(policy.by_name)})")
    ca_path = Path(args.gateway_ca)
    try:
        ca_pem = ca_path.read_bytes()
    except OSError as e:
        raise SystemExit(f"jitgate: cannot read the gateway CA {ca_path}: {e.strerror} "
                         "(it is created in certs/ when the gateway first starts)") from None
    if args.login_issuer:
        from jitgate.cli.token import plugin_command

        tokens = kubeconfig.TokenSource(exec_command=plugin_command(
            args.login_issuer, args.oidc_client_id, args.oidc_ca_file, args.oidc_client_secret_file))
    elif args.oidc_issuer:
        tokens = kubeconfig.TokenSource(exec_command=kubeconfig.oidc_login_command(
            args.oidc_issuer, args.oidc_client_id, args.oidc_client_secret, tuple(args.oidc_extra_scope)))
    elif args.exec_command:
        tokens = kubeconfig.TokenSource(exec_command=tuple(args.exec_command))
    else:
        tokens = kubeconfig.TokenSource(token=args.token, token_file=args.token_file)
    config = kubeconfig.build_kubeconfig(
        cluster, args.user, ca_pem, tokens,
        proxy_url=args.proxy, server_url=args.server, namespace=args.namespace,
    )
    if args.output == "-":
        sys.stdout.write(kubeconfig.dump(config))
    else:
        kubeconfig.write(config, Path(args.output))
        print(f"wrote {args.output} (context {config['current-context']})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Access requests, reviews and grants


DEFAULT_WAIT = 600.0
POLL_INTERVAL = 1.0


def _client(args: argparse.Namespace) -> Client:
    connection = load_connection(kubeconfig=args.kubeconfig, context=args.context, server=args.server,
                                 proxy=args.proxy, ca=args.ca, token=args.token)
    return Client(connection, timeout=args.request_timeout)


def _items(values: Sequence[str] | None) -> list[str]:
    """Repeated flags, each possibly comma-separated: `--verb get,list --verb watch`."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def cmd_request(args: argparse.Namespace) -> int:
    reason = args.reason
    if reason is not None and reason.strip().startswith("<") and reason.strip().endswith(">"):
        print("jitgate request: replace the placeholder reason with yours, e.g. --reason \"INC-42: payments crash-looping\"",
              file=sys.stderr)
        return 2
    body: dict[str, Any] = {
        "cluster": args.cluster,
        "namespaces": _items(args.namespace),
        "cluster_wide": args.cluster_wide,
        "resources": _items(args.resource),
        "verbs": _items(args.verb),
    }
    if args.reveal:
        body["reveal"] = True
    for key in ("duration", "reason", "rule"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    client = _client(args)
    request = client.create_request(body)
    if args.wait is not None and request["state"] == "pending":
        print(_request_line(request), file=sys.stderr)
        print(f"waiting up to {_human(args.wait)} for a decision...", file=sys.stderr)
        request = _wait(client, request, args.wait)
    _emit(args, request, _request_line)
    if args.wait is not None:
        if request["state"] == "pending":
            print(f"request {request['id']} is still pending after {_human(args.wait)}", file=sys.stderr)
        return 0 if request["state"] == "approved" else 1
    return 0


def _wait(client: Client, request: dict, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while request["state"] == "pending" and time.monotonic() < deadline:
        time.sleep(max(0.0, min(POLL_INTERVAL, deadline - time.monotonic())))
        request = client.get_request(request["id"])
    return request


def cmd_list(args: argparse.Namespace) -> int:
    scope = "reviewable" if args.reviewable else "all" if args.all else "mine"
    items = _client(args).list_requests(scope, args.state)
    if args.output:
        dump(args.output, {"items": items})
    elif not items:
        print("No access requests." if scope != "reviewable" else "No access requests waiting for your review.", file=sys.stderr)
    else:
        now = time.time()
        rows = [("ID", "STATE", "REQUESTER", "CLUSTER", "SCOPE", "AGE", "EXPIRES", "APPROVALS")]
        for r in items:
            rows.append((r["id"], r["state"], r["requester"], r["scope"]["cluster"], _scope_or_operation(r),
                         _ago(r["created_at"], now), _expires(r, now), _approvals(r)))
        table(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    client = _client(args)
    # A grant id shows the request it came from (with the grant's state in it).
    request_id = client.get_grant(args.id)["request_id"] if args.id.startswith("grant-") else args.id
    request = client.get_request(request_id)
    if args.output:
        dump(args.output, request)
    else:
        viewer = client.whoami()["username"] if request["state"] == "pending" else None
        sys.stdout.write(_request_text(request, time.time(), viewer))
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    request = _client(args).decide(args.id, args.action, args.reason)
    _emit(args, request, _decision_line)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    grant_id = args.id
    if grant_id.startswith("req-"):  # the grant this request earned
        request = client.get_request(grant_id)
        if not request.get("grant"):
            print(f"request {grant_id} has no grant (it is {request['state']})", file=sys.stderr)
            return 1
        grant_id = request["grant"]["id"]
    grant = client.revoke(grant_id, args.reason)
    _emit(args, grant, lambda g: f"grant {g['id']} of {g['username']} revoked: {_describe(g['scope'])}")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    me = _client(args).whoami()
    if args.output:
        dump(args.output, me)
        return 0
    now = time.time()
    lines = [f"Username: {me['username']}", f"Groups:   {', '.join(me['groups']) or '(none)'}", "Active grants:"]
    lines += [f"  {g['id']}  {_describe(g['scope'])}, ends {_at(g['ends_at'], now)}" for g in me["grants"]] or ["  (none)"]
    lines.append("You may request:")
    for rule in me["requestable"]:
        lines.append(f"  {rule['name']}: {_rule_summary(rule)}")
    if not me["requestable"]:
        lines.append("  (nothing: no access rule lets your groups request access)")
    if me["reviews"]:
        lines.append(f"You review: {', '.join(me['reviews'])}")
    print("\n".join(lines))
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    items = _client(args).list_grants("all" if args.all else "mine", active=not args.history)
    if args.output:
        dump(args.output, {"items": items})
    elif not items:
        print("No active grants." if not args.history else "No grants.", file=sys.stderr)
    else:
        now = time.time()
        if args.history:
            # Who ended each grant and when: a revocation names its reviewer, an expiry its time.
            rows = [("ID", "USER", "CLUSTER", "SCOPE", "STATE", "ENDED", "BY", "REQUEST")]
            for g in items:
                state = g["state"] if g["state"] != "active" or g["active"] else "expired"
                if state == "revoked":
                    ended, by = _at(g["revoked_at"], now), f"{g['revoked_by']}: {g['revoke_reason'] or '-'}"
                elif state == "expired":
                    ended, by = _at(g["ends_at"], now), "expiry"
                else:
                    ended, by = f"ends {_until(g['ends_at'], now)}", "-"
                rows.append((g["id"], g["username"], g["scope"]["cluster"], _scope_short(g["scope"]), state, ended, by,
                             g["request_id"]))
        else:
            rows = [("ID", "USER", "CLUSTER", "SCOPE", "STATE", "ENDS", "REQUEST")]
            for g in items:
                state = g["state"] if g["state"] != "active" or g["active"] else "expired"
                rows.append((g["id"], g["username"], g["scope"]["cluster"], _scope_short(g["scope"]), state,
                             _until(g["ends_at"], now) if state == "active" else "-", g["request_id"]))
        table(rows)
    return 0


# -- output


def _emit(args: argparse.Namespace, obj: dict, line) -> None:
    if args.output:
        dump(args.output, obj)
    else:
        print(line(obj))


def _describe(scope: dict) -> str:
    try:
        return Scope.from_dict(scope).describe()
    except InvalidRequest:
        return json.dumps(scope)


def _scope_short(scope: dict) -> str:
    where = "cluster-wide" if scope["cluster_wide"] else ",".join(scope["namespaces"])
    return f"{where}: {','.join(scope['verbs'])} {','.join(scope['resources'])}"


def _scope_or_operation(request: dict) -> str:
    """An operation-bound request (a guardrail's require-approval) is about one call: show it."""
    operation = request.get("operation")
    return f"once: {operation['summary']}" if operation else _scope_short(request["scope"])


def _approvals(request: dict) -> str:
    required = request.get("approvals_required")
    return f"{request['approvals']}/{required}" if required else str(request["approvals"]) if request["approvals"] else "-"


def _human(seconds: float) -> str:
    """The two largest units: 3d4h, 1h5m, 59s."""
    return format_duration(abs(seconds), units=2)


def _ago(text: str | None, now: float) -> str:
    moment = parse_time(text)
    return "-" if moment is None else _human(now - moment)


def _until(text: str | None, now: float) -> str:
    moment = parse_time(text)
    if moment is None:
        return "-"
    return _human(moment - now) if moment > now else "ended"


def _at(text: str | None, now: float) -> str:
    """`2025-01-02T03:04:05Z (in 1h)` or `(5m ago)`."""
    moment = parse_time(text)
    if moment is None:
        return "-"
    return f"{text} ({'in ' + _human(moment - now) if moment > now else _human(now - moment) + ' ago'})"


def _expires(request: dict, now: float) -> str:
    if request["state"] == "pending":
        return _until(request["expires_at"], now)
    grant = request.get("grant")
    if request["state"] == "approved" and grant:
        return _until(grant["ends_at"], now) if grant["state"] == "active" else grant["state"]
    return "-"


def _waiting_for(request: dict) -> str:
    mode, required = request.get("approval_mode"), request.get("approvals_required")
    if mode == "auto":
        return f"approved automatically at {request['auto_approve_at']} unless a reviewer denies it first"
    if required:
        return f"needs {required} approval(s), has {request['approvals']}"
    return "waiting for a decision"


def _request_line(request: dict) -> str:
    head = f"request {request['id']} {request['state']}: {_describe(request['scope'])} for {request['duration']} (rule {request['rule']})"
    grant = request.get("grant")
    if request["state"] == "approved" and grant:
        return f"{head}\ngrant {grant['id']} ends at {grant['ends_at']}"
    if request["state"] == "pending":
        return f"{head}\n{_waiting_for(request)}; see it with: jitgate show {request['id']}"
    if request.get("decision_reason"):
        return f"{head}\n{request['state']} by {request['decided_by']}: {request['decision_reason']}"
    return head


def _decision_line(request: dict) -> str:
    if request["state"] == "pending":
        return f"request {request['id']}: review recorded; still pending ({_waiting_for(request)})"
    return _request_line(request)


def _rule_summary(rule: dict) -> str:
    where = ", ".join(rule["namespaces"])
    if rule["cluster_wide"]:
        where = f"{where} or cluster-wide" if where else "cluster-wide"
    approval = rule["approval"]
    how = {
        "reviewers": f"{approval['required']} approval(s) from {', '.join(approval['reviewers'])}",
        "auto": f"approved after {approval['auto_approve_after']} unless {', '.join(approval['reviewers'])} deny",
        "immediate": "granted at once",
    }.get(approval["mode"], approval["mode"])
    reason = "; reason required" if rule["require_reason"] else ""
    return (f"clusters {', '.join(rule['clusters'])}; namespaces {where}; {', '.join(rule['verbs'])} "
            f"{', '.join(rule['resources'])}; up to {rule['duration']['max']} (default {rule['duration']['default']}); {how}{reason}")


def _held_by(operation: dict) -> str:
    """Which rule held the operation: a guardrail, or a rule of the MCP front (`mcp:<rule>`, its
    path `mcp://<server>/<tool>`)."""
    held_by, digest = operation["guardrail"], operation["digest"][:16]
    if held_by.startswith("mcp:") and operation["path"].startswith("mcp://"):
        return f"MCP rule:   {held_by.removeprefix('mcp:')} (MCP front); digest {digest}"
    return f"Guardrail:  {held_by}; digest {digest}"


def _request_text(r: dict, now: float, viewer: str | None = None) -> str:
    lines = [
        f"Request:    {r['id']}",
        f"State:      {r['state']}" + (f" ({_waiting_for(r)})" if r["state"] == "pending" else ""),
        f"Requester:  {r['requester']} (groups: {', '.join(r['requester_groups']) or 'none'})",
        f"Rule:       {r['rule']}" + (f" (approval: {r['approval_mode']})" if r.get("approval_mode") else " (no longer in the policy)"),
        f"Scope:      {_describe(r['scope'])}",
    ]
    operation = r.get("operation")
    if operation:
        lines += [
            f"Operation:  {operation['summary']} (exactly this call, once: {operation['method']} {operation['path']})",
            _held_by(operation),
        ]
        permit = r.get("permit")
        if permit:
            used = f"used {_at(permit['used_at'], now)}" if permit["used"] else f"unused, usable until {_at(permit['expires_at'], now)}"
            lines.append(f"Permit:     {used}")
    lines += [
        f"Duration:   {r['duration']}",
        f"Reason:     {r['reason'] or '-'}",
        f"Created:    {_at(r['created_at'], now)}",
    ]
    if r["state"] == "pending":
        lines.append(f"Expires:    {_at(r['expires_at'], now)}")
    if r.get("decided_at"):
        why = f": {r['decision_reason']}" if r.get("decision_reason") else ""
        lines.append(f"Decided:    {_at(r['decided_at'], now)} by {r['decided_by']}{why}")
    grant = r.get("grant")
    if grant:
        lines.append(f"Grant:      {grant['id']}, {grant['state']}, {_at(grant['starts_at'], now)} to {_at(grant['ends_at'], now)}")
        if grant.get("revoked_by"):
            lines.append(f"Revoked:    {_at(grant['revoked_at'], now)} by {grant['revoked_by']}: {grant['revoke_reason']}")
    lines.append("Reviews:" if r["reviews"] else "Reviews:    none")
    for v in r["reviews"]:
        lines.append(f"  {v['at']}  {v['decision']:<7}  {v['reviewer']}" + (f": {v['reason']}" if v["reason"] else ""))
    if r.get("events"):
        lines.append("Events:")
        for e in r["events"]:
            lines.append(f"  {e['at']}  {e['kind']:<24}  {e['actor']}" + (f": {e['reason']}" if e["reason"] else ""))
    if r["state"] == "pending" and viewer == r["requester"]:
        lines.append(f"Next:       a reviewer decides ({_waiting_for(r)}); you cannot review your own request. "
                     f"Withdraw it: jitgate cancel {r['id']}")
    elif r["state"] == "pending":
        lines.append(f"Review it:  jitgate approve {r['id']}  |  jitgate deny {r['id']} --reason \"...\"")
    return "\n".join(lines) + "\n"


def _add_access_commands(sub) -> None:
    conn = connection_flags()

    req = sub.add_parser("request", parents=[conn], help="ask for access (a scope on one cluster, for a time)",
                         description="Ask for access. Without a grant, kubectl through the gateway prints the exact command to paste.")
    req.add_argument("--cluster", required=True, help="cluster name")
    req.add_argument("--namespace", "-n", action="append", metavar="NS", help="namespace (repeatable, or comma-separated)")
    req.add_argument("--cluster-wide", action="store_true", help="every namespace, cluster-scoped resources and lists across namespaces")
    req.add_argument("--resource", action="append", required=True, metavar="R",
                     help="resource[.group][/subresource], e.g. pods, pods/log, deployments.apps (repeatable)")
    req.add_argument("--verb", action="append", required=True, metavar="V", help="get, list, watch, create, update, patch, delete, "
                                                                               "deletecollection, or * (repeatable)")
    req.add_argument("--reveal", action="store_true",
                     help="ask for secret values unmasked in the grant's responses (only rules with reveal: true allow it)")
    req.add_argument("--duration", help="how long, e.g. 30m or 2h (default: the rule's default)")
    req.add_argument("--reason", help="why you need it (some rules require one)")
    req.add_argument("--rule", help="file under this access rule (default: the first that fits)")
    req.add_argument("--wait", nargs="?", type=float, const=DEFAULT_WAIT, metavar="SECONDS",
                     help=f"wait for the decision (default {DEFAULT_WAIT:g}s); exit 0 only if approved")
    output_flag(req)
    req.set_defaults(func=cmd_request)

    ls = sub.add_parser("list", parents=[conn], help="list access requests (yours, or for you to review)")
    which = ls.add_mutually_exclusive_group()
    which.add_argument("--reviewable", action="store_true", help="pending requests waiting for your review")
    which.add_argument("--all", action="store_true", help="every request you can see (yours and under rules you review)")
    ls.add_argument("--state", metavar="STATES", help="comma-separated: pending, approved, denied, expired, cancelled")
    output_flag(ls, "a table")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", parents=[conn], help="one request (or the request of a grant id) with its reviews, grant and history")
    show.add_argument("id", help="request id (req-...) or grant id (grant-...)")
    output_flag(show)
    show.set_defaults(func=cmd_show)

    for action, help_text, reason_help, required in (
        ("approve", "approve a request you review", "why (optional)", False),
        ("deny", "deny a request you review", "why (the requester sees it)", True),
        ("cancel", "withdraw your own pending request", "why (optional)", False),
    ):
        p = sub.add_parser(action, parents=[conn], help=help_text)
        p.add_argument("id", help="request id (req-...)")
        p.add_argument("--reason", required=required, help=reason_help)
        output_flag(p)
        p.set_defaults(func=cmd_decide, action=action)

    revoke = sub.add_parser("revoke", parents=[conn], help="end an active grant now (yours, or under a rule you review)")
    revoke.add_argument("id", help="grant id (grant-...), or the id of the request that earned it (req-...)")
    revoke.add_argument("--reason", required=True, help="why (recorded and sent to the holder's notifications)")
    output_flag(revoke)
    revoke.set_defaults(func=cmd_revoke)

    who = sub.add_parser("whoami", parents=[conn], help="who the gateway takes you for, your active grants, what you may request")
    output_flag(who)
    who.set_defaults(func=cmd_whoami)

    grants = sub.add_parser("grants", parents=[conn], help="list grants (active ones by default)")
    grants.add_argument("--all", action="store_true", help="every grant you can see (yours and under rules you review)")
    grants.add_argument("--history", action="store_true", help="ended (expired and revoked) grants too")
    output_flag(grants, "a table")
    grants.set_defaults(func=cmd_grants)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jitgate", description="Just-in-time access gateway for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    check = policy.add_parser("check", help="validate policy files without starting anything")
    check.add_argument("paths", nargs="+", help="policy files or folders")
    check.set_defaults(func=cmd_policy_check)
    explain = policy.add_parser("explain", help="which access rules and guardrails apply to a described call, and the outcome")
    explain.add_argument("--policy", default="policies", help="policy file or folder (default: policies)")
    explain.add_argument("--cluster", required=True)
    explain.add_argument("--user", default="someone@example.com", help="the caller's username")
    explain.add_argument("--group", action="append", default=[], help="a group of the caller (repeatable)")
    explain.add_argument("--verb", required=True, help="get, list, watch, create, update, patch, delete, deletecollection")
    explain.add_argument("--resource", required=True, help="resource[.group][/subresource], e.g. pods/exec, deployments.apps")
    explain.add_argument("--namespace", default="")
    explain.add_argument("--name", default="")
    explain.add_argument("--access-rule", default=None, help="the access rule the call runs under (default: the one that covers it)")
    explain.add_argument("--body", default=None, help="file with the request body (create, update, patch)")
    explain.add_argument("--content-type", default="application/json", help="the body's type, e.g. application/strategic-merge-patch+json")
    explain.add_argument("--command", default=None, help="exec command line, e.g. \"sh -c 'rm -rf /'\"")
    explain.add_argument("--line", default=None, help="a line typed into an interactive session")
    explain.add_argument("-o", "--output", choices=("text", "json"), default="text")
    explain.set_defaults(func=cmd_policy_explain)
    schema = policy.add_parser("schema", help="print the policy file's JSON Schema (for editors) or its reference tables")
    schema.add_argument("--markdown", action="store_true", help="the README's reference tables instead of the JSON Schema")
    schema.add_argument("-o", "--output", default="-", help="file to write, or - for standard output (default)")
    schema.set_defaults(func=cmd_policy_schema)

    kc = sub.add_parser("kubeconfig", help="write a kubeconfig that reaches a cluster through the gateway")
    kc.add_argument("--policy", default="policies", help="policy file or folder (default: policies)")
    kc.add_argument("--cluster", required=True, help="cluster name from the policy")
    kc.add_argument("--user", required=True, help="name of the kubeconfig user entry (e.g. your email)")
    mode = kc.add_mutually_exclusive_group(required=True)
    mode.add_argument("--proxy", metavar="URL", help="regular mode: the gateway as proxy-url, e.g. http://127.0.0.1:8080")
    mode.add_argument("--server", metavar="URL", help="reverse mode: the gateway's listener for this cluster, e.g. https://127.0.0.1:7443")
    kc.add_argument("--gateway-ca", default=DEFAULT_GATEWAY_CA, help=f"the gateway's CA certificate (default: {DEFAULT_GATEWAY_CA})")
    kc.add_argument("--namespace", help="default namespace of the context")
    token = kc.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="a static OIDC ID token (expires; for tests and demos)")
    token.add_argument("--token-file", help="a file kubectl reads the OIDC ID token from")
    token.add_argument("--login-issuer", metavar="URL",
                       help="tokens from `jitgate token` (sign in once with `jitgate login`; refreshed all day): the default choice")
    token.add_argument("--oidc-issuer", metavar="URL", help="use kubelogin (kubectl oidc-login) with this issuer")
    token.add_argument("--exec-command", nargs="+", metavar="ARG", help="any exec credential plugin printing an ExecCredential")
    kc.add_argument("--oidc-client-id", default="jitgate", help="OIDC client id for --login-issuer and kubelogin (default: jitgate)")
    kc.add_argument("--oidc-ca-file", help="with --login-issuer: CA bundle that verifies the identity provider")
    kc.add_argument("--oidc-client-secret-file", help="with --login-issuer: a file with the client's secret, if it has one")
    kc.add_argument("--oidc-client-secret", help="OIDC client secret for kubelogin, if the client has one")
    kc.add_argument("--oidc-extra-scope", action="append", default=[], help="extra scope for kubelogin (repeatable)")
    kc.add_argument("-o", "--output", default="-", help="file to write (0600), or - for standard output (default)")
    kc.set_defaults(func=cmd_kubeconfig)

    _add_access_commands(sub)
    from jitgate.cli import token as token_cli

    token_cli.add_commands(sub)
    __import__("jitgate.cli.sessions", fromlist=["add_parser"]).add_parser(sub)  # jitgate sessions: local recordings
    from jitgate.cli.audit import add_audit_commands

    add_audit_commands(sub)  # jitgate audit: show, filter, follow, verify
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ApiError as e:
        print(e.message, file=sys.stderr)  # the gateway's words, as it wrote them
        return 1
    except ClientError as e:
        print(f"jitgate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `jitgate list | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
