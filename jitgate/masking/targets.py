"""The command of an exec/attach target (`?command=...&command=...`), through the masking detectors.

kubectl sends an exec's command as query parameters, so a secret typed on the command line
(`env DB_PASSWORD=s3cret ...`) would otherwise sit in every request target the gateway keeps: the
audit event's requestURI, recordings. Each `command` value is decoded, masked alone, and re-encoded;
everything else in the target stays byte for byte. Plain Python (no mitmproxy).
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from jitgate.masking.detectors import DetectorSet


def mask_command_query(target: str, detectors: DetectorSet) -> tuple[str, int]:
    """(`target` with each `command=` value masked, how many values were)."""
    path, sep, query = target.partition("?")
    if not sep or "command=" not in query:
        return target, 0
    pairs = query.split("&")
    count = 0
    for i, pair in enumerate(pairs):
        key, eq, value = pair.partition("=")
        if key == "command" and eq:
            text = unquote(value.replace("+", " "))
            masked, n = detectors.mask_text(text)
            if n:
                pairs[i] = "command=" + quote(masked, safe="")
                count += n
    return path + "?" + "&".join(pairs), count
