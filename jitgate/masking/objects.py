"""Masking Kubernetes objects in every shape a response carries them.

A Secret's `data` values become a base64 marker (still valid base64, so `kubectl get -o yaml`,
`describe` and decoding clients work) and its `stringData` values a marker string; keys, names and
every other field stay. Lists, server-side Tables (rows with `includeObject`), watch events
(including BOOKMARK and ERROR) are walked to the objects inside. Wherever Secret content is echoed
it is masked too: the last-applied-configuration annotation of any object (a JSON string: parsed,
masked, re-serialised), and Secret objects nested anywhere. Values whose name says secret (env
vars, ConfigMap keys, annotations) become markers, and every other string goes through the
detectors.

Plain Python (no mitmproxy). `Masker.mask_json` is the entry point for one JSON body.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from json.encoder import c_make_encoder, encode_basestring

from jitgate.masking.detectors import DEFAULT_DETECTORS, DetectorSet
from jitgate.masking.hits import HitScanner

STRING_MARKER = "jitgate:masked"
DATA_MARKER = base64.b64encode(STRING_MARKER.encode()).decode()  # "aml0Z2F0ZTptYXNrZWQ="
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
SMALL_BODY = 2048
# Strings remembered as clean across bodies (`Masker.clean`): how many, how long each.
CLEAN_TEXTS = 4096
CLEAN_TEXT_MAX = 256
_JSON_WHITESPACE = " \t\n\r"


def _encoder():
    """json.dumps(separators=(",", ":"), ensure_ascii=False), with json's C encoder made once:
    `JSONEncoder.encode` makes one per call, half of what encoding a watch event costs. Without the
    circular-reference check: what is encoded was decoded from JSON, so it holds no cycle."""
    plain = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    if c_make_encoder is None:  # a Python without json's C accelerator
        return plain.encode
    chunks = c_make_encoder(None, plain.default, encode_basestring, None, ":", ",", False, False, True)
    return lambda value: "".join(chunks(value, 0))


def _decoder():
    """json.loads of a str, without `JSONDecoder.decode`'s two regular-expression matches per call."""
    scan = json.JSONDecoder().scan_once

    def decode(text: str):
        start = len(text) - len(text.lstrip(_JSON_WHITESPACE)) if text[:1] in _JSON_WHITESPACE else 0
        try:
            value, end = scan(text, start)
        except StopIteration as e:
            raise json.JSONDecodeError("Expecting value", text, e.value) from None
        if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
            raise json.JSONDecodeError("Extra data", text, end)
        return value

    return decode


_encode = _encoder()
_decode = _decoder()



class MaskingError(Exception):
    """A body masking applies to but that cannot be read: it must not pass."""


@dataclass
class Result:
    body: bytes
    masked: int

    @property
    def changed(self) -> bool:
        return self.masked > 0


class Masker:
    """Masks JSON bodies and decoded objects with one detector set."""

    def __init__(self, detectors: DetectorSet = DEFAULT_DETECTORS) -> None:
        self.detectors = detectors
        self.count = 0
        self.scan = True  # False: no detector can match any string of the body being masked
        # Detector results of this pass by string: lists repeat the same values in every item, and
        # the detectors read a string alone (no context), so one answer serves every occurrence.
        self.memo: dict[str, tuple[str, int]] = {}
        # Strings the detectors leave as they are, across bodies (a watch repeats its kinds, names and
        # labels event after event): only what passes unmasked, what the client gets anyway; bounded.
        self.clean: set[str] = set()
        self.min_length = detectors.min_length  # shorter strings no detector can match (names, versions)
        self.hits = HitScanner(detectors)

    # -- bodies -------------------------------------------------------------------------------

    def needs_look(self, body: bytes) -> bool:
        """False when no value in `body` can be secret: passed through without parsing.

        Every shape that needs a look names a secret word somewhere: a Secret ("secret"), a
        ConfigMap key, env var or annotation whose name says secret, a detector's literal."""
        return self.detectors.could_match_body(body)

    def mask_json(self, body: bytes, secrets: bool = False) -> Result:
        """One JSON body (object, list, Table, watch event); `secrets`: the call was on the secrets
        resource, so the objects are Secrets even without a `kind`. Raises MaskingError."""
        if not body or body.isspace():
            return Result(body, 0)
        if not secrets:
            # Most bodies with a secret word need no structure (a pod's `"path":"token"`): masked in
            # place from where the words are, without a parse (jitgate/masking/hits.py). The same
            # pass finds no word at all in a body with nothing to mask.
            scanned = self.hits.scan(body)
            if scanned is not None:
                return Result(*scanned)
            if not self.needs_look(body):
                return Result(body, 0)
        try:
            obj = _decode(body.decode("utf-8"))  # kube-apiserver writes UTF-8 JSON; anything else fails closed
        except (ValueError, UnicodeDecodeError) as e:
            raise MaskingError(f"the response is not valid JSON ({type(e).__name__})") from None
        self.count = 0
        # A big body is scanned once for the detectors' literals; a small one (a watch event) is
        # cheaper checked string by string (DetectorSet.mask_text does that anyway).
        self.scan = len(body) < SMALL_BODY or self.detectors.could_detect(body)
        try:
            obj = self.mask_value(obj, secrets)
        finally:
            self.scan = True
            self.memo = {}
        if not self.count:
            return Result(body, 0)
        return Result(_encode(obj).encode(), self.count)

    # -- objects ------------------------------------------------------------------------------

    def mask_value(self, value, secrets: bool = False):
        """`value` masked in place where it is a container; returns the (possibly new) value."""
        if isinstance(value, dict):
            self._top(value, secrets)
            return value
        if isinstance(value, list):
            return [self.mask_value(v, secrets) for v in value]
        if isinstance(value, str):
            return self._text(value)
        return value

    def _top(self, obj: dict, secrets: bool) -> None:
        kind = obj.get("kind")
        if kind is None and len(obj) == 2 and "type" in obj and isinstance(obj.get("object"), dict):
            self._top(obj["object"], secrets)  # a watch event (the most frequent shape): ADDED, ..., BOOKMARK, ERROR
        elif kind == "Secret":
            self._secret(obj)
        elif kind == "SecretList" or (secrets and isinstance(obj.get("items"), list)):
            for item in obj["items"]:
                if isinstance(item, dict):
                    self._secret(item)
            self._walk(obj, skip=("items",))
        elif kind == "Table":
            for row in obj.get("rows") or ():
                if isinstance(row, dict):
                    if isinstance(row.get("object"), dict):
                        self._top(row["object"], secrets)
                    if isinstance(row.get("cells"), list):
                        row["cells"] = [self._walk_value(c) for c in row["cells"]]
            self._walk(obj, skip=("rows",))
        elif "type" in obj and "object" in obj and len(obj) == 2 and isinstance(obj["object"], dict):
            self._top(obj["object"], secrets)  # a watch event: ADDED, MODIFIED, DELETED, BOOKMARK, ERROR
        elif kind == "Secret" or (secrets and kind is None and ("data" in obj or "stringData" in obj)):
            self._secret(obj)
        else:
            self._walk(obj)

    def _secret(self, obj: dict) -> None:
        for field, marker in (("data", DATA_MARKER), ("stringData", STRING_MARKER)):
            values = obj.get(field)
            if isinstance(values, dict):
                for key in values:
                    self.count += 1
                    values[key] = marker
            elif values is not None:
                obj[field] = {}
                self.count += 1
        self._walk(obj, skip=("data", "stringData"))

    def _walk(self, obj: dict, skip: tuple[str, ...] = ()) -> None:
        kind = obj.get("kind")
        if kind == "Secret" and "data" not in skip:
            self._secret(obj)
            return
        configmap = kind == "ConfigMap"
        for key, value in obj.items():
            if key in skip:
                continue
            if isinstance(value, str):
                new = self._text(value)
                if new is not value:
                    obj[key] = new
            elif isinstance(value, dict):
                if key == "annotations":
                    self._annotations(value)
                elif configmap and key in ("data", "binaryData"):
                    self._named_values(value, STRING_MARKER if key == "data" else DATA_MARKER)
                else:
                    self._walk(value)
            elif isinstance(value, list):
                if key == "env":
                    self._env(value)
                elif key == "items" and kind == "ConfigMapList":
                    for item in value:
                        if isinstance(item, dict):
                            item.setdefault("kind", "ConfigMap")
                            self._walk(item)
                            del item["kind"]
                    continue
                obj[key] = [self._walk_value(v) for v in value]

    def _walk_value(self, value):
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, dict):
            self._walk(value)
        elif isinstance(value, list):
            return [self._walk_value(v) for v in value]
        return value

    def _text(self, text: str) -> str:
        if not self.scan or len(text) < self.min_length or text in self.clean:
            return text
        hit = self.memo.get(text)
        if hit is None:
            if not self.detectors.may_detect(text):  # most strings: no detector's literal in them
                if len(text) <= CLEAN_TEXT_MAX:
                    if len(self.clean) >= CLEAN_TEXTS:
                        self.clean.clear()
                    self.clean.add(text)
                return text
            hit = self.detectors.mask_text(text)
            if not hit[1] and len(text) <= CLEAN_TEXT_MAX:
                if len(self.clean) >= CLEAN_TEXTS:
                    self.clean.clear()
                self.clean.add(text)
            elif len(self.memo) < 4096:
                self.memo[text] = hit
        masked, n = hit
        if n:
            self.count += n
            return masked
        return text

    def _named_values(self, values: dict, marker: str) -> None:
        is_secret = self.detectors.is_secret_name
        for key, value in values.items():
            if not isinstance(value, str):
                values[key] = self._walk_value(value)
                continue
            if is_secret(key):
                if value and value != marker:
                    values[key] = marker
                    self.count += 1
            else:
                values[key] = self._text(value)

    def _env(self, env: list) -> None:
        """Values of env vars whose name says secret become markers; the walk of the list that
        follows puts every other string through the detectors (once: a marker is never re-masked)."""
        is_secret = self.detectors.is_secret_name
        for var in env:
            if isinstance(var, dict) and isinstance(var.get("name"), str):
                value = var.get("value")
                if isinstance(value, str) and value and is_secret(var["name"]) and value != STRING_MARKER:
                    var["value"] = STRING_MARKER
                    self.count += 1

    def _annotations(self, annotations: dict) -> None:
        for key, value in annotations.items():
            if not isinstance(value, str):  # not Kubernetes' own annotations (a custom resource's): walked
                annotations[key] = self._walk_value(value)
                continue
            if key == LAST_APPLIED:
                annotations[key] = self._last_applied(value)
            elif self.detectors.is_secret_name(key):
                if value and value != STRING_MARKER:
                    annotations[key] = STRING_MARKER
                    self.count += 1
            else:
                annotations[key] = self._text(value)

    def _last_applied(self, value: str) -> str:
        """The annotation is the applied object as JSON: masked as an object, written back as JSON."""
        try:
            applied = _decode(value)
        except ValueError:
            self.count += 1
            return STRING_MARKER  # unreadable: nothing of it may pass
        before = self.count
        applied = self.mask_value(applied)
        if self.count == before:
            return value
        newline = "\n" if value.endswith("\n") else ""
        return _encode(applied) + newline
