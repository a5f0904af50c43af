"""The gateway with one or more steps left out, for the benchmark's feature-cost rows only.

    mitmdump -s scripts/bench/gateway_variant.py ...   # JITGATE_BENCH_WITHOUT=masking,recording

What a feature costs is the difference between the full chain and the same chain without it, run
side by side. Production has no switch that removes a step (every call is masked and recorded);
this script builds the chain of addons/gateway.py and drops the named steps, keeping only their
`load` so the options other steps read stay declared. Never a way to run the gateway.

With JITGATE_BENCH_STEP_TIMES=<file> it also times each step's synchronous hooks where they run
(CPU of the event loop's thread inside them), and writes the totals to the file twice a second:
the steadier measure of a step's own cost, beside the difference between two processes.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import threading
import time
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


class StepTimes:
    """CPU seconds inside each step's synchronous hooks, and how many responses the chain answered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = {}
        self.responses = 0
        threading.Thread(target=self._write, daemon=True, name="bench-step-times").start()

    def timed(self, step_name: str, fn):
        seconds = self.seconds
        seconds.setdefault(step_name, 0.0)
        clock = time.thread_time

        def run(*args):
            started = clock()
            try:
                return fn(*args)
            finally:
                seconds[step_name] += clock() - started

        return run

    def count(self, fn):
        def run(*args):
            self.responses += 1
            return fn(*args)

        return run

    def _write(self) -> None:
        while True:
            time.sleep(0.5)  # scripts/bench/run.py's STEP_TIMES_EVERY: it waits for this
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"responses": self.responses, "seconds": dict(self.seconds)}))
            temporary.replace(self.path)


def _timed_chain(steps: list, times: StepTimes) -> list:
    for step in steps:
        name = type(step).__name__.lower()
        for hook in gateway.hooks.all_hooks:
            fn = getattr(step, hook, None)
            if callable(fn) and not inspect.iscoroutinefunction(fn) and hook not in ("load", "configure", "running", "done"):
                setattr(step, hook, times.timed(name, fn))
    return steps


_steps = [s for s in map(_kept, gateway.build_chain()) if s is not None]
if os.environ.get("JITGATE_BENCH_STEP_TIMES"):
    _times = StepTimes(Path(os.environ["JITGATE_BENCH_STEP_TIMES"]))
    _steps = _timed_chain(_steps, _times)
    _chain = gateway.Gateway(_steps)
    _chain.response = _times.count(_chain.response)
    addons = [_chain]
else:
    addons = [gateway.Gateway(_steps)]
