"""Object storage with kube's semantics: one global resourceVersion, uids, conflicts, and watch events.

Everything runs on one asyncio loop, so a write, its event and the fan-out to watchers happen
atomically with respect to every request; watchers replay history after a resourceVersion without
races between "list" and "watch from there".
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import ApiError, already_exists, conflict, invalid, not_found
from .resources import Catalogue, ResourceType

Key = tuple[str, str]  # (group, plural)
Matcher = Callable[[dict], bool]

# The characters kube's name generator uses (no vowels, no look-alikes).
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def now_rfc3339(clock: float | None = None) -> str:
    t = datetime.datetime.fromtimestamp(clock, datetime.timezone.utc) if clock is not None else \
        datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(n: int = 5) -> str:
    return "".join(random.choice(_NAME_ALPHABET) for _ in range(n))


@dataclass(frozen=True)
class WatchEvent:
    resource_version: int
    type: str  # ADDED / MODIFIED / DELETED
    key: Key
    object: dict
    old: dict | None = None


@dataclass(eq=False)
class Watcher:
    """One watch stream's filter and its queue of (type, object) pairs, already filtered."""

    key: Key
    namespace: str | None
    name: str | None
    matcher: Matcher
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def _selects(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return self.matcher(obj)

    def offer(self, event: WatchEvent) -> None:
        if event.key != self.key:
            return
        now_matches = self._selects(event.object)
        if event.type == "MODIFIED":
            # An object moving in or out of a selector is an ADDED / DELETED for this watch, like kube.
            was_matching = self._selects(event.old)
            if now_matches and was_matching:
                self.queue.put_nowait(("MODIFIED", event.object))
            elif now_matches:
                self.queue.put_nowait(("ADDED", event.object))
            elif was_matching:
                self.queue.put_nowait(("DELETED", event.object))
        elif now_matches:
            self.queue.put_nowait((event.type, event.object))


class Store:
    def __init__(self, catalogue: Catalogue, history: int = 20000):
        self.catalogue = catalogue
        self.resource_version = 0
        self._objects: dict[Key, dict[tuple[str, str], dict]] = {r.key: {} for r in catalogue.resources if r.stored}
        self._history: deque[WatchEvent] = deque(maxlen=history)
        self._watchers: set[Watcher] = set()
        # Called after every write with (resource type, event); the fake controllers hang off this.
        self.listeners: list[Callable[[ResourceType, WatchEvent], None]] = []
        self._ip_counter = 10

    # Reading ------------------------------------------------------------------------------------

    def rt(self, group: str, plural: str) -> ResourceType:
        return next(r for r in self.catalogue.resources if r.key == (group, plural))

    def try_get(self, rt: ResourceType, namespace: str | None, name: str) -> dict | None:
        obj = self._objects[rt.key].get(_slot(rt, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self.try_get(rt, namespace, name)
        if obj is None:
            raise not_found(rt.plural, name, rt.group)
        return obj

    def list(self, rt: ResourceType, namespace: str | None, matcher: Matcher = lambda o: True) -> list[dict]:
        items = [o for (ns, _), o in sorted(self._objects[rt.key].items())
                 if (namespace is None or ns == namespace) and matcher(o)]
        return copy.deepcopy(items)

    def namespace_exists(self, namespace: str) -> bool:
        return ("", namespace) in self._objects[("", "namespaces")]

    # Writing ------------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.resource_version += 1
        return self.resource_version

    def allocate_ip(self, prefix: str = "10.244.0.") -> str:
        self._ip_counter += 1
        return f"{prefix}{self._ip_counter % 250 + 2}"

    def _emit(self, rt: ResourceType, type_: str, obj: dict, old: dict | None = None) -> None:
        event = WatchEvent(int(obj["metadata"]["resourceVersion"]), type_, rt.key, copy.deepcopy(obj),
                           copy.deepcopy(old) if old is not None else None)
        self._history.append(event)
        for w in list(self._watchers):
            w.offer(event)
        for listener in list(self.listeners):
            listener(rt, event)

    def _check_namespace(self, rt: ResourceType, namespace: str | None) -> None:
        if rt.namespaced and not self.namespace_exists(namespace or ""):
            raise not_found("namespaces", namespace or "")

    def create(self, rt: ResourceType, namespace: str | None, obj: dict, dry_run: bool = False) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object", "BadRequest")
        if not meta.get("name"):
            if meta.get("generateName"):
                for _ in range(8):  # like kube, retry the rare collision of a generated name
                    meta["name"] = meta["generateName"] + random_suffix()
                    if _slot(rt, namespace, meta["name"]) not in self._objects[rt.key]:
                        break
            else:
                raise invalid(rt.kind, "", rt.group,
                              [("metadata.name", "FieldValueRequired",
                                "Required value: name or generateName is required")])
        name = meta["name"]
        if rt.namespaced:
            meta["namespace"] = namespace
            self._check_namespace(rt, namespace)
        else:
            meta.pop("namespace", None)
        store = self._objects[rt.key]
        if _slot(rt, namespace, name) in store:
            raise already_exists(rt.plural, name, rt.group)
        obj = _typed(rt, obj)
        for transient in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "selfLink"):
            meta.pop(transient, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        if "spec" in obj:
            meta["generation"] = 1
        apply_defaults(self, rt, obj, None)
        if dry_run:
            meta["resourceVersion"] = str(self.resource_version)
            return obj
        meta["resourceVersion"] = str(self._bump())
        store[_slot(rt, namespace, name)] = obj
        self._emit(rt, "ADDED", obj)
        return copy.deepcopy(obj)

    def update(self, rt: ResourceType, namespace: str | None, name: str, obj: dict,
               subresource: str | None = None, dry_run: bool = False) -> dict:
        """PUT semantics: whole-object replace, resourceVersion precondition when the body carries one."""
        old = self.get(rt, namespace, name)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, f"the name of the object ({meta['name']}) does not match the name on the URL ({name})",
                           "BadRequest")
        if rt.namespaced and meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the "
                                "request", "BadRequest")
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, name, rt.group)
        if subresource == "status":
            # The status subresource changes only status; the main resource never changes status.
            new = copy.deepcopy(old)
            new["status"] = obj.get("status", {})
        else:
            new = obj
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
            new_meta = new["metadata"]
            for kept in ("uid", "creationTimestamp", "generation", "namespace"):
                if kept in old["metadata"]:
                    new_meta[kept] = old["metadata"][kept]
            new_meta["name"] = name
            if old.get("spec") != new.get("spec") and "spec" in new:
                new_meta["generation"] = old["metadata"].get("generation", 0) + 1
        new = _typed(rt, new)
        apply_defaults(self, rt, new, old)
        if _same_but_rv(new, old):
            return old  # a no-op write does not bump the resourceVersion, as in kube
        if dry_run:
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            return new
        new["metadata"]["resourceVersion"] = str(self._bump())
        self._objects[rt.key][_slot(rt, namespace, name)] = new
        self._emit(rt, "MODIFIED", new, old)
        return copy.deepcopy(new)

    def delete(self, rt: ResourceType, namespace: str | None, name: str,
               preconditions: dict | None = None, dry_run: bool = False) -> dict:
        obj = self.get(rt, namespace, name)
        self.check_preconditions(obj, preconditions)
        if dry_run:
            return obj
        if rt.key == ("", "namespaces"):
            # Namespace deletion removes everything in it (kube does this asynchronously; we do it now).
            for other in self.catalogue.resources:
                if other.namespaced and other.stored:
                    for item in self.list(other, name):
                        self.delete(other, name, item["metadata"]["name"])
        del self._objects[rt.key][_slot(rt, namespace, name)]
        obj["metadata"]["resourceVersion"] = str(self._bump())
        self._emit(rt, "DELETED", obj)
        return obj

    @staticmethod
    def check_preconditions(obj: dict, preconditions: dict | None) -> None:
        if not preconditions:
            return
        if preconditions.get("uid") and preconditions["uid"] != obj["metadata"]["uid"]:
            raise ApiError(409, f'Precondition failed: UID in precondition: {preconditions["uid"]}, '
                                f'UID in object meta: {obj["metadata"]["uid"]}', "Conflict")
        if preconditions.get("resourceVersion") and \
                preconditions["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Precondition failed: ResourceVersion in precondition: "
                                f'{preconditions["resourceVersion"]}, ResourceVersion in object meta: '
                                f'{obj["metadata"]["resourceVersion"]}', "Conflict")

    def mark_terminating(self, rt: ResourceType, namespace: str | None, name: str, grace: int) -> None:
        old = self.get(rt, namespace, name)
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = now_rfc3339()
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        new["metadata"]["resourceVersion"] = str(self._bump())
        self._objects[rt.key][_slot(rt, namespace, name)] = new
        self._emit(rt, "MODIFIED", new, old)

    # Watching -----------------------------------------------------------------------------------

    def watch(self, rt: ResourceType, namespace: str | None, name: str | None, matcher: Matcher,
              since: int | None) -> Watcher:
        """A watcher primed with what the client missed: current state (since=None) or history after `since`."""
        watcher = Watcher(rt.key, namespace, name, matcher)
        if since is None:
            for obj in self.list(rt, namespace, matcher):
                if name is None or obj["metadata"]["name"] == name:
                    watcher.queue.put_nowait(("ADDED", obj))
        else:
            oldest = self._history[0].resource_version if self._history else self.resource_version + 1
            if since < oldest - 1 and len(self._history) == self._history.maxlen:
                raise ApiError(410, f"too old resource version: {since} ({oldest - 1})", "Expired")
            for event in self._history:
                if event.resource_version > since:
                    watcher.offer(event)
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)


def _typed(rt: ResourceType, obj: dict) -> dict:
    """The object with kind and apiVersion set and first, in the order kube serializes them."""
    rest = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
    return {"kind": rt.kind, "apiVersion": rt.api_version, **rest}


def _slot(rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str]:
    return (namespace or "") if rt.namespaced else "", name


def _same_but_rv(new: dict, old: dict) -> bool:
    strip = lambda o: {**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}}
    return strip(new) == strip(old)


# Defaults: what admission and the controllers of a real cluster fill in ------------------------------

def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def apply_defaults(store: Store, rt: ResourceType, obj: dict, old: dict | None) -> None:
    defaulter = _DEFAULTERS.get(rt.key)
    if defaulter:
        defaulter(store, obj, old)


def _default_namespace(store: Store, obj: dict, old: dict | None) -> None:
    meta = obj["metadata"]
    meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj.setdefault("status", {"phase": "Active"})
    meta.pop("generation", None)


def _default_secret(store: Store, obj: dict, old: dict | None) -> None:
    obj.setdefault("type", "Opaque")
    string_data = obj.pop("stringData", None) or {}
    if string_data:
        data = obj.setdefault("data", {}) or {}
        data.update({k: _b64(v) for k, v in string_data.items()})
        obj["data"] = data


def _default_pod(store: Store, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("nodeName", "standin-node")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        c.setdefault("imagePullPolicy", "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
    if old is not None or obj.get("status", {}).get("phase"):
        return
    # A freshly created pod is scheduled and running at once: the stand-in has no kubelet delays.
    started = now_rfc3339()
    obj["status"] = {
        "phase": "Running",
        "conditions": [{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": started}
                       for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                 "PodScheduled")],
        "hostIP": "10.0.0.10",
        "hostIPs": [{"ip": "10.0.0.10"}],
        "podIP": (ip := store.allocate_ip()),
        "podIPs": [{"ip": ip}],
        "startTime": started,
        "qosClass": "BestEffort",
        "containerStatuses": [
            {"name": c["name"], "ready": True, "restartCount": 0, "started": True,
             "image": c.get("image", ""), "imageID": f"docker.io/library/{c.get('image', '')}@sha256:" + "0" * 64,
             "containerID": "containerd://" + uuid.uuid4().hex + uuid.uuid4().hex,
             "state": {"running": {"startedAt": started}}, "lastState": {}}
            for c in spec.get("containers", [])
        ],
    }


def _default_service(store: Store, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if not spec.get("clusterIP"):
        spec["clusterIP"] = store.allocate_ip("10.96.0.")
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    for p in spec.get("ports", []):
        p.setdefault("protocol", "TCP")
        p.setdefault("targetPort", p.get("port"))
    obj.setdefault("status", {"loadBalancer": {}})


def _default_deployment(store: Store, obj: dict, old: dict | None) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    spec.setdefault("strategy", {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
    for c in spec.get("template", {}).get("spec", {}).get("containers", []):
        c.setdefault("imagePullPolicy", "IfNotPresent")
    obj.setdefault("status", {})


_DEFAULTERS: dict[Key, Callable[[Store, dict, dict | None], None]] = {
    ("", "namespaces"): _default_namespace,
    ("", "secrets"): _default_secret,
    ("", "pods"): _default_pod,
    ("", "services"): _default_service,
    ("apps", "deployments"): _default_deployment,
}
