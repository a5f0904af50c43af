"""The access HTTP API: requests, reviews and grants as JSON, for the `jitgate` CLI and any UI.

The gateway serves it itself under `/jitgate/v1/` on every listener (Kubernetes never uses that
prefix), authenticated with the same OIDC ID token kubectl sends. `AccessAPI.handle` is a pure
request handler: method, target, body and the already verified identity in, an HTTP status and a
JSON-able dict out. It is synchronous and may block briefly on the store, so an event loop calls
it from a thread (addons/access_api.py).

Every change goes through the grant store (`SQLiteStore`), one transaction each; the handler only
reads, validates and reports. Errors are `metav1.Status` objects, as everywhere else in the
gateway. What a caller can see: their own requests and grants, and those under access rules they
review. Anything else is answered exactly like an id that does not exist, so ids of other people's
requests do not leak.

The `sessions` routes (recorded sessions: list, timeline, HAR, flow file, exec asciicasts) are
answered by `jitgate.api.sessions_api.SessionViews` when the gateway keeps recordings; their
downloads are `Download`s (bytes and a media type) rather than JSON.

docs/openapi.yaml describes every route here (a test keeps the two in step).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol
from urllib.parse import parse_qsl

from jitgate.access.errors import AccessError, NotFound
from jitgate.access.messages import approvals_required, notification_view
from jitgate.access.model import AccessRequest, Decision, Grant, Principal, RequestState
from jitgate.access.rules import AccessRule, rule_named, rules_for
from jitgate.access.scope import Scope
from jitgate.access.workflow import operation_approvals
from jitgate.kube.status import REASONS, status
from jitgate.policy.sessions import AUDITOR
from jitgate.recording.sessions import SESSION_ID
from jitgate.store.sqlite import SQLiteStore, StoreError
from jitgate.timefmt import parse_duration

logger = logging.getLogger("jitgate.api.access_api")

API_PREFIX = "/jitgate/v1/"
MAX_BODY = 64 * 1024
DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
# Ids the store makes are `req-`/`grant-` + base32; anything else cannot name a record.
_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
_RESERVED_PREFIX = "system:"


def is_api_path(path: str) -> bool:
    """Whether a request target (path, maybe with a query) belongs to this API, not to a cluster."""
    path = path.partition("?")[0]
    return path.startswith(API_PREFIX) or path == API_PREFIX.rstrip("/")


def is_sessions_path(path: str) -> bool:
    """Whether a request target names the sessions routes (answered from the recordings, not the store)."""
    path = path.partition("?")[0]
    return path == API_PREFIX + "sessions" or path.startswith(API_PREFIX + "sessions/")


class Notifications(Protocol):
    """`jitgate.notify.Notifier`, or anything forwarding to it."""

    def notify(self, kind: str, request: Mapping[str, Any], actor: str | None = None, reason: str | None = None) -> None: ...


# ---------------------------------------------------------------------------------------------
# Routes


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # below API_PREFIX; `{id}` is one path segment
    action: str  # the AccessAPI method that answers it
    query: frozenset[str] = frozenset()  # accepted query parameters
    body: frozenset[str] | None = None  # accepted JSON body fields; None: no body

    @property
    def path(self) -> str:
        return API_PREFIX + self.template

    def match(self, segments: list[str]) -> tuple[bool, str | None, str | None]:
        """Whether the path's segments fit the template, and its `{id}` and `{sub}` segments."""
        parts = self.template.split("/")
        if len(parts) != len(segments):
            return False, None, None
        ident = sub = None
        for part, segment in zip(parts, segments):
            if part == "{id}" and segment:
                ident = segment
            elif part == "{sub}" and segment:
                sub = segment
            elif part != segment:
                return False, None, None
        return True, ident, sub


CREATE_FIELDS = frozenset({"cluster", "namespaces", "cluster_wide", "resources", "verbs", "reveal", "duration", "reason", "rule"})
REASON_FIELDS = frozenset({"reason"})

ROUTES: tuple[Route, ...] = (
    Route("GET", "whoami", "whoami"),
    Route("GET", "requests", "list_requests", query=frozenset({"scope", "state", "limit"})),
    Route("POST", "requests", "create_request", body=CREATE_FIELDS),
    Route("GET", "requests/{id}", "get_request"),
    Route("POST", "requests/{id}/approve", "approve", body=REASON_FIELDS),
    Route("POST", "requests/{id}/deny", "deny", body=REASON_FIELDS),
    Route("POST", "requests/{id}/cancel", "cancel", body=REASON_FIELDS),
    Route("GET", "grants", "list_grants", query=frozenset({"scope", "active", "limit"})),
    Route("GET", "grants/{id}", "get_grant"),
    Route("POST", "grants/{id}/revoke", "revoke", body=REASON_FIELDS),
)

# Recorded sessions (jitgate.api.sessions_api): read-only, visible by the policy's `sessions:` section.
SESSION_ROUTES: tuple[Route, ...] = (
    Route("GET", "sessions", "list_sessions",
          query=frozenset({"user", "cluster", "namespace", "grant", "decision", "since", "until", "limit"})),
    Route("GET", "sessions/{id}", "get_session", query=frozenset({"limit", "offset"})),
    Route("GET", "sessions/{id}/har", "get_session_har"),
    Route("GET", "sessions/{id}/flows", "get_session_flows"),
    Route("GET", "sessions/{id}/casts/{sub}", "get_session_cast"),
)
SESSION_ACTIONS = frozenset(r.action for r in SESSION_ROUTES)
ALL_ROUTES = ROUTES + SESSION_ROUTES


@dataclass(frozen=True)
class Download:
    """A recording served as it is stored (masked, without credentials), not as JSON."""

    data: bytes = field(repr=False)
    content_type: str
    filename: str
    session: str
    owner: str  # the session's user ("" when anonymous)
    visible_as: str  # why the caller may see it: owner, reviewer or auditor
    kind: str  # har, flows or cast


class Refused(Exception):
    """A request the API itself refuses (routing, input); workflow refusals are `AccessError`s."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(message: str) -> NoReturn:
    raise Refused(400, message)


@dataclass(frozen=True)
class ApiCall:
    """One parsed API call, as the actions see it."""

    who: Principal  # a verified caller: jitgate.oidc.Identity
    ident: str | None
    query: Mapping[str, str]
    body: Mapping[str, Any]
    now: float
    sub: str | None = None  # the `{sub}` segment (an exec's id under a session)


# ---------------------------------------------------------------------------------------------
# The handler


class AccessAPI:
    def __init__(
        self,
        store: SQLiteStore,  # or anything with its public methods (the service's current store)
        rules_provider: Callable[[], Sequence[AccessRule]],
        notifier: Notifications | None = None,
        now: Callable[[], float] = time.time,
        sessions: Any = None,  # jitgate.api.sessions_api.SessionViews: the gateway keeps recordings
    ) -> None:
        self.store = store
        self.rules_provider = rules_provider
        self.notifier = notifier
        self.now = now
        self.sessions = sessions

    def handle(self, method: str, target: str, body: bytes, identity: Principal | None,
               content_type: str | None) -> tuple[int, dict | Download]:
        """(HTTP status, JSON-able body or a `Download`) for one call; never raises."""
        try:
            return self._handle(method.upper(), target, body or b"", identity, content_type)
        except Refused as e:
            return e.code, status(e.code, e.message, REASONS.get(e.code))
        except StoreError as e:
            # Fail closed, and keep the store's file path and internals in the log, not in answers.
            logger.error("access API: %s", e.message)
            return 503, status(503, "the grant store is unavailable, so the access API cannot answer now (fail closed); "
                                    "nothing was changed. The gateway log has the details.", e.reason)
        except AccessError as e:
            return e.status, status(e.status, e.message, e.reason)
        except Exception:
            logger.exception("access API: %s %s failed", method, target.partition("?")[0])
            return 500, status(500, "internal error in the access API; the gateway log has the details")

    def _handle(self, method: str, target: str, body: bytes, identity: Principal | None, content_type: str | None) -> tuple[int, dict]:
        path, _, query_text = target.partition("?")
        if not is_api_path(path):
            raise Refused(404, f"{path} is not a path of the jitgate access API (it lives under {API_PREFIX})")
        route, ident, sub = _route(method, path)
        if identity is None:
            raise Refused(401, "no bearer token: the access API needs your OIDC ID token, as kubectl sends it")
        for name in (identity.username, *identity.groups):
            if name.startswith(_RESERVED_PREFIX):
                raise Refused(403, f"the identity {name!r} uses the reserved \"system:\" prefix")
        call = ApiCall(identity, ident, _query(route, query_text), _body(route, body, content_type), self.now(), sub)
        if route.action in SESSION_ACTIONS:
            if self.sessions is None:
                raise NotFound("this gateway keeps no session recordings (its recording step is not loaded or is a viewer), "
                               "so it has no session to show")
            return getattr(self.sessions, route.action)(call)
        return getattr(self, route.action)(call)

    @property
    def rules(self) -> Sequence[AccessRule]:
        return self.rules_provider()

    # -- who am I

    def whoami(self, call: ApiCall) -> tuple[int, dict]:
        rules = self.rules
        groups = tuple(call.who.groups)
        grants = self.store.list_grants(username=call.who.username, active_at=call.now, limit=MAX_LIMIT)
        return 200, {
            "username": call.who.username,
            "groups": list(groups),
            "grants": [grant_view(g, call.now) for g in grants],
            "requestable": [r.to_dict() for r in rules_for(rules, groups)],
            "reviews": [r.name for r in rules if r.is_reviewer(groups)],
        }

    # -- requests

    def create_request(self, call: ApiCall) -> tuple[int, dict]:
        b = _Fields(call.body)
        scope = Scope.from_dict({
            "cluster": b.string("cluster", required=True),
            "namespaces": b.strings("namespaces"),
            "cluster_wide": b.boolean("cluster_wide"),
            "resources": b.strings("resources", required=True),
            "verbs": b.strings("verbs", required=True),
            "reveal": b.boolean("reveal"),
        })
        rules = self.rules
        request = self.store.create_request(
            rules, call.who, scope, now=call.now,
            duration=b.duration("duration"), reason=b.string("reason"), rule_name=b.string("rule"),
        )
        if request.state is RequestState.PENDING:
            self._notify("created", request, rules, request.requester, request.reason)
        else:  # approved at once (mode immediate)
            self._notify("approved", request, rules, None, request.decision_reason)
        return 201, request_view(request, rules)

    def list_requests(self, call: ApiCall) -> tuple[int, dict]:
        rules = self.rules
        who = call.who
        which = _choice(call.query, "scope", ("mine", "reviewable", "all"), "mine")
        states = _states(call.query.get("state"))
        limit = _limit(call.query)
        if which == "mine":
            requests = self.store.list_requests(requester=who.username, states=states, limit=limit)
        elif which == "reviewable":
            requests = self.store.reviewable_requests(rules, who, now=call.now, limit=MAX_LIMIT)
            requests = [r for r in requests if states is None or r.state in states][:limit]
        else:
            reviewed = _reviewed_rules(rules, who)
            if not reviewed:
                raise Refused(403, "scope=all lists the requests under the access rules you review, and you review none; "
                                   "use scope=mine for your own requests")
            # The store has no filter by rule: look at the newest MAX_LIMIT and keep the visible ones.
            candidates = self.store.list_requests(states=states, limit=MAX_LIMIT)
            requests = [r for r in candidates if r.requester == who.username or r.rule in reviewed][:limit]
        return 200, {"items": [request_view(r, rules) for r in requests]}

    def get_request(self, call: ApiCall) -> tuple[int, dict]:
        rules = self.rules
        request = self._visible_request(call, rules)
        view = request_view(request, rules)
        view["events"] = [e.to_dict() for e in self.store.events_for(request.id)]
        return 200, view

    def approve(self, call: ApiCall) -> tuple[int, dict]:
        return self._review(call, Decision.APPROVE)

    def deny(self, call: ApiCall) -> tuple[int, dict]:
        return self._review(call, Decision.DENY)

    def _review(self, call: ApiCall, decision: Decision) -> tuple[int, dict]:
        reason = _Fields(call.body).string("reason")
        rules = self.rules
        request = self._visible_request(call, rules)
        request = self.store.review(rules, request.id, call.who, decision, reason, now=call.now)
        if request.state is RequestState.APPROVED:
            self._notify("approved", request, rules, call.who.username, request.decision_reason)
        elif request.state is RequestState.DENIED:
            self._notify("denied", request, rules, call.who.username, request.decision_reason)
        # One approval of several: the request stays pending and nobody needs to hear of it yet.
        return 200, request_view(request, rules)

    def cancel(self, call: ApiCall) -> tuple[int, dict]:
        reason = _Fields(call.body).string("reason")
        rules = self.rules
        request = self._visible_request(call, rules)
        request = self.store.cancel(request.id, call.who, reason, now=call.now)
        self._notify("cancelled", request, rules, call.who.username, request.decision_reason)
        return 200, request_view(request, rules)

    def _visible_request(self, call: ApiCall, rules: Sequence[AccessRule]) -> AccessRequest:
        return self._visible(call, rules, "access request", "requests", self.store.get_request, lambda r: r.requester)

    def _visible(self, call: ApiCall, rules: Sequence[AccessRule], what: str, plural: str, fetch, owner_of):
        """The object `call.ident` names, if the caller may see it: their own, or under a rule they
        review. Anything else is "not found", so ids of others' requests and grants leak nothing."""
        missing = NotFound(f"there is no {what} {call.ident!r} that you can see "
                           f"(you see your own {plural} and those under access rules you review)")
        if not _ID.fullmatch(call.ident or ""):
            raise missing
        try:
            found = fetch(call.ident)
        except NotFound:
            raise missing from None
        if not may_see(call.who, owner_of(found), found.rule, rules):
            raise missing
        return found

    # -- grants

    def list_grants(self, call: ApiCall) -> tuple[int, dict]:
        rules = self.rules
        who = call.who
        which = _choice(call.query, "scope", ("mine", "all"), "mine")
        active = _choice(call.query, "active", ("true", "false"), "false") == "true"
        limit = _limit(call.query)
        active_at = call.now if active else None
        if which == "mine":
            grants = self.store.list_grants(username=who.username, active_at=active_at, limit=limit)
        else:
            reviewed = _reviewed_rules(rules, who)
            if not reviewed:
                raise Refused(403, "scope=all lists the grants under the access rules you review, and you review none; "
                                   "use scope=mine for your own grants")
            candidates = self.store.list_grants(active_at=active_at, limit=MAX_LIMIT)
            grants = [g for g in candidates if g.username == who.username or g.rule in reviewed][:limit]
        return 200, {"items": [grant_view(g, call.now) for g in grants]}

    def get_grant(self, call: ApiCall) -> tuple[int, dict]:
        return 200, grant_view(self._visible_grant(call, self.rules), call.now)

    def revoke(self, call: ApiCall) -> tuple[int, dict]:
        reason = _Fields(call.body).string("reason")
        rules = self.rules
        grant = self._visible_grant(call, rules)
        grant = self.store.revoke_grant(rules, grant.id, call.who, reason, now=call.now)
        try:
            request = self.store.get_request(grant.request_id)
        except AccessError as e:  # the revocation is done; only its notification is lost
            logger.error("access API: grant %s revoked, but its request could not be read for the notification: %s", grant.id, e)
        else:
            self._notify("revoked", request, rules, call.who.username, grant.revoke_reason, state="revoked")
        return 200, grant_view(grant, call.now)

    def _visible_grant(self, call: ApiCall, rules: Sequence[AccessRule]) -> Grant:
        return self._visible(call, rules, "grant", "grants", self.store.get_grant, lambda g: g.username)

    # -- notifications

    def _notify(self, kind: str, request: AccessRequest, rules: Sequence[AccessRule], actor: str | None,
                reason: str | None, state: str | None = None) -> None:
        if self.notifier is None:
            return
        try:
            self.notifier.notify(kind, notification_view(request, rules, state), actor=actor, reason=reason or None)
        except Exception:  # the decision is made and stored; a notification never undoes it
            logger.exception("access API: %s notification for request %s not sent", kind, request.id)


# ---------------------------------------------------------------------------------------------
# Views


def may_see(who: Principal, owner: str, rule_name: str, rules: Sequence[AccessRule]) -> bool:
    """The owner of a request or grant, and the reviewers of its rule, may see it."""
    if who.username == owner:
        return True
    rule = rule_named(rules, rule_name)
    return rule is not None and rule.is_reviewer(who.groups)


def request_view(request: AccessRequest, rules: Sequence[AccessRule]) -> dict[str, Any]:
    """`AccessRequest.to_dict()` plus how its rule decides now (for "APPROVALS 1/2")."""
    rule = rule_named(rules, request.rule)
    data = request.to_dict()
    data["approval_mode"] = str(rule.approval.mode) if rule is not None else None
    data["approvals_required"] = approvals_required(rule)
    if request.operation is not None and rule is not None:
        # An operation a guardrail holds back is always decided by people, never at once or by a timer.
        data["approval_mode"] = "reviewers"
        data["approvals_required"] = operation_approvals(rule, request)
    return data


def grant_view(grant: Grant, now: float) -> dict[str, Any]:
    data = grant.to_dict()
    data["active"] = grant.is_active(now)  # a grant past its end is "active" until the sweep marks it
    return data


def audit_annotations(method: str, target: str, request_body: bytes, status_code: int, answer: dict | Download) -> dict[str, str]:
    """What an audit event of an access API call carries besides the call itself: the action, the
    request or grant it acted on, its scope, the reason given, and the outcome (for sessions: which
    session, whose, seen as owner, reviewer or auditor, what was exported). Plain strings, as
    audit.k8s.io annotations are; never raises (an unparseable call still gets its action)."""
    out: dict[str, str] = {}
    path = target.partition("?")[0]
    try:
        route, ident, _ = _route(method.upper(), path)
        out["jitgate.dev/api-action"] = route.action
    except Refused:
        route, ident = None, None
    if route is not None and route.action in SESSION_ACTIONS:
        return out | session_annotations(route.action, ident, status_code, answer)
    reason = None
    if request_body:
        try:
            sent = json.loads(request_body)
            reason = sent.get("reason") if isinstance(sent, dict) else None
        except ValueError:
            pass
    if isinstance(reason, str) and reason:
        out["jitgate.dev/api-reason"] = reason[:500]
    subject = answer if isinstance(answer, dict) else {}
    if subject.get("kind") == "Status":
        out["jitgate.dev/api-outcome"] = f"refused {status_code}: {str(subject.get('message', ''))[:300]}"
        if ident:
            out["jitgate.dev/api-access-request" if ident.startswith("req-") else "jitgate.dev/api-grant"] = ident
        return out
    ident_value = subject.get("id")
    if isinstance(ident_value, str) and ident_value.startswith("req-"):
        out["jitgate.dev/api-access-request"] = ident_value
        grant = subject.get("grant") or {}
        if grant.get("id"):
            out["jitgate.dev/api-grant"] = grant["id"]
        out["jitgate.dev/api-outcome"] = f"request {subject.get('state')}" + (f", grant {grant.get('state')}" if grant else "")
    elif isinstance(ident_value, str) and ident_value.startswith("grant-"):
        out["jitgate.dev/api-grant"] = ident_value
        out["jitgate.dev/api-access-request"] = str(subject.get("request_id", ""))
        out["jitgate.dev/api-outcome"] = f"grant {subject.get('state')}"
    else:
        out["jitgate.dev/api-outcome"] = f"answered {status_code}"
    scope = subject.get("scope")
    if isinstance(scope, dict):
        try:
            out["jitgate.dev/scope"] = Scope.from_dict(scope).describe()
        except (ValueError, TypeError):
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Parsing a call


def _route(method: str, path: str) -> tuple[Route, str | None, str | None]:
    segments = path[len(API_PREFIX):].split("/") if path.startswith(API_PREFIX) else [""]
    matched = [(route, ident, sub) for route in ALL_ROUTES for fits, ident, sub in [route.match(segments)] if fits]
    if not matched:
        raise Refused(404, f"{path} is not a path of the jitgate access API")
    for route, ident, sub in matched:
        if route.method == method:
            return route, ident, sub
    allowed = ", ".join(sorted({route.method for route, _, _ in matched}))
    raise Refused(405, f"method {method} is not allowed on {path} (allowed: {allowed})")


def _query(route: Route, text: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=20)
    except ValueError:
        _bad("the query string is malformed")
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in route.query:
            known = ", ".join(sorted(route.query)) or "none"
            _bad(f"unknown query parameter {key!r} for {route.method} {route.path} (known: {known})")
        if key in query:
            _bad(f"query parameter {key!r} is given more than once")
        query[key] = value
    return query


def _body(route: Route, body: bytes, content_type: str | None) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise Refused(413, f"the request body is larger than {MAX_BODY // 1024} KiB")
    if route.body is None:
        if body.strip():
            _bad(f"{route.method} {route.path} takes no request body")
        return {}
    if not body.strip():
        return {}  # every field optional (or checked by the workflow, which says what is missing)
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "application/json":
        raise Refused(415, f"the request body must be JSON (Content-Type: application/json), not {media.strip() or 'unspecified'!r}")
    charset = re.search(r"charset\s*=\s*\"?([^\";]+)", params, re.I)
    if charset and charset.group(1).strip().lower() not in ("utf-8", "utf8"):
        raise Refused(415, "the request body must be UTF-8 JSON")
    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        _bad("the request body is not UTF-8")
    except json.JSONDecodeError as e:
        _bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(data, dict):
        _bad("the request body must be a JSON object")
    unknown = sorted(set(data) - route.body)
    if unknown:
        _bad(f"unknown field(s) {', '.join(repr(k) for k in unknown)} in the request body "
             f"(known: {', '.join(sorted(route.body))})")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key are read differently by different parsers: refuse, do not pick one.
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            _bad(f"field {key!r} appears more than once in the request body")
        data[key] = value
    return data


def _no_constant(name: str) -> NoReturn:
    _bad(f"the request body is not valid JSON: {name} is not a JSON number")


class _Fields:
    """Typed access to a JSON body's fields; `null` counts as absent."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def _get(self, key: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None and required:
            _bad(f"field {key!r} is required")
        return value

    def string(self, key: str, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is not None and not isinstance(value, str):
            _bad(f"field {key!r} must be a string")
        return value

    def strings(self, key: str, required: bool = False) -> list[str]:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _bad(f"field {key!r} must be a list of strings")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            _bad(f"field {key!r} must be true or false")
        return value

    def duration(self, key: str) -> int | None:
        """Seconds (a JSON integer, or text: `90m`, `1h30m`, `3600`)."""
        value = self._get(key, False)
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return int(text)
            try:
                return parse_duration(text)
            except ValueError as e:
                _bad(f"field {key!r}: {e}")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _bad(f"field {key!r} must be a duration like \"1h\" or a whole number of seconds")


def _choice(query: Mapping[str, str], key: str, choices: Sequence[str], default: str) -> str:
    value = query.get(key, default)
    if value not in choices:
        _bad(f"query parameter {key!r} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _states(text: str | None) -> frozenset[RequestState] | None:
    if text is None:
        return None
    states = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            states.add(RequestState(item))
        except ValueError:
            _bad(f"unknown request state {item!r} (known: {', '.join(RequestState)})")
    if not states:
        _bad("query parameter 'state' names no state")
    return frozenset(states)


def _limit(query: Mapping[str, str]) -> int:
    text = query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not re.fullmatch(r"[0-9]{1,10}", text) or not 1 <= int(text) <= MAX_LIMIT:
        _bad(f"query parameter 'limit' must be a number from 1 to {MAX_LIMIT}")
    return int(text)


def _reviewed_rules(rules: Iterable[AccessRule], who: Principal) -> frozenset[str]:
    return frozenset(r.name for r in rules if r.is_reviewer(who.groups))


def session_annotations(action: str, ident: str | None, status_code: int, answer: Any) -> dict[str, str]:
    """What the audit event of a sessions call carries: which session, whose, seen as what (owner,
    reviewer, auditor), what was exported and how large."""
    out: dict[str, str] = {}
    if ident and SESSION_ID.fullmatch(ident):
        out["jitgate.dev/api-session"] = ident
    if isinstance(answer, Download):
        out["jitgate.dev/api-session"] = answer.session
        out["jitgate.dev/api-session-user"] = answer.owner or "anonymous"
        out["jitgate.dev/api-session-visibility"] = answer.visible_as
        out["jitgate.dev/api-session-export"] = answer.kind
        out["jitgate.dev/api-outcome"] = f"exported {answer.kind} {answer.filename} ({len(answer.data)} bytes)"
        return out
    subject = answer if isinstance(answer, dict) else {}
    if subject.get("kind") == "Status":
        out["jitgate.dev/api-outcome"] = f"refused {status_code}: {str(subject.get('message', ''))[:300]}"
    elif action == "list_sessions":
        items = subject.get("items") or []
        out["jitgate.dev/api-sessions-listed"] = str(len(items))
        if any(i.get("visible_as") == AUDITOR for i in items):
            out["jitgate.dev/api-session-visibility"] = AUDITOR
        out["jitgate.dev/api-outcome"] = f"listed {len(items)} session(s)"
    else:
        out["jitgate.dev/api-session-user"] = str(subject.get("user") or "anonymous")
        out["jitgate.dev/api-session-visibility"] = str(subject.get("visible_as", ""))
        out["jitgate.dev/api-outcome"] = f"timeline of {len(subject.get('timeline') or [])} call(s)"
    return out
