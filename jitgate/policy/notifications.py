"""The `notifications:` section: webhooks told about access requests and decisions."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from jitgate.notify.webhooks import EVENT_PREFIX, FORMATS, KINDS, Webhook
from jitgate.policy.schema import Bool, Field, FilePath, Int, ListOf, Map, Number, OneOf, Section, Str, Strings, Values, dataclass_default

if TYPE_CHECKING:
    # Only for annotations: policy.py reads this module's config, and `jitgate policy check`
    # should not pay for importing aiohttp, which is imported where deliveries start.

    from jitgate.policy.document import Node

logger = logging.getLogger("jitgate.notify")


REFERENCE = Section(
    "value_reference",
    "A value kept out of the policy file (for `url`, `secret` and header values).",
    (
        Field("file", FilePath(), "Read the value from this file (the trailing newline is stripped)."),
        Field("env", Str(), "Read the value from this environment variable."),
    ),
    exactly_one=("file", "env"),
)

# `url`, `secret` and each header value: inline, or `{file: path}` / `{env: NAME}` to keep
# credentials out of the policy file.
SECRET = OneOf((Str(), REFERENCE))


def _default(name: str):
    return dataclass_default(Webhook, name)


WEBHOOK = Section("webhook", "A receiver of access request events.", (
    Field("url", SECRET, "Receiver URL: `https://` (plain `http://` only with `allow_insecure`), without credentials "
          "(put them in `headers`).", required=True),
    Field("name", Str(), "How logs and stats refer to it; unique.", shown_default="`scheme://host:port` of the url"),
    Field("format", Str(choices=FORMATS, noun="format"), "`json` (signed with `X-Jitgate-Signature` when `secret` "
          "is set) or `slack`.", default=_default("format")),
    Field("events", Strings(), f"Events to send: {', '.join(KINDS)} (the `{EVENT_PREFIX}` prefix is optional).",
          shown_default="all"),
    Field("headers", Map(SECRET), "Extra HTTP headers, e.g. `Authorization`."),
    Field("secret", SECRET, "Key of the HMAC signature in `X-Jitgate-Signature`."),
    Field("ca_file", FilePath(), "CA bundle that verifies the receiver; default: the system's."),
    Field("timeout", Number(), "Seconds per attempt, connecting to reading the response.", default=_default("timeout")),
    Field("max_attempts", Int(), "Attempts per event before it is dropped.", default=_default("max_attempts")),
    Field("backoff", Number(), "Seconds before the first retry; doubles each time, with jitter.", default=_default("backoff")),
    Field("max_backoff", Number(), "Longest delay between retries, in seconds.", default=_default("max_backoff")),
    Field("max_retry_after", Number(), "A receiver's `Retry-After` is honoured up to this many seconds.",
          default=_default("max_retry_after")),
    Field("allow_insecure", Bool(), "Allow a plain `http://` url (events say who gets access to what).",
          default=_default("allow_insecure")),
))

NOTIFICATIONS = Section("notifications", "Who is told about access requests and decisions.", (
    Field("webhooks", ListOf(WEBHOOK), "Receivers of access request events."),
))


def parse_notifications(node: Node | None) -> tuple[Webhook, ...]:
    """The policy's `notifications:` section (`{webhooks: [...]}`); no section, no webhooks."""
    if node is None:
        return ()
    return _webhooks(NOTIFICATIONS.read_node(node)["webhooks"])


def parse_webhooks(nodes: Iterable[Node]) -> tuple[Webhook, ...]:
    """Webhooks from policy nodes, e.g. `parse_webhooks(section.children("webhooks"))`."""
    return _webhooks(WEBHOOK.read_node(node) for node in nodes)


def _webhooks(items: Iterable[Values]) -> tuple[Webhook, ...]:
    webhooks: list[Webhook] = []
    names: dict[str, Node] = {}
    for v in items:
        node = v.node
        headers = {name: _resolve(value) for name, value in (v["headers"] or {}).items()}
        events = v["events"]
        webhook = _located(node, functools.partial(
            Webhook,
            url=_resolve(v["url"]),
            name=v["name"] or "",
            format=v["format"],
            events=frozenset(e.removeprefix(EVENT_PREFIX) for e in events) if events else frozenset(KINDS),
            headers=headers,
            secret=_resolve(v["secret"]),
            ca_file=v["ca_file"],
            timeout=v["timeout"],
            max_attempts=v["max_attempts"],
            backoff=v["backoff"],
            max_backoff=v["max_backoff"],
            max_retry_after=v["max_retry_after"],
            allow_insecure=v["allow_insecure"],
        ))
        if webhook.name in names:
            # Logs and stats name webhooks; two with one name could not be told apart.
            key = "name" if v["name"] else "url"
            raise node.error(key, f"another webhook is already named {webhook.name!r}; give this one a distinct `name`")
        names[webhook.name] = node
        webhooks.append(webhook)
    return tuple(webhooks)


def _located(node: Node, make: Callable[[], Webhook]) -> Webhook:
    """Build a Webhook, reporting its ValueError ("field: problem") at that field's line."""
    try:
        return make()
    except ValueError as e:
        key, sep, problem = str(e).partition(": ")
        if sep and key in node.data:
            raise node.error(key, problem) from None
        raise node.error(None, str(e)) from None


def _resolve(value: str | Values | None) -> str | None:
    """An inline value as written, or the value a `{file: path}` / `{env: NAME}` reference names."""
    if value is None or isinstance(value, str):
        return value
    if value["file"] is not None:
        source = "file"
        try:
            text = value["file"].read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise value.error("file", f"cannot read: {e}") from None
    else:
        source, env = "env", value["env"]
        text = os.environ.get(env, "")
        if not text:
            raise value.error("env", f"environment variable {env} is not set or empty")
    if not text.strip():
        raise value.error(source, "the value is empty")
    return text
