"""The `masking:` section: which detectors find secret values in responses, and what names say secret.

Secrets' `data`/`stringData` are always masked (unless a grant with `reveal: true` allows the
call); this section tunes the detectors that find secret-looking values everywhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jitgate.masking.detectors import (
    BUILTIN,
    BUILTIN_NAMES,
    SECRET_WORDS,
    Detector,
    DetectorSet,
    derived_hints,
)
from jitgate.policy.schema import (
    Field,
    ListOf,
    Number,
    Section,
    Str,
    Strings,
    Values,
    dataclass_default,
)

if TYPE_CHECKING:
    from jitgate.policy.document import Node

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class MaskingPolicy:
    disabled: tuple[str, ...] = ()
    custom: tuple[Detector, ...] = ()
    secret_names: tuple[str, ...] = ()  # more words that make a name secret
    not_secret_names: tuple[str, ...] = ()  # whole names that are not secret despite their words
    partial_line_timeout: float = 0.25  # seconds an exec session's partial output line may be held
    _detectors: DetectorSet | None = field(default=None, repr=False, compare=False)

    def detectors(self) -> DetectorSet:
        if self._detectors is None:
            built = DetectorSet([d for d in BUILTIN if d.name not in self.disabled] + list(self.custom),
                                SECRET_WORDS + self.secret_names, self.not_secret_names)
            object.__setattr__(self, "_detectors", built)
        return self._detectors


def _detector_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid detector name {name!r}: use lower-case letters, digits and '-'")
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in detector; give yours another name")
    return name


def _pattern(text: str) -> str:
    try:
        compiled = re.compile(text)
    except re.error as e:
        raise ValueError(f"invalid regular expression: {e}") from None
    if compiled.match(""):
        raise ValueError("the pattern matches the empty string, so it would mask everywhere")
    return text


def _word(word: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", word):
        raise ValueError(f"invalid word {word!r}: letters and digits only (names are split at '_', '-', '.', '/' and case changes)")
    return word.lower()


DETECTOR = Section("masking_detector", "A named pattern of values to mask wherever they appear in a response.", (
    Field("name", Str(), "Unique name (lower-case letters, digits, `-`); the marker says `[masked:<name>]`.",
          required=True, check=_detector_name),
    Field("pattern", Str(), "Python regular expression; its `value` group, when it has one, is the part masked "
          "(e.g. `api_key=(?P<value>\\w+)`), else the whole match.", required=True, check=_pattern),
    Field("description", Str(empty=True), "What it finds.", default=""),
))

MASKING = Section("masking", "What masking finds besides Secrets' values (always masked unless a grant reveals them).", (
    Field("disable", Strings(choices=BUILTIN_NAMES, noun="detector"),
          f"Built-in detectors to turn off: {', '.join(f'`{n}`' for n in BUILTIN_NAMES)}.", default=()),
    Field("detectors", ListOf(DETECTOR), "Your own detectors, added to the built-in ones."),
    Field("secret_names", Strings(each=_word), "More words that make an env var, ConfigMap key or annotation name "
          f"secret (built in: {', '.join(SECRET_WORDS)}).", default=()),
    Field("not_secret_names", Strings(), "Whole names never treated as secret (e.g. `KEY_ID_FORMAT`).", default=()),
    Field("partial_line_timeout", Number(), "Seconds an exec session's output line without its end may be held "
          "back (a value split across frames is masked once the line is whole).",
          default=dataclass_default(MaskingPolicy, "partial_line_timeout")),
))


def parse_masking(node: Node | None) -> MaskingPolicy:
    """The policy's `masking:` section; without one, the built-in detectors."""
    if node is None:
        return MaskingPolicy()
    v: Values = MASKING.read_node(node)
    custom: list[Detector] = []
    for item in v["detectors"]:
        if any(d.name == item["name"] for d in custom):
            raise item.error("name", f"detector {item['name']!r} is already defined")
        hints, exact_hints = derived_hints(item["pattern"])
        custom.append(Detector(item["name"], item["pattern"], item["description"], hints, exact_hints))
    timeout = v["partial_line_timeout"]
    if not 0 < timeout <= 5:
        raise v.error("partial_line_timeout", "must be more than 0 and at most 5 seconds (interactive output waits for it)")
    policy = MaskingPolicy(tuple(v["disable"]), tuple(custom), tuple(v["secret_names"]),
                           tuple(v["not_secret_names"]), float(timeout))
    try:
        policy.detectors()
    except re.error as e:
        raise v.error("detectors", f"the detectors cannot be compiled: {e}") from None
    return policy
