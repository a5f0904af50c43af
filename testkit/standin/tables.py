"""Server-side printing: meta.k8s.io/v1 Table objects with the columns `kubectl get` users know."""

from __future__ import annotations

import datetime
from typing import Callable

from .resources import ResourceType


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = hours // 24
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{hours // 24 // 365}y"


def age(obj: dict, stamp: str | None = None) -> str:
    stamp = stamp or obj.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return "<unknown>"
    t = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return human_duration((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds())


Column = tuple[str, str, str, int, str]  # name, type, format, priority, description
Row = Callable[[dict], list]

_NAME: Column = ("Name", "string", "name", 0,
                 "Name must be unique within a namespace. Is required when creating resources, although some "
                 "resources may allow a client to request the generation of an appropriate name automatically.")
_AGE: Column = ("Age", "string", "", 0,
                "CreationTimestamp is a timestamp representing the server time when this object was created.")


def _pod_cells(pod: dict) -> list:
    spec, status = pod.get("spec", {}), pod.get("status", {})
    statuses = status.get("containerStatuses", [])
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(c.get("restartCount", 0) for c in statuses)
    reason = status.get("reason") or status.get("phase", "Unknown")
    for c in statuses:
        waiting = c.get("state", {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
    if pod.get("metadata", {}).get("deletionTimestamp"):
        reason = "Terminating"
    return [pod["metadata"]["name"], f"{ready}/{len(spec.get('containers', []))}", reason, restarts, age(pod),
            status.get("podIP") or "<none>", spec.get("nodeName") or "<none>",
            status.get("nominatedNodeName") or "<none>", "<none>"]


def _deployment_cells(d: dict) -> list:
    spec, status = d.get("spec", {}), d.get("status", {})
    containers = spec.get("template", {}).get("spec", {}).get("containers", [])
    selector = ",".join(f"{k}={v}" for k, v in spec.get("selector", {}).get("matchLabels", {}).items())
    return [d["metadata"]["name"], f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
            status.get("updatedReplicas", 0), status.get("availableReplicas", 0), age(d),
            ",".join(c["name"] for c in containers), ",".join(c.get("image", "") for c in containers), selector]


def _replicaset_cells(rs: dict) -> list:
    spec, status = rs.get("spec", {}), rs.get("status", {})
    containers = spec.get("template", {}).get("spec", {}).get("containers", [])
    selector = ",".join(f"{k}={v}" for k, v in spec.get("selector", {}).get("matchLabels", {}).items())
    return [rs["metadata"]["name"], spec.get("replicas", 0), status.get("replicas", 0),
            status.get("readyReplicas", 0), age(rs), ",".join(c["name"] for c in containers),
            ",".join(c.get("image", "") for c in containers), selector]


def _service_cells(svc: dict) -> list:
    spec = svc.get("spec", {})
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", [])) or "<none>"
    selector = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>"
    external = ",".join(spec.get("externalIPs", [])) or "<none>"
    return [svc["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP", "<none>"), external,
            ports, age(svc), selector]


def _node_cells(node: dict) -> list:
    status = node.get("status", {})
    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
    roles = ",".join(sorted(k.split("/", 1)[1] for k in node["metadata"].get("labels", {})
                            if k.startswith("node-role.kubernetes.io/"))) or "<none>"
    info = status.get("nodeInfo", {})
    internal = next((a["address"] for a in status.get("addresses", []) if a.get("type") == "InternalIP"), "<none>")
    return [node["metadata"]["name"], "Ready" if ready.get("status") == "True" else "NotReady", roles, age(node),
            info.get("kubeletVersion", ""), internal, "<none>", info.get("osImage", ""),
            info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]


def _event_cells(ev: dict) -> list:
    obj = ev.get("involvedObject", {})
    last = ev.get("lastTimestamp") or ev.get("eventTime") or ev["metadata"].get("creationTimestamp")
    first = ev.get("firstTimestamp") or last
    source = ev.get("source", {})
    involved = f"{obj.get('kind', '').lower()}/{obj.get('name', '')}"
    return [age(ev, last), ev.get("type", ""), ev.get("reason", ""), involved,
            obj.get("fieldPath", ""), ", ".join(v for v in (source.get("component"), source.get("host")) if v),
            ev.get("message", "").strip(), age(ev, first), ev.get("count", 1), ev["metadata"]["name"]]


PRINTERS: dict[tuple[str, str], tuple[list[Column], Row]] = {
    ("", "pods"): ([
        _NAME,
        ("Ready", "string", "", 0, "The aggregate readiness state of this pod for accepting traffic."),
        ("Status", "string", "", 0, "The aggregate status of the containers in this pod."),
        ("Restarts", "integer", "", 0, "The number of times the containers in this pod have been restarted."),
        _AGE,
        ("IP", "string", "", 1, "IP address allocated to the pod. Routable at least within the cluster."),
        ("Node", "string", "", 1, "NodeName is a request to schedule this pod onto a specific node."),
        ("Nominated Node", "string", "", 1, "nominatedNodeName is set only when this pod preempts other pods."),
        ("Readiness Gates", "string", "", 1, "If specified, all readiness gates will be evaluated for pod readiness."),
    ], _pod_cells),
    ("", "namespaces"): ([
        _NAME, ("Status", "string", "", 0, "The status of the namespace"), _AGE,
    ], lambda o: [o["metadata"]["name"], o.get("status", {}).get("phase", "Active"), age(o)]),
    ("", "secrets"): ([
        _NAME, ("Type", "string", "", 0, "The type of the secret"),
        ("Data", "string", "", 0, "The number of entries in the data field"), _AGE,
    ], lambda o: [o["metadata"]["name"], o.get("type", "Opaque"), len(o.get("data") or {}), age(o)]),
    ("", "configmaps"): ([
        _NAME, ("Data", "string", "", 0, "Number of data entries"), _AGE,
    ], lambda o: [o["metadata"]["name"], len(o.get("data") or {}) + len(o.get("binaryData") or {}), age(o)]),
    ("", "serviceaccounts"): ([
        _NAME, ("Secrets", "string", "", 0, "Number of secrets referenced by this ServiceAccount"), _AGE,
    ], lambda o: [o["metadata"]["name"], len(o.get("secrets") or []), age(o)]),
    ("", "services"): ([
        _NAME, ("Type", "string", "", 0, "The type of the service"),
        ("Cluster-IP", "string", "", 0, "The cluster IP of the service"),
        ("External-IP", "string", "", 0, "The external IPs of the service"),
        ("Port(s)", "string", "", 0, "The ports of the service"), _AGE,
        ("Selector", "string", "", 1, "The selector of the service"),
    ], _service_cells),
    ("", "nodes"): ([
        _NAME, ("Status", "string", "", 0, "The status of the node"),
        ("Roles", "string", "", 0, "The roles of the node"), _AGE,
        ("Version", "string", "", 0, "Kubelet Version reported by the node."),
        ("Internal-IP", "string", "", 1, "List of internal IPs."),
        ("External-IP", "string", "", 1, "List of external IPs."),
        ("OS-Image", "string", "", 1, "OS Image reported by the node."),
        ("Kernel-Version", "string", "", 1, "Kernel Version reported by the node."),
        ("Container-Runtime", "string", "", 1, "Container Runtime Version reported by the node."),
    ], _node_cells),
    ("", "events"): ([
        ("Last Seen", "string", "", 0, "Time when last event occurred"),
        ("Type", "string", "", 0, "Type of this event"),
        ("Reason", "string", "", 0, "Why the action was taken"),
        ("Object", "string", "", 0, "The object that this event is about"),
        ("Subobject", "string", "", 1, "The subobject that this event is about"),
        ("Source", "string", "", 1, "The component reporting this event"),
        ("Message", "string", "", 0, "A human-readable description of the status of this operation"),
        ("First Seen", "string", "", 1, "Time when first event occurred"),
        ("Count", "string", "", 1, "The number of times this event has occurred"),
        ("Name", "string", "", 1, "The name of this event"),
    ], _event_cells),
    ("apps", "deployments"): ([
        _NAME, ("Ready", "string", "", 0, "Number of the pod with ready state"),
        ("Up-to-date", "string", "", 0, "Total number of non-terminated pods targeted by this deployment that "
                                        "have the desired template spec."),
        ("Available", "string", "", 0, "Total number of available pods (ready for at least minReadySeconds) "
                                       "targeted by this deployment."),
        _AGE,
        ("Containers", "string", "", 1, "Names of each container in the template."),
        ("Images", "string", "", 1, "Images referenced by each container in the template."),
        ("Selector", "string", "", 1, "Label selector for pods. Existing ReplicaSets whose pods are selected by "
                                      "this will be the ones affected by this deployment."),
    ], _deployment_cells),
    ("apps", "replicasets"): ([
        _NAME, ("Desired", "integer", "", 0, "Replicas is the number of desired replicas."),
        ("Current", "integer", "", 0, "Replicas is the most recently observed number of replicas."),
        ("Ready", "integer", "", 0, "The number of ready replicas for this replica set."), _AGE,
        ("Containers", "string", "", 1, "Names of each container in the template."),
        ("Images", "string", "", 1, "Images referenced by each container in the template."),
        ("Selector", "string", "", 1, "Selector is a label query over pods that should match the replica count."),
    ], _replicaset_cells),
}

_DEFAULT: tuple[list[Column], Row] = (
    [_NAME, ("Created At", "date", "", 0, "CreationTimestamp is a timestamp representing the server time when "
                                          "this object was created.")],
    lambda o: [o["metadata"]["name"], o["metadata"].get("creationTimestamp")],
)


def partial_metadata(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(rt: ResourceType, objects: list[dict], include_object: str = "Metadata", headers: bool = True,
          list_meta: dict | None = None) -> dict:
    columns, row = PRINTERS.get(rt.key, _DEFAULT)
    rows = []
    for obj in objects:
        entry: dict = {"cells": row(obj)}
        if include_object == "Object":
            entry["object"] = obj
        elif include_object != "None":
            entry["object"] = partial_metadata(obj)
        rows.append(entry)
    definitions = [{"name": n, "type": t, "format": f, "description": d, "priority": p}
                   for n, t, f, p, d in columns] if headers else []
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta or {},
            "columnDefinitions": definitions, "rows": rows}
