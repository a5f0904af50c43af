"""The policy's shape, declared once: each section's fields with their type, default and meaning.

Every section module declares its `Section` (fields, kinds, help text, required fields, defaults,
allowed values and single-field checks). From those declarations come:

- reading: `Section.read` checks types, required fields, allowed values and unknown keys, fills in
  defaults and reports every mistake as `file:line: field: message` through `Node`;
- the JSON Schema (draft 2020-12) of a policy file for editors (`jitgate policy schema`, committed
  as `docs/policy.schema.json`);
- README's reference tables (`jitgate policy schema --markdown`).

The section parsers keep only what a declaration cannot say: checks across fields or sections, and
building the domain objects. The kinds are few on purpose: a new section composes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from jitgate.policy.document import Node, PolicyError
from jitgate.timefmt import format_duration, parse_duration

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# ---------------------------------------------------------------------------------------------
# What was read


class Values(Mapping[str, Any]):
    """One mapping of the policy as read (defaults filled in), with its node to locate later errors."""

    __slots__ = ("_values", "node")

    def __init__(self, node: Node, values: dict[str, Any]):
        self.node = node
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def error(self, key: str | None, message: str) -> PolicyError:
        return self.node.error(key, message)

    def __repr__(self) -> str:
        return f"Values({self.node.path or '<root>'}: {self._values!r})"


# ---------------------------------------------------------------------------------------------
# Kinds of values


class Kind:
    """How one value is read, shown in the reference and described in the JSON Schema."""

    shapes: tuple[type, ...] = ()  # the YAML shapes (Python types) this kind accepts

    def read(self, node: Node, key: str, required: bool) -> Any:
        """The value of `key` (None when absent), checked and converted; raises PolicyError."""
        raise NotImplementedError

    def label(self, ref: Callable[[Section], str]) -> str:
        """The reference table's type column; `ref` names the table of a nested section."""
        raise NotImplementedError

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        """This value's JSON Schema; `required`: the field must be given (a required list is not empty)."""
        raise NotImplementedError

    def to_json(self, value: Any) -> Any:
        """A default as the policy file would write it."""
        return value

    def sections(self) -> Iterator[tuple[str, Section]]:
        """Nested sections, as (relative path, section), for the reference tables."""
        return iter(())


def _known(choices: tuple[str, ...]) -> str:
    named = ", ".join(c for c in choices if c != "*")
    return f"{named}, or * for all" if "*" in choices else named


def _choices_label(choices: tuple[str, ...]) -> str:
    return ", ".join(f"`{c}`" for c in choices)


@dataclass(frozen=True)
class Str(Kind):
    """A string: non-empty unless `empty`, one of `choices` when given (`noun` names it in errors)."""

    empty: bool = False
    choices: tuple[str, ...] = ()
    noun: str = "value"
    shapes = (str,)

    def read(self, node: Node, key: str, required: bool) -> str | None:
        value = node.get(key, str, required) if self.empty else node.string(key, required)
        if value is not None and self.choices and value not in self.choices:
            raise node.error(key, f"unknown {self.noun} {value!r} (known: {_known(self.choices)})")
        return value

    def label(self, ref: Callable[[Section], str]) -> str:
        return f"one of {_choices_label(self.choices)}" if self.choices else "string"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        if self.choices:
            return {"enum": list(self.choices)}
        return {"type": "string"} if self.empty else {"type": "string", "minLength": 1}


@dataclass(frozen=True)
class Int(Kind):
    minimum: int | None = None
    shapes = (int,)

    def read(self, node: Node, key: str, required: bool) -> int | None:
        value = node.get(key, int, required)
        if value is not None and self.minimum is not None and value < self.minimum:
            raise node.error(key, f"must be at least {self.minimum}")
        return value

    def label(self, ref: Callable[[Section], str]) -> str:
        return "integer" if self.minimum is None else f"integer ≥ {self.minimum}"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"type": "integer"} | ({} if self.minimum is None else {"minimum": self.minimum})


@dataclass(frozen=True)
class Number(Kind):
    shapes = (int, float)

    def read(self, node: Node, key: str, required: bool) -> float | None:
        return node.get(key, (int, float), required)

    def label(self, ref: Callable[[Section], str]) -> str:
        return "number"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"type": "number"}


@dataclass(frozen=True)
class Bool(Kind):
    shapes = (bool,)

    def read(self, node: Node, key: str, required: bool) -> bool | None:
        return node.get(key, bool, required)

    def label(self, ref: Callable[[Section], str]) -> str:
        return "boolean"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Strings(Kind):
    """A list of non-empty strings (one string counts as a list of one). An empty list is absent.

    `choices` limits the items (`noun` names them in errors); `each` converts an item, raising
    ValueError for a mistake reported at that item's line."""

    choices: tuple[str, ...] = ()
    noun: str = "value"
    each: Callable[[str], Any] | None = None
    shapes = (list, str)

    def read(self, node: Node, key: str, required: bool) -> tuple | None:
        items = node.strings(key, required)
        out = []
        for i, item in enumerate(items):
            if self.choices and item not in self.choices:
                raise node.item_error(key, i, f"unknown {self.noun} {item!r} (known: {_known(self.choices)})")
            if self.each is not None:
                try:
                    item = self.each(item)
                except ValueError as e:
                    raise node.item_error(key, i, str(e)) from None
            out.append(item)
        return tuple(out) or None

    def label(self, ref: Callable[[Section], str]) -> str:
        return f"list of {_choices_label(self.choices)}" if self.choices else "list of strings"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        item = {"enum": list(self.choices)} if self.choices else {"type": "string", "minLength": 1}
        items = {"type": "array", "items": item} | ({"minItems": 1} if required else {})
        return {"anyOf": [item, items]}

    def to_json(self, value: Any) -> Any:
        return list(value)


@dataclass(frozen=True)
class FilePath(Kind):
    """A file that must exist; relative to the policy file's folder, `~` expanded."""

    shapes = (str,)

    def read(self, node: Node, key: str, required: bool) -> Any:
        return node.path_value(key, required)

    def label(self, ref: Callable[[Section], str]) -> str:
        return "file path"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}


@dataclass(frozen=True)
class Duration(Kind):
    """`90s`, `15m`, `1h30m`, `2d`, read as seconds, longer than 0s."""

    shapes = (str,)

    def read(self, node: Node, key: str, required: bool) -> int | None:
        text = node.get(key, str, required)
        if text is None:
            return None
        try:
            seconds = parse_duration(text)
        except ValueError as e:
            raise node.error(key, str(e)) from None
        if seconds <= 0:
            raise node.error(key, "must be longer than 0s")
        return seconds

    def label(self, ref: Callable[[Section], str]) -> str:
        return "duration"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        # jitgate.timefmt.parse_duration's grammar: units in this order, each at most once.
        return {"type": "string", "pattern": r"^\s*(?=\d)(\d+d)?(\d+h)?(\d+m)?(\d+s)?\s*$"}

    def to_json(self, value: Any) -> Any:
        return format_duration(value)


@dataclass(frozen=True)
class Map(Kind):
    """A mapping of names the policy chooses (role names, claim names, headers) to values."""

    value: Kind
    shapes = (dict,)

    def read(self, node: Node, key: str, required: bool) -> Values | None:
        child = node.child(key, required)
        if child is None:
            return None
        values = {str(name): self.value.read(child, name, True) for name in list(child.data)}
        child.finish()
        return Values(child, values)

    def label(self, ref: Callable[[Section], str]) -> str:
        return f"mapping of names to {self.value.label(ref)}"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": self.value.json_schema(True)}

    def sections(self) -> Iterator[tuple[str, Section]]:
        for path, section in self.value.sections():
            yield ".*" + path, section


@dataclass(frozen=True)
class OneOf(Kind):
    """One of several kinds, told apart by their YAML shape (e.g. a string or a mapping)."""

    kinds: tuple[Kind, ...]

    @property
    def shapes(self) -> tuple[type, ...]:  # type: ignore[override]
        return tuple(t for kind in self.kinds for t in kind.shapes)

    def read(self, node: Node, key: str, required: bool) -> Any:
        value = node.get(key, self.shapes, required)
        if value is None:
            return None
        kind = next(k for k in self.kinds if isinstance(value, k.shapes))
        return kind.read(node, key, required)

    def label(self, ref: Callable[[Section], str]) -> str:
        return ", or ".join(kind.label(ref) for kind in self.kinds)

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"anyOf": [kind.json_schema(required) for kind in self.kinds]}

    def sections(self) -> Iterator[tuple[str, Section]]:
        for kind in self.kinds:
            yield from kind.sections()


@dataclass(frozen=True)
class Field:
    """One key of a section.

    `check` sees the value read and returns the value to keep (it may convert it); its ValueError
    is reported at this field. `shown_default` describes a default the reference cannot print."""

    key: str
    kind: Kind
    help: str
    required: bool = False
    default: Any = None
    check: Callable[[Any], Any] | None = None
    shown_default: str | None = None

    def read(self, node: Node, required: bool | None = None) -> Any:
        value = self.kind.read(node, self.key, self.required if required is None else required)
        if value is None:
            return self.default
        if self.check is not None:
            value = node.check(lambda: self.check(value), self.key)
        return value


@dataclass(frozen=True)
class Section(Kind):
    """A mapping with known keys (any other key is an error); `exactly_one` of some keys may be required."""

    name: str  # the JSON Schema definition's name
    help: str
    fields: tuple[Field, ...]
    exactly_one: tuple[str, ...] = ()
    shapes = (dict,)

    def __post_init__(self) -> None:
        keys = [f.key for f in self.fields]
        if len(set(keys)) != len(keys) or not set(self.exactly_one) <= set(keys):
            raise ValueError(f"section {self.name}: a key declared twice, or exactly_one names an undeclared key")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.fields)

    def read(self, node: Node, key: str, required: bool) -> Values | None:
        child = node.child(key, required)
        return None if child is None else self.read_node(child)

    def read_node(self, node: Node) -> Values:
        """This section's values from its node: every field checked, then unknown keys refused."""
        given: list[str] = []
        if self.exactly_one:
            given = [k for k in self.exactly_one if k in node.data]
            if len(given) != 1:
                raise node.error(None, f"exactly one of {', '.join(self.exactly_one)} is required (found: {', '.join(given) or 'none'})")
        # The one key given of `exactly_one` is required: `eks:` with nothing after it is a mistake.
        values = {f.key: f.read(node, f.required or f.key in given) for f in self.fields}
        node.finish()
        return Values(node, values)

    def label(self, ref: Callable[[Section], str]) -> str:
        return f"mapping ({ref(self)})"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{self.name}"}

    def definition(self) -> dict[str, Any]:
        properties = {}
        for f in self.fields:
            prop = {"description": f.help} | f.kind.json_schema(f.required)
            if f.default is not None and not f.required:
                prop["default"] = f.kind.to_json(f.default)
            properties[f.key] = prop
        out: dict[str, Any] = {"type": "object", "description": self.help, "properties": properties, "additionalProperties": False}
        required = [f.key for f in self.fields if f.required]
        if required:
            out["required"] = required
        if self.exactly_one:
            out["oneOf"] = [{"required": [k]} for k in self.exactly_one]
        return out

    def sections(self) -> Iterator[tuple[str, Section]]:
        yield "", self
        for f in self.fields:
            for path, section in f.kind.sections():
                yield f".{f.key}{path}", section


@dataclass(frozen=True)
class ListOf(Kind):
    """A list of mappings of one section, e.g. `clusters:`."""

    section: Section
    shapes = (list,)

    def read(self, node: Node, key: str, required: bool) -> tuple[Values, ...]:
        return tuple(self.section.read_node(item) for item in node.children(key))

    def label(self, ref: Callable[[Section], str]) -> str:
        return f"list of mappings ({ref(self.section)})"

    def json_schema(self, required: bool = False) -> dict[str, Any]:
        return {"type": "array", "items": self.section.json_schema()}

    def sections(self) -> Iterator[tuple[str, Section]]:
        for path, section in self.section.sections():
            yield "[]" + path, section


def dataclass_default(cls: type, name: str) -> Any:
    """A dataclass field's default, so a section's declared default is the domain object's own."""
    field = next(f for f in fields(cls) if f.name == name)
    if field.default is MISSING:
        raise ValueError(f"{cls.__name__}.{name} has no plain default")
    return field.default


# ---------------------------------------------------------------------------------------------
# What is derived: the JSON Schema and the reference tables


def json_schema(root: Section, title: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy file whose top level is `root`.

    It describes shape (keys, types, required fields, allowed values, defaults) for editors; checks
    across fields and files (known clusters, existing files, durations within limits) stay with
    `jitgate policy check`."""
    definitions: dict[str, Any] = {}
    for _, section in root.sections():
        if section is not root:
            known = definitions.setdefault(section.name, section.definition())
            assert known == section.definition(), f"two sections are named {section.name!r}"
    return {"$schema": JSON_SCHEMA_DIALECT, "title": title} | root.definition() | {"$defs": definitions}


def json_schema_text(root: Section, title: str) -> str:
    return json.dumps(json_schema(root, title), indent=2, ensure_ascii=False) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default_cell(f: Field) -> str:
    if f.required:
        return "required"
    if f.shown_default is not None:
        return f.shown_default
    if f.default is None:
        return ""
    value = f.kind.to_json(f.default)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{value}`"


def markdown_reference(root: Section, heading: str = "####") -> str:
    """One table per section (field, type, default, meaning), in the order a policy file nests them.

    A section used in several places (e.g. `{file: ...}` references) has one table, headed by the
    first place it is used."""
    where: dict[str, str] = {}
    order: list[Section] = []
    for path, section in root.sections():
        if section.name not in where:
            where[section.name] = f"`{path.lstrip('.')}`" if path else "Top level"
            order.append(section)

    def ref(section: Section) -> str:
        return where[section.name]

    blocks: list[str] = []
    for section in order:
        rows = ["| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
        for f in section.fields:
            rows.append(f"| `{f.key}` | {_cell(f.kind.label(ref))} | {_cell(_default_cell(f))} | {_cell(f.help)} |")
        note = f" Exactly one of {', '.join(f'`{k}`' for k in section.exactly_one)}." if section.exactly_one else ""
        blocks.append(f"{heading} {ref(section)}\n\n{section.help}{note}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(blocks)
