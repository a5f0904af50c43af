"""The audit log's hash chain: every line commits to the line before it, across rotated files.

A chained line is the event's compact JSON with one member added at its end:

    {...the event...,"jitgate.dev/chain":{"seq":42,"prev":"<64 hex>","hash":"<64 hex>"}}

- `seq`: 1 for the first line of a chain, then +1 per line; it goes on across rotated files.
- `prev`: the `hash` of the line before (`GENESIS`, 64 zeros, for seq 1).
- `hash`: lowercase hex SHA-256 of

      b"jitgate-audit-chain/1\\n" + prev + b"\\n" + decimal seq + b"\\n" + body

  where `body` is the line as it would be without the chain member: the bytes before
  `,"jitgate.dev/chain":` followed by `}` (the event's JSON exactly as written).

The hash covers the bytes as written rather than a re-serialized canonical form: that costs one
SHA-256 per line (about 1 µs here) where a second, key-sorted `json.dumps` of an event costs about
14 µs, on a path the proxy takes twice per call. The price: a verifier works on the original
bytes, so a copy whose JSON was parsed and re-serialized cannot be checked (the OCSF sink ships
the original line in `raw_data` for that).

What a chain catches: any changed byte (the line's hash no longer matches), a removed, inserted,
duplicated or reordered line (seq and prev no longer follow). What it cannot catch alone: someone
who rewrites every line from the change onwards and recomputes their hashes, or cuts lines off
the end. The head (seq, hash) is therefore also checkpointed in SQLite (`checkpoint.py`), and a
copy kept elsewhere (a SIEM, `sinks.py`) is what holds against someone who can write both.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import NamedTuple

CHAIN_KEY = "jitgate.dev/chain"
GENESIS = "0" * 64
_DOMAIN = b"jitgate-audit-chain/1\n"

# The chain member exactly as the writer formats it, at the very end of a line.
_MEMBER = re.compile(
    rb'"jitgate\.dev/chain":\{"seq":([1-9][0-9]{0,18}),"prev":"([0-9a-f]{64})","hash":"([0-9a-f]{64})"\}\}\Z'
)


class Head(NamedTuple):
    """The last line of a chain: what the next line links to."""

    seq: int
    hash: str


def link_hash(prev: str, seq: int, body: bytes) -> str:
    digest = hashlib.sha256(_DOMAIN)
    digest.update(b"%s\n%d\n" % (prev.encode("ascii"), seq))
    digest.update(body)
    return digest.hexdigest()


def chained_line(body: bytes, head: Head | None) -> tuple[bytes, Head]:
    """The line (without its newline) that follows `head` for an event serialized as `body`
    (compact JSON of an object), and the new head."""
    seq, prev = (1, GENESIS) if head is None else (head.seq + 1, head.hash)
    digest = link_hash(prev, seq, body)
    member = b'"jitgate.dev/chain":{"seq":%d,"prev":"%s","hash":"%s"}}' % (seq, prev.encode(), digest.encode())
    if body == b"{}":
        return b"{" + member, Head(seq, digest)
    return b"".join((body[:-1], b",", member)), Head(seq, digest)


@dataclass(frozen=True, slots=True)
class Link:
    """One chained line as read back."""

    seq: int
    prev: str
    hash: str
    intact: bool  # the line's content still matches its hash

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)


class Unchained:
    """A whole JSON object without a chain member (written before chaining was on, or inserted)."""


class Fragment:
    """Not a JSON object: part of a line a failing disk took, or damage."""


class Malformed:
    """Names the chain member, but not in the form the writer produces."""

    def __init__(self, why: str) -> None:
        self.why = why


UNCHAINED = Unchained()
FRAGMENT = Fragment()


def read_line(line: bytes) -> Link | Unchained | Fragment | Malformed:
    """What one line (without its newline) of an audit log is."""
    line = line.rstrip(b"\r")
    m = _MEMBER.search(line)
    if m is not None:
        start = m.start()
        if line[start - 1 : start] == b",":
            body = line[: start - 1] + b"}"
        elif line[:start] == b"{":
            body = b"{}"
        else:
            return Malformed("the chain member does not follow the event's last member")
        seq, prev, digest = int(m.group(1)), m.group(2).decode(), m.group(3).decode()
        return Link(seq, prev, digest, link_hash(prev, seq, body) == digest)
    try:
        value = json.loads(line)
    except ValueError:
        return FRAGMENT
    if not isinstance(value, dict):
        return FRAGMENT
    if CHAIN_KEY in value:
        return Malformed("the chain member is not in the writer's form")
    return UNCHAINED
