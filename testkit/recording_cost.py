"""What the recording step costs per call: µs for a small GET and for the benchmark's 52 KB PodList.

The addon runs in mitmproxy's own test harness (taddons) with a recordings folder on the local disk;
each call is a fresh flow, as the gateway sees it at `response` (masked, with its identity, request
attributes and grant), and is written to flows.mitm, session.har and the index like a live one. The
parts are timed alone too. A measurement to read, not an assertion.

    .venv/bin/python -m testkit.recording_cost [--calls 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from mitmproxy.io import FlowWriter
from mitmproxy.test import taddons, tflow, tutils

from jitgate.access.model import Grant
from jitgate.access.scope import Scope
from jitgate.chain.flow import call_of
from jitgate.identity.oidc import Identity
from jitgate.kube.request_info import parse_request
from jitgate.recording import har
from jitgate.recording.index import call_row
from jitgate.recording.scrub import scrub_state
from scripts.bench.bodies import pod_list

REPO = Path(__file__).resolve().parents[1]
SMALL = json.dumps({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-0", "namespace": "default"},
                    "status": {"phase": "Running"}}).encode()


def load_module():
    spec = importlib.util.spec_from_file_location("jitgate_recording_cost", REPO / "addons/recording.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CONNECTIONS = tflow.tflow()  # one kept-alive client and cluster connection, as kubectl and the gateway keep them


def make_flow(path: str, body: bytes, grant: Grant):
    request = tutils.treq(method=b"GET", path=path.encode(), headers=((b"Host", b"api.dev.example"), (b"Accept", b"application/json"),
                                                                       (b"User-Agent", b"kubectl/v1.37.1"), (b"Audit-ID", b"x")))
    response = tutils.tresp(content=body, headers=((b"Content-Type", b"application/json"), (b"X-Jitgate-Masked", b"0")))
    flow = tflow.tflow(req=request, resp=response)
    flow.client_conn, flow.server_conn = _CONNECTIONS.client_conn, _CONNECTIONS.server_conn
    flow.live = True
    call = call_of(flow)
    call.identity = Identity("bench@example.com", ("oidc:platform",), "https://idp.example", "bench", time.time() + 3600)
    call.info = parse_request("GET", path)
    call.grant = grant
    call.allow(f"allowed by grant {grant.id}")
    return flow


def per_call(step, flows) -> tuple[list[float], float]:
    """Wall time of each call, and the CPU time (this thread's, kernel included) per call on average."""
    times = []
    cpu = time.thread_time()
    for flow in flows:
        start = time.perf_counter()
        step(flow)
        times.append(time.perf_counter() - start)
    return times, (time.thread_time() - cpu) / len(flows)


def report(name: str, measured: tuple[list[float], float]) -> None:
    times, cpu = measured
    micros = sorted(t * 1e6 for t in times)
    print(f"  {name:<34} CPU {cpu * 1e6:8.1f} µs/call   wall median {statistics.median(micros):8.1f} µs"
          f"   p90 {micros[int(len(micros) * 0.9)]:8.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    grant = Grant("grant-bench", "req-bench", "bench@example.com", "bench", Scope("dev", ("default",), False, ("pods",), ("get", "list")),
                  None, time.time(), time.time() + 3600)
    bodies = {"small GET": ("/api/v1/namespaces/default/pods/web-0", SMALL),
              "52 KB PodList": ("/api/v1/namespaces/default/pods", json.dumps(pod_list()).encode())}
    module = load_module()
    addon = module.Recording()
    with tempfile.TemporaryDirectory() as folder, taddons.context(addon) as tctx:
        tctx.configure(addon, recordings=str(Path(folder) / "recordings"))
        for name, (path, body) in bodies.items():
            print(f"{name} ({len(body)} bytes of response body), {args.calls} calls:")
            flows = [make_flow(path, body, grant) for _ in range(args.calls)]
            report("recording step (response hook)", per_call(addon.response, flows))
            flows = [make_flow(path, body, grant) for _ in range(min(args.calls, 500))]
            states = []
            connections = addon.connections
            report("  flow state", per_call(lambda f, states=states: states.append(module.flow_state(f, connections.state)), flows))
            report("  scrub (bodies were masked)", per_call(lambda s: scrub_state(s, detected=True), states))
            report("  flows.mitm bytes", per_call(lambda f, states=states: connections.flow_pieces(states[0], f), flows))
            report("  (mitmproxy's FlowWriter)", per_call(lambda f: FlowWriter(io.BytesIO()).add(f), flows))
            record = call_of(flows[0]).record()
            report("  HAR entry bytes", per_call(lambda s, record=record: har.entry_pieces(har.entry(s, record)), states))
            row = call_row("s", record, time.time(), 200, path, 1.0)
            index = addon.recorder.index
            report("  index row (SQLite commit)", per_call(lambda _, index=index, row=row: index.add_call(row), states))
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        print(f"recordings written: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
