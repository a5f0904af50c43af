"""addons/gateway.py's docstring says which step runs in which hook; it must match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mitmproxy import hooks

REPO = Path(__file__).resolve().parents[1]
LIFECYCLE = {"load", "configure", "running", "done"}


def hook_table() -> str:
    """The docstring's table, made from the chain's steps as `build_chain()` builds them."""
    spec = importlib.util.spec_from_file_location("jitgate_gateway_under_test", REPO / "addons/gateway.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    steps = module.build_chain()
    rows = []
    # Sorted: hooks.all_hooks is filled in import order, which differs between processes.
    for hook in sorted(hooks.all_hooks):
        if hook in LIFECYCLE:
            continue
        names = [type(step).__name__ for step in steps if callable(getattr(step, hook, None))]
        if names:
            rows.append(f"    {hook:<24} {', '.join(names)}")
    return "\n".join(rows)


def test_the_docstring_names_every_hook_of_every_step() -> None:
    spec = importlib.util.spec_from_file_location("jitgate_gateway_doc", REPO / "addons/gateway.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hook_table() in module.__doc__, "regenerate with: .venv/bin/python -m tests.test_gateway_table"


if __name__ == "__main__":
    print(hook_table())
