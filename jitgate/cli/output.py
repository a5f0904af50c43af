"""How the `jitgate` commands print: tables, JSON/YAML/id output and the `-o` flag (shared by the
access, audit and sessions commands)."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from ruamel.yaml import YAML


def dump(fmt: str, obj: Any) -> None:
    if fmt == "id":  # for scripts: req=$(jitgate request ... -o id)
        print(obj["id"] if isinstance(obj, dict) and "id" in obj else "\n".join(i["id"] for i in obj.get("items", ())))
    elif fmt == "json":
        print(json.dumps(obj, indent=2))
    else:
        out = io.StringIO()
        yaml = YAML(typ="safe", pure=True)
        yaml.default_flow_style = False
        yaml.dump(obj, out)
        sys.stdout.write(out.getvalue())


def table(rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def output_flag(parser: argparse.ArgumentParser, what: str = "human-readable text") -> None:
    parser.add_argument("-o", "--output", choices=("json", "yaml", "id"),
                        help=f"print the object as JSON or YAML, or only its id (default: {what})")
