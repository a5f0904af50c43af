"""Asking the cluster for bodies the gateway can read, and telling which body is which.

kubectl asks for `application/json;as=Table;v=v1;g=meta.k8s.io`, client-go for JSON, controllers
for protobuf; client-go decodes a JSON answer to a protobuf request fine, so protobuf media types
become JSON ones with the same parameters (`as=Table` kept), and the stream framing parameter goes.
"""

from __future__ import annotations

PROTOBUF = "application/vnd.kubernetes.protobuf"
JSON = "application/json"


def json_accept(accept: str) -> str:
    """`Accept` with every protobuf alternative turned JSON, duplicates dropped, order kept."""
    if "protobuf" not in accept and "yaml" not in accept and "cbor" not in accept:
        return accept
    out: list[str] = []
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        media = media.strip().lower()
        if media in (PROTOBUF, "application/yaml", "application/cbor", "application/apply-patch+cbor") or "protobuf" in media:
            kept = [p.strip() for p in params.split(";") if p.strip() and not p.strip().startswith(("stream=", "q="))]
            item = ";".join([JSON, *kept])
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return ",".join(out) or JSON


def body_kind(content_type: str) -> str:
    """"json", "text", "empty" or "other" (what masking cannot read)."""
    media = content_type.partition(";")[0].strip().lower()
    if not media:
        return "empty"
    if media == JSON or media.endswith("+json"):
        return "json"
    if media.startswith("text/"):
        return "text"
    return "other"
