"""The `notifications:` section: webhooks told about access requests and decisions."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from jitgate.notify.webhooks import EVENT_PREFIX, KINDS, Webhook

if TYPE_CHECKING:
    # Only for annotations: policy.py reads this module's config, and `jitgate policy check`
    # should not pay for importing aiohttp, which is imported where deliveries start.

    from jitgate.policy.document import Node

logger = logging.getLogger("jitgate.notify")



def parse_notifications(node: Node | None) -> tuple[Webhook, ...]:
    """The policy's `notifications:` section (`{webhooks: [...]}`); no section, no webhooks."""
    if node is None:
        return ()
    webhooks = parse_webhooks(node.children("webhooks"))
    node.finish()
    return webhooks


def parse_webhooks(nodes: Iterable[Node]) -> tuple[Webhook, ...]:
    """Webhooks from policy nodes, e.g. `parse_webhooks(section.children("webhooks"))`.

    `url`, `secret` and each header value may be given inline or, to keep credentials out of the
    policy file, as `{file: path}` (read, trailing newline stripped) or `{env: NAME}`."""
    webhooks: list[Webhook] = []
    names: dict[str, Node] = {}
    for node in nodes:
        headers_node = node.child("headers")
        headers: dict[str, str] = {}
        if headers_node is not None:
            for key in list(headers_node.data):
                headers[str(key)] = _credential(headers_node, str(key), required=True)
            headers_node.finish()
        events = node.strings("events")
        explicit_name = node.string("name")
        webhook = _located(node, lambda: Webhook(
            url=_credential(node, "url", required=True),
            name=explicit_name or "",
            format=node.string("format", default="json"),
            events=frozenset(e.removeprefix(EVENT_PREFIX) for e in events) if events else frozenset(KINDS),
            headers=headers,
            secret=_credential(node, "secret"),
            ca_file=node.path_value("ca_file"),
            timeout=node.get("timeout", (int, float), default=10.0),
            max_attempts=node.get("max_attempts", int, default=5),
            backoff=node.get("backoff", (int, float), default=1.0),
            max_backoff=node.get("max_backoff", (int, float), default=60.0),
            max_retry_after=node.get("max_retry_after", (int, float), default=300.0),
            allow_insecure=node.get("allow_insecure", bool, default=False),
        ))
        if webhook.name in names:
            # Logs and stats name webhooks; two with one name could not be told apart.
            key = "name" if explicit_name else "url"
            raise node.error(key, f"another webhook is already named {webhook.name!r}; give this one a distinct `name`")
        names[webhook.name] = node
        node.finish()
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


def _credential(node: Node, key: str, required: bool = False) -> str | None:
    value = node.get(key, (str, dict), required)
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value.strip():
            raise node.error(key, "must not be empty")
        return value
    ref = node.child(key)
    sources = [k for k in ("file", "env") if k in ref.data]
    if len(sources) != 1:
        raise ref.error(None, "expected a string, or a mapping with exactly one of file, env")
    if sources[0] == "file":
        path = ref.path_value("file", required=True)
        try:
            text = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ref.error("file", f"cannot read: {e}") from None
    else:
        env = ref.string("env", required=True)
        text = os.environ.get(env, "")
        if not text:
            raise ref.error("env", f"environment variable {env} is not set or empty")
    ref.finish()
    if not text.strip():
        raise ref.error(sources[0], "the value is empty")
    return text


