"""Reconcile what a cluster received (the tap's recording) with the gateway's audit log.

The invariant: every request the cluster received corresponds to exactly one audited call with
decision `allow`, the same verb, path and identity, and nothing else reached the cluster.

    violations = reconcile([(expectation, tap.connections())], load_audit(gateway.audit_path), since=t0)
    assert not violations, "\\n".join(violations)

A call is one auditID (its RequestReceived / ResponseStarted / ResponseComplete lines count once).
The gateway sends `Audit-ID: <auditID>` on every request it forwards, as kube-apiserver accepts it,
so each received request names its call. The checks (each failure is one human-readable line):

- the bytes are well-formed HTTP/1.1 over TLS: no plaintext or garbage, no obs-fold, CR/LF/NUL in
  a header, duplicate or conflicting framing headers, no absolute-form target;
- exactly one `Audit-ID`, naming exactly one call in the audit log, used by no other received request;
- that call's decision is `allow` (every stage), it is for this cluster, its requestURI has this path
  and query (values the audit redacts excepted), its verb is what kube-apiserver derives from this
  method, path and query, and its objectRef is what kube-apiserver reads from this path;
- the path is one kube reads as we do: no dot segments, empty segments, encoded slashes or `;params`;
- identity: `Impersonate-User`/`Impersonate-Group` equal the audit user where the cluster
  impersonates, and no `Impersonate-*` at all where it does not; no authenticating-proxy
  headers (`X-Remote-*`); the Host and (where known) the Authorization are the gateway's own;
- upgrades: only a well-formed WebSocket handshake may ask the cluster to switch protocols (the one
  upgrade the gateway inspects), and an upgraded stream ends before its call's ResponseComplete.

Nothing here imports the gateway: the kube semantics are re-derived from the wire, so a gateway bug
in its own request parsing cannot hide itself.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from testkit.tap import Connection, ReceivedRequest

ANY = object()  # "do not check this"


@dataclass(frozen=True)
class ClusterExpectation:
    """What the gateway's requests to one cluster must look like."""

    name: str  # the policy's cluster name (the audit annotation jitgate.dev/cluster)
    authority: str  # the Host header the gateway sends (the endpoint's host[:port])
    impersonate: bool
    authorization: object = ANY  # exact Authorization value; None: must be absent; ANY: unchecked


@dataclass
class AuditCall:
    audit_id: str
    events: list[dict]

    @property
    def first(self) -> dict:
        return self.events[0]

    def stage(self, name: str) -> dict | None:
        return next((e for e in self.events if e.get("stage") == name), None)


def load_audit(path: Path | str) -> tuple[list[dict], list[str]]:
    """The events of a JSON-lines audit log, and a problem line for each line that is not one."""
    events, problems = [], []
    p = Path(path)
    if not p.exists():
        return [], []
    for n, line in enumerate(p.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or "auditID" not in event:
                raise ValueError("no auditID")
            events.append(event)
        except ValueError as e:
            problems.append(f"audit log line {n} is not an audit event ({e}): {line[:120]!r}")
    return events, problems


def audit_calls(events: list[dict]) -> dict[str, list[AuditCall]]:
    """auditID -> the calls that used it (normally exactly one; several if the ID was reused)."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_id[e["auditID"]].append(e)
    out: dict[str, list[AuditCall]] = {}
    for audit_id, evs in by_id.items():
        calls: list[AuditCall] = []
        for e in evs:
            key = (e.get("verb"), e.get("requestURI"), (e.get("user") or {}).get("username"))
            for c in calls:
                f = c.first
                same = (f.get("verb"), f.get("requestURI"), (f.get("user") or {}).get("username")) == key
                if same and all(x.get("stage") != e.get("stage") for x in c.events):
                    c.events.append(e)
                    break
            else:
                calls.append(AuditCall(audit_id, [e]))
        out[audit_id] = calls
    return out


# --- kube-apiserver's reading of a request (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go) -------

NAMESPACE_SUBRESOURCES = {"status", "finalize"}
PARSE_BOOL_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
STREAMING_SUBRESOURCES = {"exec", "attach", "portforward"}


def query_pairs(query: str) -> list[tuple[str, str]]:
    pairs = []
    for part in query.split("&") if query else []:
        k, _, v = part.partition("=")
        pairs.append((unquote(k.replace("+", " ")), unquote(v.replace("+", " "))))
    return pairs


def kube_request_info(method: str, path: str, query: str) -> dict:
    """verb, and for resource requests apiGroup, apiVersion, namespace, resource, subresource, name."""
    decoded = unquote(path)  # Go's URL.Path is the decoded path, and kube splits that
    parts = [p for p in decoded.strip("/").split("/")] if decoded.strip("/") else []
    q = dict(query_pairs(query))
    info: dict = {"resource_request": False, "verb": method.lower()}  # non-resource: the method, lowercased
    if len(parts) < 2 or parts[0] not in ("api", "apis"):
        return info
    if parts[0] == "apis":
        if len(parts) < 3:
            return info
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        group, version, rest = "", parts[1], parts[2:]
    if not rest:
        return info
    info.update(resource_request=True, apiGroup=group, apiVersion=version)
    # Go's methods are case-sensitive: `get` is no GET to kube (its verb is "").
    verb = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete"}.get(method, "")
    if rest[0] == "watch":
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    info["namespace"] = namespace
    info["resource"] = rest[0] if rest else ""
    info["name"] = rest[1] if len(rest) > 1 else ""
    info["subresource"] = rest[2] if len(rest) > 2 else ""
    if not info["name"] and verb == "get":
        verb = "list"
    if verb == "list" and q.get("watch") in PARSE_BOOL_TRUE:
        verb = "watch"
    if verb == "delete" and not info["name"]:
        verb = "deletecollection"
    info["verb"] = verb
    return info


def ambiguous_path(path: str) -> str | None:
    """Why kube (or anything between) might read this path differently from the gateway, if it might."""
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in path:
        return "an encoded slash or backslash"
    if "%2e" in lowered:
        return "an encoded dot"
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        return "dot segments"
    if any(s == "" for s in segments[:-1]):
        return "an empty segment (double slash)"
    if ";" in path:
        return "a path parameter (;)"
    if "%00" in lowered or any(ord(ch) < 0x21 or ord(ch) > 0x7e for ch in path):
        return "a control or non-ASCII character"
    return None


def _micro(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return None


def well_formed_websocket(req: ReceivedRequest) -> str | None:
    """None if this is one well-formed WebSocket handshake (RFC 6455 4.1), else what is wrong."""
    upgrade = req.header_values("Upgrade")
    if len(upgrade) != 1 or upgrade[0].strip().lower() != "websocket":
        return f"Upgrade {upgrade}"
    if req.method != "GET":
        return f"method {req.method}"
    versions = req.header_values("Sec-WebSocket-Version")
    if versions != ["13"]:
        return f"Sec-WebSocket-Version {versions}"
    keys = req.header_values("Sec-WebSocket-Key")
    try:
        ok = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except ValueError:
        ok = False
    if not ok:
        return f"Sec-WebSocket-Key {keys}"
    if not any("upgrade" in v.lower() for v in req.header_values("Connection")):
        return "no Connection: upgrade"
    return None


# --- the reconciliation --------------------------------------------------------------------------------


def reconcile(sources: list[tuple[ClusterExpectation, list[Connection]]], events: list[dict],
              since: float = 0.0, until: float | None = None, audit_problems: list[str] = ()) -> list[str]:
    """Violations of the invariant among what the clusters received in [since, until]."""
    violations: list[str] = list(audit_problems)
    calls = audit_calls(events)
    in_window = lambda t: t >= since and (until is None or t <= until)

    # Which received requests name which auditID (over the whole recording: reuse is reuse).
    users_of: dict[str, list[ReceivedRequest]] = defaultdict(list)
    for _, conns in sources:
        for conn in conns:
            for req in conn.requests:
                for value in req.header_values("Audit-ID"):
                    users_of[value].append(req)

    for cluster, conns in sources:
        for conn in conns:
            for problem in conn.problems:
                if in_window(problem.time):
                    violations.append(f"[{cluster.name}] {problem.describe()}")
            for req in conn.requests:
                if in_window(req.time):
                    violations += [f"[{cluster.name}] {req.describe()}: {v}" for v in check_request(cluster, req, calls, users_of)]
    return violations


def check_request(cluster: ClusterExpectation, req: ReceivedRequest, calls: dict[str, list[AuditCall]],
                  users_of: dict[str, list[ReceivedRequest]]) -> list[str]:
    out: list[str] = [f"malformed: {p}" for p in req.problems]

    # The target, as the cluster reads it.
    if not req.target.startswith("/"):
        out.append(f"request target is not origin-form: {req.target[:120]!r}")
        return out
    path, _, query = req.target.partition("?")
    why = ambiguous_path(path)
    if why:
        out.append(f"path with {why} reached the cluster")
    hosts = req.header_values("Host")
    if hosts != [cluster.authority]:
        out.append(f"Host {hosts}, expected [{cluster.authority!r}]")

    # Credentials and identity headers that are not the gateway's.
    auth = req.header_values("Authorization")
    if cluster.authorization is not ANY:
        expected = [] if cluster.authorization is None else [cluster.authorization]
        if auth != expected:
            out.append(f"Authorization is not the gateway's credential: {[a[:24] + '...' for a in auth]}")
    remote = [k for k, _ in req.headers if k.lower().startswith("x-remote-")]
    if remote:
        out.append(f"authenticating-proxy headers reached the cluster: {remote}")

    # Upgrades: only the one kind the gateway inspects.
    if req.header_values("Upgrade") or any("upgrade" in v.lower() for v in req.header_values("Connection")):
        bad = well_formed_websocket(req)
        if bad:
            out.append(f"upgrade the gateway cannot inspect ({bad}) reached the cluster"
                       + (f", answered {req.response_status}" if req.response_status else ""))

    # The audit record.
    ids = req.header_values("Audit-ID")
    if len(ids) != 1:
        out.append("no Audit-ID header: no audited call let this request through" if not ids
                   else f"{len(ids)} Audit-ID headers {ids}")
        return out
    audit_id = ids[0]
    others = [r for r in users_of.get(audit_id, []) if r is not req]
    if others:
        out.append(f"Audit-ID {audit_id} also used by {', '.join(r.describe() for r in others)}")
    matches = calls.get(audit_id, [])
    if len(matches) != 1:
        out.append(f"Audit-ID {audit_id} matches {len(matches)} audited calls, not exactly one")
        if not matches:
            return out
    call = matches[0]
    first = call.first
    decisions = {e.get("annotations", {}).get("jitgate.dev/decision") for e in call.events}
    if decisions != {"allow"}:
        out.append(f"audited decision {sorted(map(str, decisions))}, not allow")
    clusters = {e.get("annotations", {}).get("jitgate.dev/cluster") for e in call.events}
    if clusters != {cluster.name}:
        out.append(f"audited for cluster {sorted(map(str, clusters))}, received by {cluster.name}")
    audit_uri = first.get("requestURI", "")
    a_path, _, a_query = audit_uri.partition("?")
    if a_path != path:
        out.append(f"audited path {a_path!r}, the cluster received {path!r}")
    if not _same_query(query, a_query):
        out.append(f"audited query {a_query!r}, the cluster received {query!r}")
    info = kube_request_info(req.method, path, query)
    verb = first.get("verb")
    if verb != info["verb"] and not (verb == "create" and info.get("subresource") in STREAMING_SUBRESOURCES
                                     and req.method == "GET" and req.header_values("Upgrade")):
        out.append(f"{req.method} reads as verb {info['verb']!r} to kube, audited as {verb!r}")
    ref = first.get("objectRef") or {}
    if info["resource_request"]:
        for key in ("namespace", "resource", "name", "subresource", "apiGroup"):
            if (ref.get(key) or "") != (info.get(key) or ""):
                out.append(f"kube reads {key} {info.get(key)!r}, audited {ref.get(key)!r}")
    elif ref:
        out.append(f"kube reads no resource here, audited objectRef {ref}")

    user = first.get("user") or {}
    imp_user, imp_groups = req.header_values("Impersonate-User"), req.header_values("Impersonate-Group")
    other_imp = [k for k, _ in req.headers if k.lower().startswith("impersonate-")
                 and k.lower() not in ("impersonate-user", "impersonate-group")]
    if cluster.impersonate:
        if imp_user != [user.get("username")]:
            out.append(f"Impersonate-User {imp_user}, audited user {user.get('username')!r}")
        if sorted(imp_groups) != sorted(user.get("groups") or []):
            out.append(f"Impersonate-Group {imp_groups}, audited groups {user.get('groups')}")
        if other_imp:
            out.append(f"impersonation headers the gateway does not send: {other_imp}")
    elif imp_user or imp_groups or other_imp:
        out.append(f"impersonation headers reached a cluster the gateway does not impersonate on: "
                   f"{[k for k, _ in req.headers if k.lower().startswith('impersonate-')]}")

    # An upgraded stream is one call: audited as complete only once it has ended.
    if req.response_status == 101 and req.stream_last_byte is not None:
        done = _micro((call.stage("ResponseComplete") or {}).get("stageTimestamp"))
        if done is not None and req.stream_last_byte > done + 1.0:
            out.append(f"upgraded stream went on {req.stream_last_byte - done:.1f}s after the audit's ResponseComplete")
    return out


def _same_query(received: str, audited: str) -> bool:
    r, a = query_pairs(received), query_pairs(audited)
    if len(r) != len(a):
        return False
    return all(rk == ak and (rv == av or av == "REDACTED") for (rk, rv), (ak, av) in zip(r, a))


def summary(req: ReceivedRequest) -> str:
    """One line for a human: what the cluster got and answered."""
    return f"{req.describe()} -> {req.response_status} (Audit-ID {req.header('Audit-ID')})"

