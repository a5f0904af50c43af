"""The few fields of kubectl's protobuf request bodies that the body inspectors need.

Typed clients (kubectl's `create deployment`, `run` in some versions) send
`application/vnd.kubernetes.protobuf`: a `runtime.Unknown` envelope around the object. Protobuf
carries field numbers, not names, so this decodes, by k8s.io/api's generated.proto numbers, only
what a guardrail looks at (metadata.name, the pod spec's host namespaces, volumes' hostPath,
security contexts, RBAC role refs and rules) into the JSON shape; other fields are skipped. A kind
not listed here is unreadable (a body rule that needs it then matches: fail closed).
"""

from __future__ import annotations

from jitgate.kube.protobuf import MAGIC, fields



S, I, B = "string", "int", "bool"
# message -> field number -> (JSON name, type); types: S/I/B, "[]<type>", or a message name.
MESSAGES: dict[str, dict[int, tuple[str, str]]] = {
    "ObjectMeta": {1: ("name", S), 3: ("namespace", S)},
    "Pod": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
    "PodTemplate": {1: ("metadata", "ObjectMeta"), 2: ("template", "PodTemplateSpec")},
    "Deployment": {1: ("metadata", "ObjectMeta"), 2: ("spec", "WorkloadSpec")},
    "ReplicaSet": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ReplicaSetSpec")},
    "ReplicationController": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ReplicationControllerSpec")},
    "StatefulSet": {1: ("metadata", "ObjectMeta"), 2: ("spec", "WorkloadSpec")},
    "DaemonSet": {1: ("metadata", "ObjectMeta"), 2: ("spec", "DaemonSetSpec")},
    "Job": {1: ("metadata", "ObjectMeta"), 2: ("spec", "JobSpec")},
    "CronJob": {1: ("metadata", "ObjectMeta"), 2: ("spec", "CronJobSpec")},
    # DeploymentSpec and StatefulSetSpec: template = 3; ReplicaSetSpec 3; DaemonSetSpec 2; JobSpec 6.
    "WorkloadSpec": {3: ("template", "PodTemplateSpec")},
    "ReplicaSetSpec": {3: ("template", "PodTemplateSpec")},
    "ReplicationControllerSpec": {3: ("template", "PodTemplateSpec")},
    "DaemonSetSpec": {2: ("template", "PodTemplateSpec")},
    "JobSpec": {6: ("template", "PodTemplateSpec")},
    "CronJobSpec": {5: ("jobTemplate", "JobTemplateSpec")},
    "JobTemplateSpec": {1: ("metadata", "ObjectMeta"), 2: ("spec", "JobSpec")},
    "PodSpec": {1: ("volumes", "[]Volume"), 2: ("containers", "[]Container"), 11: ("hostNetwork", B),
                12: ("hostPID", B), 13: ("hostIPC", B), 14: ("securityContext", "PodSecurityContext"),
                20: ("initContainers", "[]Container"), 34: ("ephemeralContainers", "[]EphemeralContainer")},
    "Container": {1: ("name", S), 15: ("securityContext", "SecurityContext")},
    "EphemeralContainer": {1: ("", "inline:Container")},  # EphemeralContainerCommon, Container's numbers
    "SecurityContext": {1: ("capabilities", "Capabilities"), 2: ("privileged", B), 4: ("runAsUser", I),
                        5: ("runAsNonRoot", B)},
    "Capabilities": {1: ("add", "[]string"), 2: ("drop", "[]string")},
    "PodSecurityContext": {2: ("runAsUser", I), 3: ("runAsNonRoot", B)},
    "Volume": {1: ("name", S), 2: ("", "inline:VolumeSource")},
    "VolumeSource": {1: ("hostPath", "HostPathVolumeSource")},
    "HostPathVolumeSource": {1: ("path", S), 2: ("type", S)},
    "RoleBinding": {1: ("metadata", "ObjectMeta"), 3: ("roleRef", "RoleRef")},
    "ClusterRoleBinding": {1: ("metadata", "ObjectMeta"), 3: ("roleRef", "RoleRef")},
    "RoleRef": {1: ("apiGroup", S), 2: ("kind", S), 3: ("name", S)},
    "Role": {1: ("metadata", "ObjectMeta"), 2: ("rules", "[]PolicyRule")},
    "ClusterRole": {1: ("metadata", "ObjectMeta"), 2: ("rules", "[]PolicyRule")},
    "PolicyRule": {1: ("verbs", "[]string")},
}
# Kinds whose other fields no guardrail reads (a name rule may look at their metadata.name).
NAME_ONLY = ("ConfigMap", "Secret", "Namespace", "ServiceAccount", "Service")


def _scalar(kind: str, value):
    if kind == S:
        return bytes(value).decode("utf-8")
    if kind == I:
        if not isinstance(value, int):
            raise ValueError("expected a varint")
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == B:
        return bool(value)
    if isinstance(value, int):
        raise ValueError("expected a message")
    return message(kind, value)


def message(name: str, data: bytes) -> dict:
    schema = MESSAGES[name]
    out: dict = {}
    for number, values in fields(data).items():
        entry = schema.get(number)
        if entry is None:
            continue
        key, kind = entry
        if kind.startswith("inline:"):
            for v in values:
                out.update(message(kind[7:], v))
        elif kind.startswith("[]"):
            out.setdefault(key, []).extend(_scalar(kind[2:], v) for v in values)
        else:
            out[key] = _scalar(kind, values[-1])
    return out


def decode(body: bytes) -> dict:
    """The fields guardrails read, as JSON; ValueError for anything else."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    try:
        unknown = fields(body[len(MAGIC):])
        type_meta = fields(unknown.get(1, [b""])[0])
        kind = bytes(type_meta.get(2, [b""])[0]).decode("utf-8")
        raw = unknown.get(2, [b""])[0]
        if kind in MESSAGES:
            return {"kind": kind, **message(kind, raw)}
        if kind in NAME_ONLY:
            return {"kind": kind, **_meta_only(raw)}
    except (UnicodeDecodeError, IndexError, TypeError) as e:
        raise ValueError(f"malformed protobuf: {type(e).__name__}") from None
    raise ValueError(f"kind {kind or '?'} is not read from protobuf")


def _meta_only(raw: bytes) -> dict:
    f = fields(raw)
    return {"metadata": message("ObjectMeta", f[1][0])} if 1 in f else {}
