"""Masking throughput: a SecretList of 5,000 items (~20 MB) and a fast watch stream.

For each body: masking (jitgate.masking) against a plain json.loads + json.dumps; for the PodList
without secrets also the no-secret check alone (the literal scans that let it pass unparsed: what
such a response costs more than passing through), in ms, ns per byte and against the parse.

    .venv/bin/python -m scripts.bench.masking
"""

from __future__ import annotations

import base64
import json
import time

from jitgate.masking.objects import Masker
from jitgate.masking.streams import WatchMasker


def best(fn, repeat: int = 5) -> float:
    """The least CPU time of `repeat` runs: a shared machine's other load takes wall time from a run,
    and the CPU it does not get is not counted against it."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def secret_list(items: int = 5000, value_bytes: int = 3000) -> bytes:
    value = base64.b64encode(b"v" * value_bytes).decode()
    return json.dumps({"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": [
        {"metadata": {"name": f"s{i}", "namespace": "dev", "uid": f"uid-{i}", "labels": {"app": "x"}},
         "type": "Opaque", "data": {"password": value, "username": "dXNlcg=="}} for i in range(items)]}).encode()


def secret_list_of_size(response_bytes: int) -> bytes:
    items = max(1, response_bytes // 4100)
    return secret_list(items)


def pod_list(items: int = 5000) -> bytes:
    return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
        {"metadata": {"name": f"p{i}", "namespace": "dev", "labels": {"app": "web"}},
         "spec": {"containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]},
         "status": {"phase": "Running", "podIP": "10.0.0.1"}} for i in range(items)]}).encode()


def pod_list_of_size(response_bytes: int) -> bytes:
    return pod_list(max(1, response_bytes // 232))


def masking_seconds(body: bytes) -> float:
    masker = Masker()
    return best(lambda: masker.mask_json(body))


def json_seconds(body: bytes) -> float:
    return best(lambda: json.dumps(json.loads(body)).encode())


def measure(items: int = 5000, events: int = 20_000) -> dict:
    """The ratios of the issue's targets: lists of `items` Secrets and Pods, a watch of `events`."""
    masker = Masker()
    out: dict = {}
    for name, body in ((f"SecretList {items}", secret_list(items)), (f"PodList {items} (no secrets)", pod_list(items))):
        mb = len(body) / 1e6
        masked = best(lambda: masker.mask_json(body))
        baseline = json_seconds(body)
        out[name] = {"MB": round(mb, 1), "mask MB/s": round(mb / masked, 1), "json MB/s": round(mb / baseline, 1),
                     "mask/json": round(masked / baseline, 2), "mask ms": round(masked * 1e3, 2)}
    # What a body without secrets costs: the literal scans that let it pass unparsed (an unmasked
    # pass-through costs the gateway nothing more in-process), per MB and against the parse it spares.
    pods = body  # the loop's last body: the PodList
    gate = best(lambda: masker.needs_look(pods), repeat=20)
    out[f"PodList {items} (no secrets)"].update({"no-secret check ms": round(gate * 1e3, 2),
                                             "check ns/byte": round(gate / len(pods) * 1e9, 2),
                                             "check/json": round(gate / baseline, 3)})
    lines = [json.dumps({"type": "MODIFIED", "object": {"kind": "Secret", "metadata": {"name": f"s{i}", "resourceVersion": str(i)},
                                                          "data": {"password": "cGFzc3dvcmQ="}}}).encode() + b"\n" for i in range(events)]
    stream = b"".join(lines)

    def watch():
        w = WatchMasker(masker, secrets=True)
        for i in range(0, len(stream), 16384):
            w.feed(stream[i:i + 16384])
        w.feed(b"")

    masked = best(watch)
    baseline = best(lambda: [json.dumps(json.loads(e)) for e in lines])
    out[f"watch {events} events"] = {"MB": round(len(stream) / 1e6, 1), "mask MB/s": round(len(stream) / 1e6 / masked, 1),
                                 "per event us": round(masked / len(lines) * 1e6, 1),
                                 "json per event us": round(baseline / len(lines) * 1e6, 1),
                                 "mask/json": round(masked / baseline, 2)}
    return out


if __name__ == "__main__":
    for name, row in measure().items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
