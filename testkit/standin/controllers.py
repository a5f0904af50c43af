"""Just enough of a cluster's controllers that objects behave as people expect after a write.

- Namespace: a new namespace gets its `default` ServiceAccount.
- Deployment: a ReplicaSet per pod template and that many running pods; scaling, template changes,
  pod deletion and deployment deletion converge at once; the deployment's status follows.
- Pod: a new pod gets the Scheduled/Pulled/Created/Started events `kubectl describe` shows.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from .resources import ResourceType
from .store import Store, WatchEvent, now_rfc3339

_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def template_hash(template: dict) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(_HASH_ALPHABET[b % len(_HASH_ALPHABET)] for b in digest[:10])


def _owned_by(obj: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))


def owned_by(uid: str):
    return lambda obj: _owned_by(obj, uid)


def _owner_ref(owner: dict) -> dict:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


class Controllers:
    def __init__(self, store: Store):
        self.store = store
        self.namespaces = store.rt("", "namespaces")
        self.pods = store.rt("", "pods")
        self.events = store.rt("", "events")
        self.serviceaccounts = store.rt("", "serviceaccounts")
        self.deployments = store.rt("apps", "deployments")
        self.replicasets = store.rt("apps", "replicasets")
        self._reconciling = False
        store.listeners.append(self.on_event)

    def on_event(self, rt: ResourceType, event: WatchEvent) -> None:
        if rt is self.namespaces and event.type == "ADDED":
            name = event.object["metadata"]["name"]
            if self.store.try_get(self.serviceaccounts, name, "default") is None:
                self.store.create(self.serviceaccounts, name, {"metadata": {"name": "default"}})
        elif rt is self.pods and event.type == "ADDED":
            self._pod_started_events(event.object)
        if self._reconciling:
            return
        if rt is self.deployments:
            self._reconciling = True
            try:
                if event.type == "DELETED":
                    self._collect_garbage(event.object)
                else:
                    self.reconcile(event.object["metadata"]["namespace"], event.object["metadata"]["name"])
            finally:
                self._reconciling = False
        elif rt is self.pods and event.type == "DELETED":
            self._reconcile_owner_of(event.object)

    def _reconcile_owner_of(self, pod: dict) -> None:
        ns = pod["metadata"]["namespace"]
        for ref in pod["metadata"].get("ownerReferences", []):
            if ref.get("kind") != "ReplicaSet":
                continue
            rs = self.store.try_get(self.replicasets, ns, ref["name"])
            for rs_ref in (rs or {}).get("metadata", {}).get("ownerReferences", []):
                if rs_ref.get("kind") == "Deployment" and self.store.try_get(self.deployments, ns, rs_ref["name"]):
                    self._reconciling = True
                    try:
                        self.reconcile(ns, rs_ref["name"])
                    finally:
                        self._reconciling = False

    def _collect_garbage(self, deployment: dict) -> None:
        ns, uid = deployment["metadata"]["namespace"], deployment["metadata"]["uid"]
        for rs in self.store.list(self.replicasets, ns, owned_by(uid)):
            for pod in self.store.list(self.pods, ns, owned_by(rs["metadata"]["uid"])):
                self.store.delete(self.pods, ns, pod["metadata"]["name"])
            self.store.delete(self.replicasets, ns, rs["metadata"]["name"])

    def reconcile(self, ns: str, name: str) -> None:
        dep = self.store.try_get(self.deployments, ns, name)
        if dep is None:
            return
        spec = dep.get("spec", {})
        template = spec.get("template", {})
        replicas = int(spec.get("replicas", 1))
        pod_hash = template_hash(template)
        current_name = f"{name}-{pod_hash}"
        owned = self.store.list(self.replicasets, ns, owned_by(dep["metadata"]["uid"]))
        revision = 1 + max((int(rs["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision", 0))
                            for rs in owned), default=0)
        if not any(rs["metadata"]["name"] == current_name for rs in owned):
            labels = {**template.get("metadata", {}).get("labels", {}), "pod-template-hash": pod_hash}
            rs_template = {**template, "metadata": {**template.get("metadata", {}), "labels": labels}}
            self.store.create(self.replicasets, ns, {
                "metadata": {"name": current_name, "labels": labels, "ownerReferences": [_owner_ref(dep)],
                             "annotations": {"deployment.kubernetes.io/revision": str(revision),
                                             "deployment.kubernetes.io/desired-replicas": str(replicas)}},
                "spec": {"replicas": replicas,
                         "selector": {"matchLabels": {**spec.get("selector", {}).get("matchLabels", {}),
                                                      "pod-template-hash": pod_hash}},
                         "template": rs_template},
            })
            owned = self.store.list(self.replicasets, ns, owned_by(dep["metadata"]["uid"]))
        for rs in owned:
            desired = replicas if rs["metadata"]["name"] == current_name else 0
            self._scale_pods(rs, desired)
            rs_name = rs["metadata"]["name"]
            if rs["spec"].get("replicas") != desired:
                rs["spec"]["replicas"] = desired
                rs = self.store.update(self.replicasets, ns, rs_name, _without_rv(rs))
            running = len(self.store.list(self.pods, ns, owned_by(rs["metadata"]["uid"])))
            rs_status = {"replicas": running, "observedGeneration": rs["metadata"].get("generation", 1)}
            if running:
                rs_status.update(fullyLabeledReplicas=running, readyReplicas=running, availableReplicas=running)
            if rs.get("status") != rs_status:
                rs["status"] = rs_status
                self.store.update(self.replicasets, ns, rs_name, _without_rv(rs), subresource="status")
        now = now_rfc3339()
        status = {
            "observedGeneration": dep["metadata"].get("generation", 1),
            "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability.", "lastUpdateTime": now, "lastTransitionTime": now},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "message": f'ReplicaSet "{current_name}" has successfully progressed.',
                 "lastUpdateTime": now, "lastTransitionTime": now},
            ],
        }
        if replicas == 0:
            for k in ("updatedReplicas", "readyReplicas", "availableReplicas", "replicas"):
                status.pop(k)
        old = dep.get("status", {})
        if {k: v for k, v in old.items() if k != "conditions"} != {k: v for k, v in status.items()
                                                                   if k != "conditions"}:
            dep["status"] = status
            self.store.update(self.deployments, ns, name, _without_rv(dep), subresource="status")

    def _scale_pods(self, rs: dict, desired: int) -> None:
        ns = rs["metadata"]["namespace"]
        pods = self.store.list(self.pods, ns, owned_by(rs["metadata"]["uid"]))
        pods.sort(key=lambda p: p["metadata"]["creationTimestamp"])
        for pod in pods[desired:]:
            self.store.delete(self.pods, ns, pod["metadata"]["name"])
        template = rs["spec"]["template"]
        for _ in range(desired - len(pods)):
            self.store.create(self.pods, ns, {
                "metadata": {"generateName": rs["metadata"]["name"] + "-",
                             "labels": template.get("metadata", {}).get("labels", {}),
                             "annotations": template.get("metadata", {}).get("annotations", {}),
                             "ownerReferences": [_owner_ref(rs)]},
                "spec": template.get("spec", {}),
            })

    def _pod_started_events(self, pod: dict) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if not self.store.namespace_exists(ns):
            return
        involved = {"kind": "Pod", "namespace": ns, "name": name, "uid": meta["uid"], "apiVersion": "v1",
                    "resourceVersion": meta["resourceVersion"]}
        now = now_rfc3339()

        def record(reason: str, message: str, component: str, field_path: str | None = None) -> None:
            obj = dict(involved)
            if field_path:
                obj["fieldPath"] = field_path
            self.store.create(self.events, ns, {
                "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}"},
                "involvedObject": obj, "reason": reason, "message": message,
                "source": {"component": component, "host": "standin-node"} if component == "kubelet"
                else {"component": component},
                "firstTimestamp": now, "lastTimestamp": now, "count": 1, "type": "Normal",
                "reportingComponent": component, "reportingInstance": "standin-node" if component == "kubelet" else "",
            })

        record("Scheduled", f"Successfully assigned {ns}/{name} to standin-node", "default-scheduler")
        for c in pod.get("spec", {}).get("containers", []):
            path = f"spec.containers{{{c['name']}}}"
            record("Pulled", f'Container image "{c.get("image", "")}" already present on machine', "kubelet", path)
            record("Created", f"Created container: {c['name']}", "kubelet", path)
            record("Started", f"Started container {c['name']}", "kubelet", path)



def _without_rv(obj: dict) -> dict:
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}
