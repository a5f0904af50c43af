"""Kubernetes request attributes, read from an HTTP request the way kube-apiserver reads them.

This follows `RequestInfoFactory.NewRequestInfo` (k8s.io/apiserver/pkg/endpoints/request/
requestinfo.go) with the default prefixes (`api` groupless, `apis` with a group), so the verb,
group, version, namespace, resource, subresource and name the gateway decides on are the ones the
apiserver authorizes. Where the gateway and the apiserver (or anything in between) could read a
request target differently, the target is refused with `AmbiguousRequestError` instead of guessed.

Deliberate differences from the apiserver, all towards refusing or asking for more permission:

- GET (and HEAD) on `pods/exec`, `pods/attach` and `pods/portforward` has the verb `create`, not
  `get`. A WebSocket handshake is a GET, so the apiserver's RequestInfo says `get`; since
  Kubernetes 1.35 the `AuthorizePodWebsocketUpgradeCreatePermission` feature gate (beta, on by
  default) makes the pod registry also authorize `create` for these GETs (KEP-4006, kubernetes
  #133515/#134577), because an interactive session is a write whatever the transport. SPDY uses
  POST, which is `create` already. One verb has to stand for the request here, so it is the
  stronger one: a grant of `get` on pods/exec never opens a shell through the gateway.
  `pods/log` and the `proxy` subresources keep the apiserver's verbs (kube does not add the
  check there); `RequestInfo.upgrade` tells policy that a connection upgrade was asked for.
- Name from `fieldSelector=metadata.name=<name>` (list/watch): the apiserver takes it only when
  all list options decode; the gateway additionally takes it only when no `labelSelector` is
  given (it does not re-implement label selector parsing), so in doubt the request is treated
  as a request for the whole collection.
- Query keys that decide the verb, the name or an exec session (see `SINGLE_VALUED_PARAMS`) may
  appear only once. The apiserver uses the first occurrence; refusing repeats means no other
  component can pick a different one.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

# Limits against oversized targets; kubectl's longest real targets (label selectors, exec
# commands) stay far below these.
MAX_TARGET_LENGTH = 16 * 1024
MAX_PATH_SEGMENTS = 64

API_PREFIXES = frozenset({"api", "apis"})
GROUPLESS_API_PREFIXES = frozenset({"api"})

# requestinfo.go: specialVerbs, specialVerbsNoSubresources, namespaceSubresources.
SPECIAL_VERBS = frozenset({"proxy", "watch"})
SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
VERBS_WITH_SELECTORS = frozenset({"list", "watch", "deletecollection"})

METHOD_VERBS: Mapping[str, str] = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}

# Pod subresources that open an interactive stream; a GET on them is a `create` (see above).
STREAM_SUBRESOURCES = frozenset({"exec", "attach", "portforward"})
CONNECT_SUBRESOURCES = STREAM_SUBRESOURCES | {"proxy"}

# kube-apiserver's LongRunningRequestCheck (genericfilters.BasicLongRunningRequestCheck): these
# verbs and subresources may run for as long as the connection lasts.
LONG_RUNNING_VERBS = frozenset({"watch", "proxy"})
LONG_RUNNING_SUBRESOURCES = frozenset({"attach", "exec", "proxy", "portforward"})

# Query keys that change the verb, the name or what an exec/attach session can do.
SINGLE_VALUED_PARAMS = frozenset(
    {
        "watch",
        "fieldSelector",
        "labelSelector",
        "limit",
        "timeoutSeconds",
        "container",
        "stdin",
        "stdout",
        "stderr",
        "tty",
        "follow",
    }
)

_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NO_QUERY: Mapping[str, list[str]] = {}


class AmbiguousRequestError(ValueError):
    """The gateway cannot be sure it reads the request as the apiserver would; refuse it.

    The message never quotes the target: it may hold credentials or control characters.
    """


@dataclass(frozen=True, slots=True)
class ExecParams:
    """What an exec, attach or portforward session asks for, decoded as the apiserver does."""

    command: tuple[str, ...] = ()
    container: str = ""
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    tty: bool = False
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestInfo:
    is_resource_request: bool
    # The decoded URL path, like Go's `URL.Path`.
    path: str
    # The Kubernetes verb for resource requests; the lower-cased HTTP method otherwise.
    # "" for methods the apiserver has no verb for: policy must treat it as unknown.
    verb: str
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    # Path segments from the resource on: resource/name/subresource/...
    parts: tuple[str, ...] = ()
    # Raw selectors, only for list/watch/deletecollection (as the apiserver records them).
    field_selector: str = ""
    label_selector: str = ""
    exec: ExecParams | None = None
    # The requested protocol upgrade ("websocket", "spdy/3.1"), lower-cased; "" for none.
    upgrade: str = ""
    # pods/log with `follow` true as the apiserver decodes it (any value but "0"/"false").
    follow: bool = False

    @property
    def resource_path(self) -> str:
        """`pods/exec` style, as RBAC rules name a resource and its subresource."""
        if self.subresource:
            return f"{self.resource}/{self.subresource}"
        return self.resource

    @property
    def is_connect(self) -> bool:
        """A request that opens a stream or tunnel into the cluster, not an API object read."""
        return self.is_resource_request and (
            self.subresource in CONNECT_SUBRESOURCES or self.verb == "proxy"
        )

    @property
    def is_websocket(self) -> bool:
        return "websocket" in self.upgrade

    @property
    def long_running(self) -> bool:
        """A call that lasts as long as its connection: a watch, a followed log, exec, attach,
        port-forward, proxy, or any protocol upgrade. kube's long-running check, except that a
        log is long-running only when followed (without `follow` it ends with the log)."""
        if self.upgrade:
            return True
        if not self.is_resource_request:
            return False
        return (
            self.verb in LONG_RUNNING_VERBS
            or self.subresource in LONG_RUNNING_SUBRESOURCES
            or self.follow
        )


def parse_request(method: str, target: str, headers: Mapping[str, str] | None = None) -> RequestInfo:
    """The RequestInfo of `method` on the raw request `target` (origin form: path and query).

    `headers` is a case-insensitive mapping (mitmproxy's `Headers`) or a dict with canonical
    or lower-case names; only `Upgrade` is read.
    Raises `AmbiguousRequestError` for targets that could be read in more than one way.
    """
    path, query = _split_target(target)
    segments = _path_segments(path)
    if "%" in path:
        path = "/" + "/".join(segments) + ("/" if path.endswith("/") and segments else "")
    upgrade = _upgrade(headers) if headers else ""
    params = _parse_query(query) if query else _NO_QUERY

    # A resource path needs at least prefix/version/resource (plus a group under /apis).
    n = len(segments)
    prefix = segments[0] if n else ""
    if n < 3 or prefix not in API_PREFIXES:
        return RequestInfo(False, path, method.lower(), upgrade=upgrade)
    if prefix in GROUPLESS_API_PREFIXES:
        group, version, rest = "", segments[1], segments[2:]
    elif n < 4:
        return RequestInfo(False, path, method.lower(), upgrade=upgrade)
    else:
        group, version, rest = segments[1], segments[2], segments[3:]

    verb_via_path_prefix = rest[0] in SPECIAL_VERBS
    if verb_via_path_prefix:
        if len(rest) < 2:
            raise AmbiguousRequestError("cannot determine the resource and namespace from the path")
        verb, rest = rest[0], rest[1:]
    else:
        verb = METHOD_VERBS.get(method, "")

    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        # /namespaces/{ns}/{resource}/..., unless it is the namespace's own subresource.
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]

    parts = tuple(rest)
    resource = parts[0]
    name = parts[1] if len(parts) >= 2 else ""
    subresource = ""
    if len(parts) >= 3 and verb not in SPECIAL_VERBS_NO_SUBRESOURCES:
        subresource = parts[2]

    if not name and verb == "get":
        verb, name = _list_or_watch(params)
    if not name and verb == "delete":
        verb = "deletecollection"

    field_selector = label_selector = ""
    if not verb_via_path_prefix and verb in VERBS_WITH_SELECTORS:
        field_selector = _first(params, "fieldSelector")
        label_selector = _first(params, "labelSelector")

    exec_params = None
    follow = False
    if resource == "pods" and not group:
        if subresource in STREAM_SUBRESOURCES:
            exec_params = _exec_params(subresource, params)
            if verb == "get":
                verb = "create"
        elif subresource == "log":
            follow = _go_bool(params, "follow")

    return RequestInfo(
        True,
        path,
        verb,
        prefix,
        group,
        version,
        namespace,
        resource,
        subresource,
        name,
        parts,
        field_selector,
        label_selector,
        exec_params,
        upgrade,
        follow,
    )


def _split_target(target: str) -> tuple[str, str]:
    if len(target) > MAX_TARGET_LENGTH:
        raise AmbiguousRequestError("request target is too long")
    if not target.startswith("/"):
        # Absolute form (https://host/path), authority form (CONNECT) and `*` are not API calls.
        raise AmbiguousRequestError("request target must be a path starting with '/'")
    # isascii + isprintable: no control characters, DEL or raw non-ASCII bytes anywhere.
    if not (target.isascii() and target.isprintable()):
        raise AmbiguousRequestError("request target contains control or non-ASCII characters")
    if " " in target or "\\" in target:
        raise AmbiguousRequestError("request target contains a space or a backslash")
    if "#" in target:
        raise AmbiguousRequestError("request target contains a fragment")
    path, _, query = target.partition("?")
    return path, query


def _path_segments(path: str) -> list[str]:
    """The decoded segments of `path`; refuses anything but one plain reading.

    kube splits the *decoded* path (Go's URL.Path) after trimming slashes, so an encoded `/`
    would move every later segment, and dot or empty segments could be cleaned away by a
    router or an intermediary. A single trailing slash is accepted: kube trims it too.
    """
    if path == "/":
        return []
    if "//" in path:
        raise AmbiguousRequestError("request path contains an empty segment")
    trimmed = path[1:-1] if path.endswith("/") else path[1:]
    segments = trimmed.split("/")
    if len(segments) > MAX_PATH_SEGMENTS:
        raise AmbiguousRequestError("request path has too many segments")
    encoded = "%" in trimmed
    if encoded:
        segments = [_decode_segment(s) if "%" in s else s for s in segments]
    if encoded or "." in trimmed:
        for s in segments:
            if s == "." or s == "..":
                raise AmbiguousRequestError("request path contains a dot segment")
    return segments


def _decode_segment(segment: str) -> str:
    """Percent-decode one path segment as Go does, refusing what would read differently.

    Encoded characters are allowed (Python and JavaScript clients encode `:` and `@` in names),
    except those that change the structure or may be decoded again on the way: `/`, `\\`, `%`
    (double encoding), control characters, and bytes that are not UTF-8.
    """
    decoded = _strict_unquote(segment, "request path")
    if "/" in decoded or "\\" in decoded or "%" in decoded:
        raise AmbiguousRequestError("request path contains an encoded '/', '\\' or '%'")
    if not decoded.isprintable():
        raise AmbiguousRequestError("request path contains encoded control characters")
    return decoded


def _strict_unquote(text: str, where: str) -> str:
    chunks = text.split("%")
    for chunk in chunks[1:]:
        if len(chunk) < 2 or chunk[0] not in _HEX or chunk[1] not in _HEX:
            raise AmbiguousRequestError(f"{where} contains an invalid percent-encoding")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousRequestError(f"{where} percent-encodes bytes that are not UTF-8") from None


def _parse_query(query: str) -> dict[str, list[str]]:
    """Parse a query string as Go's `url.ParseQuery`, refusing the inputs Go would drop.

    Go skips pairs containing `;` and pairs with bad percent-encoding, where other parsers
    keep them; such a pair could carry a `watch` or `command` only one side sees.
    """
    if ";" in query:
        raise AmbiguousRequestError("request query contains a ';'")
    params: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        key = _unquote_query(key)
        value = _unquote_query(value)
        if "\x00" in key or "\x00" in value:
            raise AmbiguousRequestError("request query contains NUL")
        values = params.get(key)
        if values is None:
            params[key] = [value]
        elif key in SINGLE_VALUED_PARAMS:
            raise AmbiguousRequestError(f"request query repeats the parameter {key!r}")
        else:
            values.append(value)
    return params


def _unquote_query(text: str) -> str:
    if "+" in text:
        text = text.replace("+", " ")
    if "%" in text:
        return _strict_unquote(text, "request query")
    return text


def _first(params: Mapping[str, list[str]], key: str) -> str:
    values = params.get(key)
    return values[0] if values else ""


def _go_bool(params: Mapping[str, list[str]], key: str) -> bool:
    """runtime.Convert_Slice_string_To_bool: absent is false; "0" and "false" (any case) are
    false; anything else, the empty string included, is true."""
    values = params.get(key)
    if not values:
        return False
    value = values[0]
    if not value.isascii():
        # Go compares with Unicode case folding ("falſe" is "false"); don't guess.
        raise AmbiguousRequestError(f"request query parameter {key!r} is not ASCII")
    return not (value == "0" or value.lower() == "false")


def _is_go_int64(text: str) -> bool:
    """strconv.ParseInt(text, 10, 64) would succeed."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not all(c in _DIGITS for c in digits):
        return False
    return _INT64_MIN <= int(text) <= _INT64_MAX


def _list_or_watch(params: Mapping[str, list[str]]) -> tuple[str, str]:
    """A nameless get is a list or a watch; a `metadata.name` field selector names the object."""
    verb = "watch" if _go_bool(params, "watch") else "list"
    selector = _first(params, "fieldSelector")
    if not selector or "metadata.name" not in selector:
        return verb, ""
    # The apiserver drops the selector's name when any list option fails to decode.
    for key in ("limit", "timeoutSeconds"):
        if key in params and not _is_go_int64(params[key][0]):
            return verb, ""
    if _first(params, "labelSelector"):
        return verb, ""
    name = _field_selector_name(selector)
    # content.IsPathSegmentName: the name must be usable as a path segment.
    if not name or name in (".", "..") or "/" in name or "%" in name:
        return verb, ""
    return verb, name


def _field_selector_name(selector: str) -> str:
    """The value `selector` requires for `metadata.name`, as fields.ParseSelector +
    RequiresExactMatch find it; "" when there is none or the selector does not parse."""
    terms = _split_selector_terms(selector)
    terms.sort()
    name: str | None = None
    for term in terms:
        if not term:
            continue
        eq = term.find("=")
        ne = term.find("!=")
        if eq == -1:
            return ""  # no operator: invalid selector
        if ne != -1 and ne < eq:
            field, op, raw = term[:ne], "!=", term[ne + 2 :]
        elif term.startswith("==", eq):
            field, op, raw = term[:eq], "==", term[eq + 2 :]
        else:
            field, op, raw = term[:eq], "=", term[eq + 1 :]
        value = _unescape_selector_value(raw)
        if value is None:
            return ""
        if name is None and op != "!=" and field == "metadata.name":
            name = value
    return name or ""


def _split_selector_terms(selector: str) -> list[str]:
    terms: list[str] = []
    start = 0
    escaped = False
    for i, c in enumerate(selector):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ",":
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return terms


def _unescape_selector_value(raw: str) -> str | None:
    """fields.UnescapeValue; None where Go returns an error."""
    if "\\" not in raw and "," not in raw and "=" not in raw:
        return raw
    out: list[str] = []
    escaped = False
    for c in raw:
        if escaped:
            if c not in "\\,=":
                return None
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in ",=":
            return None
        else:
            out.append(c)
    return None if escaped else "".join(out)


def _exec_params(subresource: str, params: Mapping[str, list[str]]) -> ExecParams:
    if subresource == "portforward":
        return ExecParams(ports=_ports(params.get("ports", ())))
    return ExecParams(
        command=tuple(params.get("command", ())) if subresource == "exec" else (),
        container=_first(params, "container"),
        stdin=_go_bool(params, "stdin"),
        stdout=_go_bool(params, "stdout"),
        stderr=_go_bool(params, "stderr"),
        tty=_go_bool(params, "tty"),
    )


def _ports(values: list[str] | tuple[()]) -> tuple[int, ...]:
    """metav1.Convert_Slice_string_To_Slice_int32: repeated and comma-separated uint16s."""
    ports: list[int] = []
    for value in values:
        for item in value.split(","):
            if not item or not all(c in _DIGITS for c in item) or int(item) > 65535:
                raise AmbiguousRequestError("request query has an invalid port")
            ports.append(int(item))
    return tuple(ports)


def _upgrade(headers: Mapping[str, str]) -> str:
    """The protocol(s) the `Upgrade` header asks for, lower-cased.

    Reported even when `Connection` does not name the upgrade (the server would then not
    switch protocols): for a policy deciding whether a request may open a stream, saying
    "upgrade" too often is the safe side.
    """
    upgrade = headers.get("Upgrade")
    if upgrade is None and type(headers) is dict:
        # Case-insensitive mappings (mitmproxy's Headers) answered already; one lookup there
        # costs microseconds, so it is not repeated.
        upgrade = headers.get("upgrade")
    return upgrade.strip().lower() if upgrade else ""


# --- connection upgrades ---------------------------------------------------------------------------

_WEBSOCKET_KEY_LENGTH = 16  # RFC 6455 4.1: the key is 16 random bytes, base64-encoded
_UPGRADE_NAME_LENGTHS = frozenset((len(b"upgrade"), len(b"connection")))


def upgrade_refusal(method: str, http_version: str, fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why an upgrade request cannot be inspected, in words for the caller; None for a request
    that asks for no upgrade, or for a well-formed WebSocket handshake (RFC 6455 4.1).

    `fields` are the raw header fields, (name, value) byte pairs as mitmproxy's `Headers.fields`.
    An upgrade is asked for by any `Upgrade` header, or by a `Connection` header that mentions
    "upgrade" anywhere: kube-apiserver's `httpstream.IsUpgradeRequest` looks only at that, and its
    proxies then relay whatever the backend switches to. The answer never quotes header values.
    """
    fields = tuple(fields)
    # This runs on every call, and most ask for no upgrade: find that out cheaply first.
    for name, _ in fields:
        if len(name) in _UPGRADE_NAME_LENGTHS and name.lower() in (b"upgrade", b"connection"):
            break
    else:
        return None
    upgrades: list[bytes] = []
    connections: list[bytes] = []
    versions: list[bytes] = []
    keys: list[bytes] = []
    for name, value in fields:
        lname = name.lower()
        if lname == b"upgrade":
            upgrades.append(value)
        elif lname == b"connection":
            connections.append(value.lower())
        elif lname == b"sec-websocket-version":
            versions.append(value)
        elif lname == b"sec-websocket-key":
            keys.append(value)
    if not upgrades and not any(b"upgrade" in c for c in connections):
        return None
    if not upgrades:
        return "a connection upgrade without an Upgrade header"
    protocols = {p.strip().lower() for u in upgrades for p in u.split(b",")}
    if protocols != {b"websocket"}:
        if any(p.startswith(b"spdy/") for p in protocols):
            return "a SPDY upgrade"
        return "an upgrade to another protocol"
    what = "a malformed WebSocket handshake"
    # A WebSocket handshake the gateway (and mitmproxy's WebSocket layer) reads exactly one way.
    if len(upgrades) != 1 or upgrades[0].strip().lower() != b"websocket":
        return f"{what} (Upgrade must be exactly 'websocket', once)"
    if not any(token.strip() == b"upgrade" for c in connections for token in c.split(b",")):
        return f"{what} (Connection must name 'upgrade')"
    if method != "GET" or http_version != "HTTP/1.1":
        return f"{what} (it must be an HTTP/1.1 GET)"
    if len(versions) != 1 or versions[0].strip() != b"13":
        return f"{what} (Sec-WebSocket-Version must be 13, once)"
    if len(keys) != 1 or not _is_websocket_key(keys[0].strip()):
        return f"{what} (Sec-WebSocket-Key must be one base64 nonce of 16 bytes)"
    return None


def _is_websocket_key(key: bytes) -> bool:
    if len(key) != 24:
        return False
    try:
        return len(b64decode(key, validate=True)) == _WEBSOCKET_KEY_LENGTH
    except (binascii.Error, ValueError):
        return False
