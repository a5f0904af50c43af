"""The gateway with one or more steps left out, for the benchmark's feature-cost rows only.

    mitmdump -s scripts/bench/gateway_variant.py ...   # JITGATE_BENCH_WITHOUT=masking,recording

What a feature costs is the difference between the full chain and the same chain without it, run
side by side. Production has no switch that removes a step (every call is masked and recorded);
this script builds the chain of addons/gateway.py and drops the named steps, keeping only their
`load` so the options other steps read stay declared. Never a way to run the gateway.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("jitgate_bench_gateway", REPO / "addons" / "gateway.py")
gateway = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gateway)

WITHOUT = {name.strip() for name in os.environ.get("JITGATE_BENCH_WITHOUT", "").split(",") if name.strip()}
_unknown = WITHOUT - set(gateway.CHAIN)
if _unknown:
    raise SystemExit(f"JITGATE_BENCH_WITHOUT names no step of the chain: {', '.join(sorted(_unknown))}")


class OptionsOnly:
    """A left-out step's option declarations, nothing else."""

    def __init__(self, step) -> None:
        self.load = step.load


def _kept(step):
    name = type(step).__name__.lower()
    if name not in WITHOUT:
        return step
    return OptionsOnly(step) if callable(getattr(step, "load", None)) else None


addons = [gateway.Gateway([s for s in map(_kept, gateway.build_chain()) if s is not None])]
