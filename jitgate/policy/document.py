"""Reading policy YAML with its locations, so every error says file:line: field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from ruamel.yaml.comments import CommentedMap, CommentedSeq


class PolicyError(Exception):
    """A policy mistake, located: `file:line: field: message`."""

    def __init__(self, file: Path | str, line: int | None, field_path: str, message: str):
        self.file = str(file)
        self.line = line
        self.field = field_path
        self.message = message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {field_path}: {message}" if field_path else f"{where}: {message}")


# ---------------------------------------------------------------------------------------------
# Located reading of YAML nodes


class Node:
    """A YAML mapping with its file and field path, so every error can say where it is."""

    def __init__(self, data: CommentedMap, file: Path, path: str):
        self.data = data
        self.file = file
        self.path = path
        self._read: set[str] = set()

    def line(self, key: str | None = None) -> int | None:
        lc = getattr(self.data, "lc", None)
        if lc is None:
            return None
        if key is not None and key in self.data:
            return lc.key(key)[0] + 1
        return lc.line + 1

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> PolicyError:
        return PolicyError(self.file, self.line(key), self.field(key) if key else self.path, message)

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = False, default: Any = None) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(None, f"missing required field {key!r}")
            return default
        value = self.data[key]
        # YAML booleans are ints in Python; never accept one where a number or string is wanted.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.error(key, f"expected {_kind_name(kind)}, got {yaml_kind(value)}")
        return value

    def string(self, key: str, required: bool = False, default: str | None = None) -> str | None:
        value = self.get(key, str, required, default)
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def strings(self, key: str, required: bool = False) -> tuple[str, ...]:
        value = self.get(key, (list, str), required)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else list(value)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                raise self.item_error(key, i, "expected a non-empty string")
        if required and not items:
            raise self.error(key, "must list at least one value")
        return tuple(items)

    def child(self, key: str, required: bool = False) -> Node | None:
        value = self.get(key, dict, required)
        return None if value is None else Node(value, self.file, self.field(key))

    def children(self, key: str) -> Iterator[Node]:
        value = self.get(key, list, default=[])
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.item_error(key, i, f"expected a mapping, got {yaml_kind(item)}")
            yield Node(item, self.file, f"{self.field(key)}[{i}]")

    def path_value(self, key: str, required: bool = False) -> Path | None:
        """A file path, relative to the policy file's folder; it must exist."""
        value = self.string(key, required)
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = (self.file.parent / path).resolve()
        if not path.is_file():
            raise self.error(key, f"file not found: {path}")
        return path

    def check(self, fn: Callable[[], Any], key: str | None = None) -> Any:
        """Run a constructor whose ValueError should be reported at this node."""
        try:
            return fn()
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def finish(self) -> None:
        """Unknown keys are errors: a misspelt security setting must not be silently ignored."""
        for key in self.data:
            if key not in self._read:
                raise self.error(key, f"unknown field {key!r}")

    def item_error(self, key: str, index: int, message: str) -> PolicyError:
        """An error about one item of a list, at that item's line: `field[index]`."""
        return PolicyError(self.file, self._item_line(key, index), f"{self.field(key)}[{index}]", message)

    def _item_line(self, key: str, index: int) -> int | None:
        seq = self.data.get(key)
        if isinstance(seq, CommentedSeq):
            return seq.lc.item(index)[0] + 1
        return self.line(key)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "a list", dict: "a mapping"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _as_tuple(kind)))


def yaml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    # ruamel's round-trip loader gives CommentedSeq/CommentedMap: name them as YAML does.
    kind = next((k for k in (str, int, float, list, dict) if isinstance(value, k)), None)
    return _kind_name(kind) if kind is not None else type(value).__name__


