"""What `kubectl logs` shows for a stand-in container: a deterministic startup story, then heartbeats.

The startup lines print the container's declared environment, resolved, the way many real apps
(unwisely) do; so a pod whose env comes from a secret logs that secret, and masking has work to do.
"""

from __future__ import annotations

import datetime

from .container import Container


def _parse(stamp: str | None) -> datetime.datetime:
    if not stamp:
        return datetime.datetime.now(datetime.timezone.utc)
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def _stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def startup_lines(container: Container) -> list[tuple[datetime.datetime, str]]:
    pod = container.pod
    spec = container.spec()
    who = f"[{container.pod_name}/{container.name}]"
    start = _parse(pod.get("status", {}).get("startTime") or pod["metadata"].get("creationTimestamp"))
    declared = [v["name"] for v in spec.get("env", [])]
    ports = [str(p.get("containerPort")) for p in spec.get("ports", [])]
    messages = [f"INFO {who} starting {spec.get('image', '')} in namespace {pod['metadata']['namespace']}"]
    if declared:
        messages.append(f"INFO {who} environment: " +
                        " ".join(f"{name}={container.env.get(name, '')}" for name in declared))
    messages.append(f"INFO {who} listening on :{ports[0]}" if ports else f"INFO {who} worker loop started")
    messages.append(f"INFO {who} ready")
    messages += [f"INFO {who} GET /healthz 200 ({n})" for n in range(1, 7)]
    return [(start + datetime.timedelta(seconds=i), m) for i, m in enumerate(messages)]


def heartbeat_line(container: Container, n: int) -> str:
    return f"INFO [{container.pod_name}/{container.name}] heartbeat {n}"


def format_line(when: datetime.datetime, message: str, timestamps: bool) -> str:
    return f"{_stamp(when)} {message}\n" if timestamps else f"{message}\n"
