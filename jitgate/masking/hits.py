"""Masking a JSON body from where its secret words are, without parsing it when nothing needs structure.

Most bodies that name a secret word do so harmlessly: every real pod has a `serviceAccountToken`
volume source with `"path":"token"`, a `secretKeyRef` of an env var, a `/var/run/secrets/...` mount.
Parsing such a body and walking every string costs more than proxying it does, to change nothing.

Instead, the strings that hold one of the literals the detectors and secret names are made of are
found in the raw bytes in one pass (`jitgate.masking._scan`, C; `py_string_hits` is the same in
Python, used when the extension is not built and by the tests that compare the two). Every literal
has a character JSON allows only inside strings, so each hit lies in one string token. That string is:
- a *key*: it matters only if its name says secret and it is a member of an `annotations`, `data`,
  `binaryData` or `stringData` map (the only places the object walk masks by key name);
- the value of `kind` (a Secret, or anything else a literal spells), of the last-applied
  annotation, or of `name` with a secret name in an object with a `value` (an env var): these need
  the object walk;
- any other value: it goes through the detectors, and a masked one is spliced back in place.

Values that pass unmasked are remembered across bodies (a list repeats its mount paths, env names,
container ids call after call), and the scan itself passes over them and over keys outside those
maps: on a pod list seen before, Python gets no hit to look at.

When anything needs structure, or the body is one a byte scan cannot read exactly (a `\\u` escape,
letters that case-fold to ASCII ones, detectors without literals, custom literals JSON allows
outside strings), `scan` answers None and the caller walks the parsed object.
tests/test_masking_hits.py checks on generated bodies that both ways give the same object.
Plain Python (no mitmproxy).
"""

from __future__ import annotations

import json
import re

from jitgate.masking.detectors import _FOLDS_TO_ASCII, DetectorSet

try:
    from jitgate.masking._scan import string_hits as _c_string_hits
except ImportError:  # not built (no compiler where it was installed): the Python twin, slower
    _c_string_hits = None

_LAST_APPLIED = b"kubectl.kubernetes.io/last-applied-configuration"
# Characters JSON allows outside strings: a literal made only of these could be read outside one.
_OUTSIDE_STRINGS = frozenset(b" \t\r\n,:[]{}0123456789+-.eEtruefalsn")
# Maps whose members the object walk masks by key name.
NAMED_MAPS = (b"annotations", b"data", b"binaryData", b"stringData")
_WS = b" \t\r\n"
QUOTE, BACKSLASH, COLON = 0x22, 0x5C, 0x3A
# Past this many distinct strings with hits, the object walk is as cheap and simpler to trust.
MAX_STRINGS = 4096
# The unmasked values remembered across bodies (`HitScanner.clean`): how many, how long each
# (its span: key and value, so that neither a long key nor a long value is kept).
CLEAN_VALUES = 4096
CLEAN_SPAN_MAX = 640
_decode_string = json.JSONDecoder().decode
_raw_decode = json.JSONDecoder().raw_decode
_encode_string = json.JSONEncoder(ensure_ascii=False).encode


class NeedsWalk(Exception):
    """Internal: the body needs the parsed object walk."""


class HitScanner:
    """Masks the strings of a JSON body that the literals hit, in place, or says it cannot."""

    def __init__(self, detectors: DetectorSet, native: bool = True) -> None:
        self.detectors = detectors
        prefilter = detectors.names_prefilter
        lowered = list(prefilter.lowered)
        if b"secret" not in lowered and not any(x in b"secret" for x in lowered):
            lowered.append(b"secret")  # a Secret's kind must always be seen, whatever the policy's words
        exact = list(prefilter.exact) + [x for r in prefilter.exact_res for x in _alternatives(r)]
        self.usable = (not detectors.unhinted and bool(lowered or exact) and len(lowered) <= 64 and len(exact) <= 64
                       and all(QUOTE not in lit and BACKSLASH not in lit for lit in lowered + exact)
                       and all(any(c not in _OUTSIDE_STRINGS for c in lit) for lit in lowered + exact))
        self.lowered = tuple(lowered)
        self.exact = tuple(exact)
        self.string_hits = _c_string_hits if native and _c_string_hits is not None else py_string_hits
        # Values the detectors leave as they are, across bodies, by their span (from the key's opening
        # quote to the value's closing one): a list returns the same container ids, mount paths and
        # env names call after call, and the scan passes over them (string_hits' `clean`). Each maps
        # to whether it is a `name` that says secret (its env var must have no value of its own).
        # Only values that pass unmasked (what the client gets anyway) are kept, never one with a
        # secret in it; bounded.
        self.clean: dict[bytes, bool] = {}

    def scan(self, body: bytes) -> tuple[bytes, int] | None:
        """(body with detected values masked, how many), or None when the object walk must decide."""
        if not self.usable:
            return None
        if not body.isascii() and any(c in body for c in _FOLDS_TO_ASCII):
            return None
        hits = self.string_hits(body, self.lowered, self.exact, MAX_STRINGS, NAMED_MAPS, self.clean)
        if hits is None:
            return None
        try:
            return self._mask(body, hits)
        except NeedsWalk:
            return None

    def _mask(self, body: bytes, hits: list[tuple[int, int, int, int, int]]) -> tuple[bytes, int]:
        """The hits the scan left: keys in a map the walk masks by name, values not known clean."""
        is_secret_name = self.detectors.is_secret_name
        pieces: list[bytes] = []
        done = 0
        count = 0
        clean = self.clean
        for start, end, is_key, key_start, key_end in hits:
            if is_key:  # a key matters only as a name in a map the walk masks by name
                if key_start >= 0 and body[key_start + 1:key_end] in NAMED_MAPS and is_secret_name(_text(body[start + 1:end])):
                    raise NeedsWalk
                continue
            raw_key = body[key_start + 1:key_end] if key_start >= 0 else None
            raw = body[start + 1:end]
            key = raw_key if raw_key is None or BACKSLASH not in raw_key else _text(raw_key).encode()
            outcome = self._value(raw, key)
            if outcome is None:
                raise NeedsWalk
            masked, n, env_name = outcome
            # A `name` that says secret decides by its neighbours: an env var with a value of its own.
            if env_name and _has_value(body, start):
                raise NeedsWalk
            if n:
                pieces.append(body[done:start])
                pieces.append(masked)
                done = end + 1
                count += n
                continue
            span_start = key_start if key_start >= 0 else start
            if end + 1 - span_start <= CLEAN_SPAN_MAX:  # remembered: the scan passes over it next time
                if len(clean) >= CLEAN_VALUES:
                    clean.clear()
                clean[body[span_start:end + 1]] = env_name
        if not count:
            return body, 0
        pieces.append(body[done:])
        return b"".join(pieces), count

    def _value(self, raw: bytes, key: bytes | None) -> tuple[bytes, int, bool] | None:
        """A value string masked by the detectors (its JSON, how many, whether it is a `name` that
        says secret, which an env var's value depends on), or None: it needs the walk."""
        if key == b"kind" or key == _LAST_APPLIED:
            return None
        text = _text(raw)
        env_name = key == b"name" and self.detectors.is_secret_name(text)
        masked, n = self.detectors.mask_text(text)
        return (_encode_string(masked).encode(), n, env_name) if n else (b"", 0, env_name)


def py_string_hits(body: bytes, lowered: tuple[bytes, ...], exact: tuple[bytes, ...], max_strings: int,
                   named_maps: tuple[bytes, ...] | None = None,
                   clean: dict[bytes, bool] | None = None) -> list[tuple[int, int, int, int, int]] | None:
    """What jitgate.masking._scan.string_hits answers (see _scan.c), in Python."""
    if (named_maps is None) != (clean is None):
        raise TypeError("named_maps and clean go together")
    if b"\\u" in body or b"\\/" in body:
        return None
    positions: list[int] = []
    low = body.lower()
    for literal in lowered:
        pos = low.find(literal)
        while pos >= 0:
            positions.append(pos)
            pos = low.find(literal, pos + 1)
    for literal in exact:
        pos = body.find(literal)
        while pos >= 0:
            positions.append(pos)
            pos = body.find(literal, pos + 1)
    positions.sort()
    out: list[tuple[int, int, int, int, int]] = []
    found = 0
    end = -1
    try:
        for pos in positions:
            if pos <= end:
                continue
            start, end = _quote_before(body, pos), _quote_after(body, pos)
            after = _skip_ws(body, end + 1)
            is_key = after < len(body) and body[after] == COLON
            if not is_key:
                key_start, key_end = _key_before(body, start)
            else:
                brace = _object_start(body, start)
                key_start, key_end = _key_before(body, brace) if brace >= 0 else (-1, -1)
            found += 1
            if found > max_strings:
                return None
            if clean is not None:
                if is_key:
                    if key_start < 0 or body[key_start + 1:key_end] not in named_maps:
                        continue
                else:
                    env_name = clean.get(body[key_start if key_start >= 0 else start:end + 1])
                    if env_name is not None:
                        if env_name and _has_value(body, start):
                            return None  # an env var with a value of its own: the walk decides
                        continue
            out.append((start, end, int(is_key), key_start, key_end))
    except NeedsWalk:
        return None
    return out


def _text(raw: bytes) -> str:
    """A JSON string's content (without its quotes) as text."""
    if BACKSLASH in raw:
        return _decode_string('"' + raw.decode("utf-8") + '"')
    return raw.decode("utf-8")


def _alternatives(regex: re.Pattern) -> list[bytes]:
    """The literals of a first-byte group pattern (`A(?:KIA|SIA)` -> AKIA, ASIA)."""
    first, rest = regex.pattern[:1], regex.pattern[1:]
    inner = rest[3:-1]  # strip "(?:" and ")"
    return [first + re.sub(rb"\\(.)", rb"\1", alt) for alt in inner.split(b"|")]


def _escaped(body: bytes, pos: int) -> bool:
    """Whether the quote at `pos` is escaped: an odd number of backslashes before it."""
    if pos == 0 or body[pos - 1] != BACKSLASH:
        return False
    n = 0
    pos -= 1
    while pos >= 0 and body[pos] == BACKSLASH:
        n += 1
        pos -= 1
    return n % 2 == 1


def _quote_before(body: bytes, pos: int) -> int:
    while True:
        pos = body.rfind(b'"', 0, pos)
        if pos < 0:
            raise NeedsWalk  # not inside a string: not JSON the scan can read
        if not _escaped(body, pos):
            return pos


def _quote_after(body: bytes, pos: int) -> int:
    while True:
        pos = body.find(b'"', pos)
        if pos < 0:
            raise NeedsWalk
        if not _escaped(body, pos):
            return pos
        pos += 1


def _skip_ws(body: bytes, pos: int) -> int:
    while pos < len(body) and body[pos] in _WS:
        pos += 1
    return pos


_SPECIAL = re.compile(rb'["{}\[\]]')
# The rest of an env var taken from elsewhere, to its end: `,"valueFrom":{"secretKeyRef":{...}}}`.
_ENV_FROM = re.compile(rb'[ \t\r\n]*,[ \t\r\n]*"valueFrom"[ \t\r\n]*:[ \t\r\n]*\{[ \t\r\n]*'
                       rb'"(?:secretKeyRef|configMapKeyRef|fieldRef|resourceFieldRef)"[ \t\r\n]*:[ \t\r\n]*\{'
                       rb'(?:"(?:[^"\\]|\\.)*"|[^"{}\[\]])*\}[ \t\r\n]*\}[ \t\r\n]*\}')
# The start of an object whose first member is `name` (just before the name's value).
_NAME_FIRST = re.compile(rb'\{[ \t\r\n]*"name"[ \t\r\n]*:[ \t\r\n]*$')
_BACK_WINDOW = 8192  # bytes looked back for the start of an env var object; past it the walk decides


def _has_value(body: bytes, name_start: int) -> bool:
    """Whether the object holding the `name` member whose value starts at `name_start` also has a
    non-empty string `value` (an env var `{"name": ..., "value": ...}`; one with `valueFrom` holds
    no value to mask). Members after the name are read forwards, those before it backwards."""
    name_end = _quote_after(body, name_start + 1) + 1
    if _NAME_FIRST.search(body, max(0, name_start - 32), name_start) and _ENV_FROM.match(body, name_end):
        return False  # kube's own shape: {"name": ..., "valueFrom": {"secretKeyRef": {...}}} and nothing else
    pos = name_end
    depth = 0
    while True:  # forwards, to the object's closing brace
        m = _SPECIAL.search(body, pos)
        if m is None:
            raise NeedsWalk
        pos = m.start()
        c = body[pos]
        if c == QUOTE:
            end = _quote_after(body, pos + 1)
            if depth == 0 and body[pos + 1:end] == b"value" and _string_value_follows(body, end + 1):
                return True
            pos = end
        elif c in b"{[":
            depth += 1
        elif depth:
            depth -= 1
        else:
            break
        pos += 1
    # backwards, to the object's opening brace: the key "name" itself comes first
    low = max(0, name_start - _BACK_WINDOW)
    window = body[low:name_start][::-1]
    pos = 0
    depth = 0
    while True:
        m = _SPECIAL.search(window, pos)
        if m is None:
            raise NeedsWalk
        at = low + len(window) - 1 - m.start()  # the character's offset in the body
        c = body[at]
        if c == QUOTE:
            start = _quote_before(body, at)
            if depth == 0 and body[start + 1:at] == b"value" and _string_value_follows(body, at + 1):
                return True
            at = start
        elif c in b"}]":
            depth += 1
        elif depth:
            depth -= 1
        else:
            return False
        pos = low + len(window) - at
        if at <= low:
            raise NeedsWalk


def _string_value_follows(body: bytes, pos: int) -> bool:
    """After a key's closing quote: `: "..."` with at least one character."""
    pos = _skip_ws(body, pos)
    if pos >= len(body) or body[pos] != COLON:
        return False
    pos = _skip_ws(body, pos + 1)
    return pos + 1 < len(body) and body[pos] == QUOTE and body[pos + 1] != QUOTE


def _key_before(body: bytes, pos: int) -> tuple[int, int]:
    """The quotes of the key whose colon precedes `pos`, or (-1, -1) when no colon does."""
    p = pos - 1
    while p >= 0 and body[p] in _WS:
        p -= 1
    if p < 0 or body[p] != COLON:
        return -1, -1
    p -= 1
    while p >= 0 and body[p] in _WS:
        p -= 1
    if p < 0 or body[p] != QUOTE:
        raise NeedsWalk
    return _quote_before(body, p), p


def _object_start(body: bytes, pos: int) -> int:
    """The opening brace of the object whose member starts at `pos`; -1 at an array or the top."""
    depth = 0
    p = pos - 1
    while p >= 0:
        c = body[p]
        if c == QUOTE:
            p = _quote_before(body, p)
        elif c in b"}]":
            depth += 1
        elif c in b"{[":
            if depth == 0:
                return p if c == 0x7B else -1
            depth -= 1
        p -= 1
    return -1
