"""Detectors: named patterns for values that look secret wherever they appear in a response.

Each detector is one regular expression; the part of a match that is secret is its `value` group
(or the whole match), so a `password=` pair keeps its name and loses only its value. A detector set
also knows which *names* say secret (env vars, ConfigMap keys, annotations): a name is split into
words (`DB_PASSWORD`, `apiKey`, `example.com/ssh-key`) and one word from the list is enough.

Plain Python (no mitmproxy); the policy's `masking:` section builds a `DetectorSet` from these.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

TEXT_MARKER = "[masked:{name}]"


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: str  # a regular expression; a `value` group, when present, is the secret part
    description: str = ""
    hints: tuple[str, ...] = ()  # lower-case literals one of which is in any match, in any case
    exact_hints: tuple[str, ...] = ()  # literals one of which is in any match exactly as written
    requires: tuple[str, ...] = ()  # besides: literals one of which is in any match exactly (":", "=")

    def compile(self) -> re.Pattern:
        return re.compile(self.pattern)

    @property
    def marker(self) -> str:
        return TEXT_MARKER.format(name=self.name)


# Words that make a name secret: env var names, ConfigMap keys, annotation keys, `name=` pairs.
SECRET_WORDS: tuple[str, ...] = (
    "password", "passwd", "passphrase", "pwd", "pass", "secret", "secrets", "token", "tokens", "key", "keys",
    "apikey", "credential", "credentials", "creds", "privatekey",
)
# Words that end a secret word glued to another one (`DBPASSWORD`, `accesstoken`, `clientsecret`).
SECRET_SUFFIXES: tuple[str, ...] = ("password", "passwd", "secret", "token", "apikey", "credentials", "privatekey")

# A whole name (a run of name characters) holding a secret word: the look-ahead finds the word, the
# possessive run takes the name without backtracking (a lazy prefix made long names quadratic). The
# run also takes letters that case-fold to ASCII ones (ſ, K), as the word itself may hold them.
_PAIR_NAME = r"(?<![A-Za-z0-9_.-])(?=[A-Za-z0-9_.-]*?(?i:passw(?:or)?d|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?))(?:[A-Za-z0-9_.-]|(?i:[a-z]))++"

BUILTIN: tuple[Detector, ...] = (
    Detector("aws-access-key-id", r"(?<![A-Z0-9])(?P<value>(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})(?![A-Z0-9])",
             "AWS access key ids (AKIA..., ASIA... temporary ones).", exact_hints=("AKIA", "ASIA", "ABIA", "ACCA")),
    Detector("aws-secret-access-key",
             r"(?i:aws)[A-Za-z0-9_. -]{0,20}(?i:secret)[A-Za-z0-9_. -]{0,20}[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
             "AWS secret access keys next to their name (aws_secret_access_key = ...).", hints=("secret",),
             requires=(":", "=")),
    Detector("private-key",
             r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----(?P<value>[\s\S]*?)-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----",
             "PEM private key blocks (RSA, EC, OpenSSH, PGP, PKCS#8): the body between the lines.", hints=("private key",)),
    Detector("jwt", r"(?<![A-Za-z0-9_-])(?P<value>eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*)",
             "JSON Web Tokens (service account tokens, OIDC ID tokens).", exact_hints=("eyJ",)),
    Detector("bearer-token", r"(?i:bearer)\s+(?P<value>[A-Za-z0-9._~+/-]{12,}=*)",
             "Bearer tokens in Authorization-like text.", hints=("bearer",)),
    Detector("connection-string-password",
             # From the start of a run of scheme characters (no retry inside one: no backtracking),
             # leading digits skipped: `54321postgres://` is a scheme after digits, as a URL parser reads it.
             r"(?<![A-Za-z0-9+.-])[0-9+.-]*+[A-Za-z][A-Za-z0-9+.-]*+://[^\s:/@\"']++:(?P<value>[^\s@/\"']++)@",
             "Passwords in URLs and connection strings (postgres://user:password@host).", exact_hints=("://",),
             requires=("@",)),
    Detector("secret-pair",
             _PAIR_NAME + r"[\"']?[ \t]*[:=][ \t]*[\"']?(?P<value>(?!\[masked:)[^\s\"',;&]{3,})",
             "`password=...`, `token: ...`, `DB_PASSWORD=...` pairs whose name says secret.", hints=("passw", "passphrase", "pwd", "secret", "token", "key", "credential"),
             requires=(":", "=")),
)
_COMMON = (b"secret", b"key", b"token", b"pass")
# Shorter literals that stand for several longer ones: one scan instead of two ("creds", "credential").
_MERGED = (b"cred", b"pass")
# UTF-8 of the letters a case-insensitive pattern matches as ASCII ones (ſ s, K k, ı İ i): a body
# with one is looked at, since lower-casing its bytes does not spell the literal.
_FOLDS_TO_ASCII = tuple(c.encode() for c in "\u017f\u212a\u0131\u0130")
SMALL = 2048  # bytes: below, a body is checked by combined patterns, above by literal scans
BUILTIN_NAMES: tuple[str, ...] = tuple(d.name for d in BUILTIN)


def name_words(name: str) -> list[str]:
    """`DB_PASSWORD` -> [db, password]; `apiKey` -> [api, key]; `example.com/ssh-key` -> [example, com, ssh, key]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


class DetectorSet:
    """The detectors in force and the secret-name words, compiled once."""

    def __init__(self, detectors: Iterable[Detector] = BUILTIN, secret_words: Iterable[str] = SECRET_WORDS,
                 not_secret_names: Iterable[str] = ()) -> None:
        self.detectors = tuple(detectors)
        self.compiled = tuple((d, d.compile()) for d in self.detectors)
        self.words = frozenset(w.lower() for w in secret_words)
        self.not_secret = frozenset(n.lower() for n in not_secret_names)
        self.unhinted = tuple(c for d, c in self.compiled if not (d.hints or d.exact_hints))
        # Whether a body can hold anything to mask, told by a few literal scans (each a C loop over the
        # bytes) instead of a parse: a detector's literal, or a secret word (a name that says secret).
        self.names_prefilter = _Prefilter({h for d in self.detectors for h in d.hints} | self.words | set(SECRET_SUFFIXES),
                                          {h for d in self.detectors for h in d.exact_hints}, self.unhinted)
        # Detectors alone (no names): whether any string of a body needs the detectors at all.
        self.text_prefilter = _Prefilter({h for d in self.detectors for h in d.hints},
                                         {h for d in self.detectors for h in d.exact_hints}, self.unhinted)
        self.roots = self.names_prefilter.lowered
        # The same per string (field values, log lines): literal checks cost a fraction of the combined
        # pattern's search, and a string shorter than every possible match is not searched at all.
        self.text_lowered = tuple(r.decode() for r in self.text_prefilter.lowered)
        self.text_exact = tuple(sorted({h for d in self.detectors for h in d.exact_hints}))
        self.text_lowered_rx = re.compile("|".join(map(re.escape, self.text_lowered))) if self.text_lowered else None
        self.text_exact_rx = re.compile("|".join(map(re.escape, self.text_exact))) if self.text_exact else None
        self.digits_undetectable = not any(h.isdigit() for h in self.text_lowered + self.text_exact)
        self.min_length = min((_min_width(d.pattern) for d in self.detectors), default=0)
        self.is_secret_name = functools.lru_cache(maxsize=4096)(self._is_secret_name)
        # Per detector, the literals one of which its every match holds: a string is searched only by
        # the detectors whose literal it has (one combined pattern tries every branch at every
        # character: 24 us for a 77-character container id, against 2 us for the one detector).
        self.always = tuple(i for i, d in enumerate(self.detectors) if not (d.hints or d.exact_hints))
        lowered: dict[str, set[int]] = {}
        exact: dict[str, set[int]] = {}
        for i, d in enumerate(self.detectors):
            for h in d.hints:
                lowered.setdefault(h.lower(), set()).add(i)
            for h in d.exact_hints:
                exact.setdefault(h, set()).add(i)
        self.hint_lowered = tuple((h, frozenset(i)) for h, i in lowered.items())
        self.hint_exact = tuple((h, frozenset(i)) for h, i in exact.items())

    def _is_secret_name(self, name: str) -> bool:
        if name.lower() in self.not_secret:
            return False
        for word in name_words(name):
            if word in self.words or word.endswith(SECRET_SUFFIXES):
                return True
        return False

    def mask_text(self, text: str) -> tuple[str, int]:
        """`text` with every detected value replaced by its detector's marker, and how many were."""
        if len(text) < self.min_length or not self._may_detect(text):
            return text, 0
        count = 0
        for detector, regex in self._candidates(text):
            if regex.search(text) is None:
                continue
            marker = detector.marker

            def replace(m: re.Match, marker=marker) -> str:
                nonlocal count
                if "value" not in regex.groupindex or m.start("value") < 0:
                    count += 1
                    return marker
                if m.group("value") == "":
                    return m.group(0)
                count += 1
                start, end = m.start("value") - m.start(), m.end("value") - m.start()
                whole = m.group(0)
                return whole[:start] + marker + whole[end:]

            text = regex.sub(replace, text)
        return text, count

    def _candidates(self, text: str) -> list[tuple[Detector, re.Pattern]]:
        """The detectors that could match `text`, in their order: those whose literal it holds."""
        if not text.isascii():  # re's IGNORECASE folds ſ to s, K (Kelvin) to k...: no literal tells
            return list(self.compiled)
        lowered = text.lower()
        found = set(self.always)
        for hint, which in self.hint_lowered:
            if hint in lowered:
                found |= which
        for hint, which in self.hint_exact:
            if hint in text:
                found |= which
        return [self.compiled[i] for i in sorted(found)
                if not self.detectors[i].requires or any(r in text for r in self.detectors[i].requires)]

    def _may_detect(self, text: str) -> bool:
        """False when no detector can match `text`: none of their literals is in it."""
        if self.unhinted or not text.isascii():  # re's IGNORECASE folds ſ to s, K (Kelvin) to k...
            return True
        if self.digits_undetectable and text.isdigit():
            return False  # resourceVersions, generations, ports: no literal is made of digits alone
        # One search of the literals' alternation costs less than a check per literal.
        if self.text_lowered_rx is not None and self.text_lowered_rx.search(text.lower()) is not None:
            return True
        return self.text_exact_rx is not None and self.text_exact_rx.search(text) is not None

    may_detect = _may_detect

    def could_match_body(self, body: bytes) -> bool:
        """Whether a detector or a secret name could match somewhere in a whole body: False lets it pass unparsed."""
        return self.names_prefilter(body)

    def could_detect(self, body: bytes) -> bool:
        """Whether a detector could match any string of a body: False spares the per-string searches."""
        return self.text_prefilter(body)


def _min_width(pattern: str) -> int:
    """The fewest characters a pattern matches (0 when it cannot be told)."""
    try:
        from re import _parser  # the stdlib's own pattern parser (sre_parse)

        return int(_parser.parse(pattern).getwidth()[0])
    except Exception:  # noqa: BLE001 - an unknown width only costs a search
        return 0


# Shortest literal worth a hint: a shorter one is in nearly every body and spares nothing.
MIN_HINT = 3


def derived_hints(pattern: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Literals one of which is in every match of a policy's own pattern, as (hints, exact_hints):
    `exk_[A-Za-z0-9]{32}` gives exact ("exk_",); `(?i)acme-(key|token)` gives hints ("acme-",).
    With hints a custom detector joins the literal scans (a body without its literal is not parsed,
    a string without it not searched) instead of sending every body through the object walk.

    A literal counts only where the pattern must match it once in every match: a run of literal
    characters in the top-level sequence, in a group or a repeat of at least one, or one per branch
    of an alternation. Anything unusual (scoped flags, non-ASCII literals, a parser that changed)
    counts as holding no literal, and a pattern without one gives no hints: the detector then runs on every string, as an unhinted one always did."""
    try:
        from re import _constants as c
        from re import _parser  # the stdlib's own pattern parser (sre_parse)

        parsed = _parser.parse(pattern)
        flags = parsed.state.flags  # of them only IGNORECASE changes what a literal matches

        def required(items) -> list[str] | None:
            """Alternatives one of which every match of `items` (a sequence) holds; None: none known."""
            best: list[str] | None = None
            run: list[str] = []

            def consider(found: list[str] | None) -> None:
                nonlocal best
                if found and all(len(x) >= MIN_HINT for x in found):
                    if best is None or min(map(len, found)) > min(map(len, best)):
                        best = found

            for op, arg in items:
                # Printable ASCII only: a body holds a control character, a quote or a backslash
                # escaped (`\\n`), so a byte scan would never find such a literal as written.
                if op is c.LITERAL and 0x20 <= arg < 0x7F and arg not in (0x22, 0x5C):
                    run.append(chr(arg))
                    continue
                consider(["".join(run)] if run else None)
                run = []
                if op is c.SUBPATTERN:
                    _group, add_flags, del_flags, sub = arg
                    if add_flags or del_flags:
                        raise ValueError("scoped flags")
                    consider(required(sub))
                elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT) and arg[0] >= 1:
                    consider(required(arg[2]))
                elif op is c.BRANCH:
                    alternatives: list[str] = []
                    for branch in arg[1]:
                        found = required(branch)
                        if found is None:
                            alternatives = []
                            break
                        alternatives += found
                    consider(alternatives or None)
                # Anything else (a class, a lookaround, a back reference) holds no required literal.
            consider(["".join(run)] if run else None)
            return best

        found = required(parsed)
    except Exception:  # noqa: BLE001 - no hints only costs searches
        return (), ()
    if not found:
        return (), ()
    unique = tuple(sorted(set(found)))
    if flags & c.SRE_FLAG_IGNORECASE:
        return tuple(sorted({x.lower() for x in unique})), ()
    return (), unique


class _Prefilter:
    """Literal scans that find every body a set of literals (and unhinted patterns) could match.

    `lowered`: searched in the lower-cased body; `exact`: in the body as it is (case-sensitive ones,
    so no lowering is needed for them). A JSON `\\u` or `\\/` escape could spell a literal in other
    bytes, so a body with one is always looked at (kube-apiserver escapes only `<>&`: rare)."""

    def __init__(self, lowered: set[str], exact: set[str], unhinted: tuple[re.Pattern, ...]) -> None:
        literals = {x.lower().encode() for x in lowered}
        literals |= {m for m in _MERGED if sum(m in x for x in literals) >= 2}
        # A literal that contains another one adds nothing ("password" when "pass" is there).
        roots = [x for x in literals if not any(o != x and o in x for o in literals)]
        # The likeliest first: a body with a Secret in it is told after one scan, not after all.
        self.lowered = tuple(sorted(roots, key=lambda r: (_COMMON.index(r) if r in _COMMON else len(_COMMON), r)))
        exact_b = {x.encode() for x in exact}
        exact_b = {x for x in exact_b if not any(x.lower().find(r) >= 0 for r in self.lowered)}
        # Exact literals sharing a first byte: one regex whose literal first byte the regex engine
        # scans for (AKIA|ASIA|ABIA|ACCA: one pass, not four).
        groups: dict[int, list[bytes]] = {}
        for x in sorted(exact_b):
            groups.setdefault(x[0], []).append(x)
        self.exact = tuple(g[0] for g in groups.values() if len(g) == 1)
        self.exact_res = tuple(re.compile(re.escape(g[0][:1]) + b"(?:" + b"|".join(re.escape(x[1:]) for x in g) + b")")
                               for g in groups.values() if len(g) > 1)
        self.unhinted = unhinted
        # A small body is told faster by two combined patterns (a scan's fixed cost dominates there);
        # a big one by the literal scans (the combined pattern tries every branch at every byte).
        self.small_lowered = re.compile(b"|".join(re.escape(x) for x in self.lowered)) if self.lowered else None
        self.small_exact = re.compile(b"|".join([re.escape(x) for x in self.exact] + [r.pattern for r in self.exact_res]
                                                + [re.escape(b"\\u"), re.escape(b"\\/")]))

    def __call__(self, body: bytes) -> bool:
        if not body.isascii() and any(c in body for c in _FOLDS_TO_ASCII):
            return True
        if len(body) < SMALL:
            if (self.small_lowered is not None and self.small_lowered.search(body.lower())) or self.small_exact.search(body):
                return True
            return self._unhinted(body)
        if self.lowered:
            lowered = body.lower()
            for root in self.lowered:
                if root in lowered:
                    return True
        for literal in self.exact:
            if literal in body:
                return True
        for regex in self.exact_res:
            if regex.search(body):
                return True
        if b"\\u" in body or b"\\/" in body:
            return True
        return self._unhinted(body)

    def _unhinted(self, body: bytes) -> bool:
        if not self.unhinted:
            return False
        text = body.decode("utf-8", "replace")
        return any(c.search(text) for c in self.unhinted)


DEFAULT_DETECTORS = DetectorSet()
