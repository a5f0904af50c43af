"""Reading the protobuf request bodies kubectl's typed clientset sends.

`kubectl create configmap|secret|namespace|serviceaccount|deployment|service`, `kubectl auth can-i`
and `kubectl auth whoami` write `application/vnd.kubernetes.protobuf`. Protobuf carries field
numbers, not names, so this module has a hand-kept map of the messages those commands use (field
numbers as in k8s.io/api's generated.proto); fields it does not know are dropped, and kinds it does
not know are refused (415) so a client can be told to send JSON.
"""

from __future__ import annotations

import base64
import datetime

MAGIC = b"k8s\x00"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> dict[int, list]:
    """Wire-level decode: field number -> values (ints for varints, bytes for length-delimited)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _str(f: dict[int, list], n: int) -> str:
    return f[n][0].decode() if n in f else ""


def unwrap(body: bytes) -> tuple[str, str, bytes]:
    """The runtime.Unknown envelope: (apiVersion, kind, raw message bytes)."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    unknown = fields(body[len(MAGIC):])
    type_meta = fields(unknown.get(1, [b""])[0])
    return _str(type_meta, 1), _str(type_meta, 2), unknown.get(2, [b""])[0]


# Message schemas: field number -> (JSON name, type). Types: "string", "bytes", "int", "bool",
# "time", "intorstr", "quantity", "map:<value type>", "[]<type>", a message name, or "inline:<message>"
# for Go's embedded structs (their fields appear in the parent's JSON).
S = "string"
MESSAGES: dict[str, dict[int, tuple[str, str]]] = {
    "ObjectMeta": {1: ("name", S), 2: ("generateName", S), 3: ("namespace", S), 5: ("uid", S),
                   6: ("resourceVersion", S), 7: ("generation", "int"), 8: ("creationTimestamp", "time"),
                   11: ("labels", "map:string"), 12: ("annotations", "map:string"),
                   13: ("ownerReferences", "[]OwnerReference"), 14: ("finalizers", "[]string")},
    "OwnerReference": {5: ("apiVersion", S), 1: ("kind", S), 3: ("name", S), 4: ("uid", S),
                       6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map:string"), 3: ("binaryData", "map:bytes"),
                  4: ("immutable", "bool")},
    "Secret": {1: ("metadata", "ObjectMeta"), 2: ("data", "map:bytes"), 3: ("type", S),
               4: ("stringData", "map:string"), 5: ("immutable", "bool")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "ServiceAccount": {1: ("metadata", "ObjectMeta"), 2: ("secrets", "[]ObjectReference"),
                       3: ("imagePullSecrets", "[]LocalObjectReference"),
                       4: ("automountServiceAccountToken", "bool")},
    "ObjectReference": {1: ("kind", S), 2: ("namespace", S), 3: ("name", S), 4: ("uid", S), 5: ("apiVersion", S),
                        6: ("resourceVersion", S), 7: ("fieldPath", S)},
    "LocalObjectReference": {1: ("name", S)},
    "Service": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ServiceSpec")},
    "ServiceSpec": {1: ("ports", "[]ServicePort"), 2: ("selector", "map:string"), 3: ("clusterIP", S),
                    4: ("type", S), 5: ("externalIPs", "[]string"), 7: ("sessionAffinity", S),
                    10: ("externalName", S), 18: ("clusterIPs", "[]string")},
    "ServicePort": {1: ("name", S), 2: ("protocol", S), 3: ("port", "int"), 4: ("targetPort", "intorstr"),
                    5: ("nodePort", "int"), 6: ("appProtocol", S)},
    "Deployment": {1: ("metadata", "ObjectMeta"), 2: ("spec", "DeploymentSpec")},
    "DeploymentSpec": {1: ("replicas", "int"), 2: ("selector", "LabelSelector"), 3: ("template", "PodTemplateSpec"),
                       4: ("strategy", "DeploymentStrategy"), 5: ("minReadySeconds", "int"),
                       6: ("revisionHistoryLimit", "int"), 7: ("paused", "bool"),
                       9: ("progressDeadlineSeconds", "int")},
    "DeploymentStrategy": {1: ("type", S), 2: ("rollingUpdate", "RollingUpdateDeployment")},
    "RollingUpdateDeployment": {1: ("maxUnavailable", "intorstr"), 2: ("maxSurge", "intorstr")},
    "LabelSelector": {1: ("matchLabels", "map:string"), 2: ("matchExpressions", "[]LabelSelectorRequirement")},
    "LabelSelectorRequirement": {1: ("key", S), 2: ("operator", S), 3: ("values", "[]string")},
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
    "Pod": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
    "PodSpec": {1: ("volumes", "[]Volume"), 2: ("containers", "[]Container"), 3: ("restartPolicy", S),
                4: ("terminationGracePeriodSeconds", "int"), 6: ("dnsPolicy", S), 7: ("nodeSelector", "map:string"),
                8: ("serviceAccountName", S), 10: ("nodeName", S), 11: ("hostNetwork", "bool"),
                12: ("hostPID", "bool"), 13: ("hostIPC", "bool"), 15: ("imagePullSecrets", "[]LocalObjectReference"),
                16: ("hostname", S), 19: ("schedulerName", S), 20: ("initContainers", "[]Container"),
                21: ("automountServiceAccountToken", "bool"), 24: ("priorityClassName", S)},
    "Container": {1: ("name", S), 2: ("image", S), 3: ("command", "[]string"), 4: ("args", "[]string"),
                  5: ("workingDir", S), 6: ("ports", "[]ContainerPort"), 7: ("env", "[]EnvVar"),
                  8: ("resources", "ResourceRequirements"), 9: ("volumeMounts", "[]VolumeMount"),
                  13: ("terminationMessagePath", S), 14: ("imagePullPolicy", S),
                  15: ("securityContext", "SecurityContext"), 16: ("stdin", "bool"), 17: ("stdinOnce", "bool"),
                  18: ("tty", "bool"), 19: ("envFrom", "[]EnvFromSource"), 20: ("terminationMessagePolicy", S)},
    "SecurityContext": {2: ("privileged", "bool"), 4: ("runAsUser", "int"), 5: ("runAsNonRoot", "bool"),
                        6: ("readOnlyRootFilesystem", "bool"), 7: ("allowPrivilegeEscalation", "bool")},
    "ContainerPort": {1: ("name", S), 2: ("hostPort", "int"), 3: ("containerPort", "int"), 4: ("protocol", S),
                      5: ("hostIP", S)},
    "EnvVar": {1: ("name", S), 2: ("value", S), 3: ("valueFrom", "EnvVarSource")},
    "EnvVarSource": {1: ("fieldRef", "ObjectFieldSelector"), 3: ("configMapKeyRef", "KeySelector"),
                     4: ("secretKeyRef", "KeySelector")},
    "KeySelector": {1: ("", "inline:LocalObjectReference"), 2: ("key", S), 3: ("optional", "bool")},
    "ObjectFieldSelector": {1: ("apiVersion", S), 2: ("fieldPath", S)},
    "EnvFromSource": {1: ("prefix", S), 2: ("configMapRef", "EnvSource"), 3: ("secretRef", "EnvSource")},
    "EnvSource": {1: ("", "inline:LocalObjectReference"), 2: ("optional", "bool")},
    "ResourceRequirements": {1: ("limits", "map:quantity"), 2: ("requests", "map:quantity")},
    "VolumeMount": {1: ("name", S), 2: ("readOnly", "bool"), 3: ("mountPath", S), 4: ("subPath", S)},
    "Volume": {1: ("name", S), 2: ("", "inline:VolumeSource")},
    "VolumeSource": {1: ("hostPath", "HostPathVolumeSource"), 2: ("emptyDir", "EmptyDirVolumeSource"),
                     6: ("secret", "SecretVolumeSource"), 19: ("configMap", "ConfigMapVolumeSource")},
    "HostPathVolumeSource": {1: ("path", S), 2: ("type", S)},
    "EmptyDirVolumeSource": {1: ("medium", S), 2: ("sizeLimit", "quantity")},
    "SecretVolumeSource": {1: ("secretName", S), 2: ("items", "[]KeyToPath"), 3: ("defaultMode", "int"),
                           4: ("optional", "bool")},
    "ConfigMapVolumeSource": {1: ("", "inline:LocalObjectReference"), 2: ("items", "[]KeyToPath"),
                              3: ("defaultMode", "int"), 4: ("optional", "bool")},
    "KeyToPath": {1: ("key", S), 2: ("path", S), 3: ("mode", "int")},
}
KINDS = ("ConfigMap", "Secret", "Namespace", "ServiceAccount", "Service", "Deployment", "Pod")


def _scalar(kind: str, value) -> object:
    if kind == "string":
        return value.decode()
    if kind == "bytes":
        return base64.b64encode(value).decode()
    if kind == "int":
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == "bool":
        return bool(value)
    if kind == "time":
        seconds = fields(value).get(1, [0])[0]
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if kind == "quantity":
        return _str(fields(value), 1)
    if kind == "intorstr":
        f = fields(value)
        return _str(f, 3) if f.get(1, [0])[0] == 1 else f.get(2, [0])[0]
    return message(kind, value)


def message(name: str, data: bytes) -> dict:
    """Decode `data` as the message `name` into its JSON form."""
    schema = MESSAGES[name]
    out: dict = {}
    for number, values in fields(data).items():
        if number not in schema:
            continue
        key, kind = schema[number]
        if kind.startswith("inline:"):
            for v in values:
                out.update(message(kind[len("inline:"):], v))
        elif kind.startswith("map:"):
            value_kind = kind[len("map:"):]
            entries = out.setdefault(key, {})
            for entry in values:
                f = fields(entry)
                entries[_str(f, 1)] = _scalar(value_kind, f.get(2, [b"" if value_kind != "int" else 0])[0])
        elif kind.startswith("[]"):
            out.setdefault(key, []).extend(_scalar(kind[2:], v) for v in values)
        else:
            out[key] = _scalar(kind, values[-1])
    return out


def decode(body: bytes) -> dict:
    """A protobuf request body (runtime.Unknown envelope) as the JSON object it stands for."""
    api_version, kind, raw = unwrap(body)
    if kind in KINDS:
        return {"apiVersion": api_version, "kind": kind, **message(kind, raw)}
    return decode_review(api_version, kind, raw)


def decode_review(api_version: str, kind: str, raw: bytes) -> dict:
    """A SelfSubjectReview or SelfSubjectAccessReview as the JSON object it stands for."""
    obj: dict = {"apiVersion": api_version, "kind": kind, "metadata": {}}
    if kind == "SelfSubjectReview":
        return obj
    if kind != "SelfSubjectAccessReview":
        raise ValueError(f"cannot read protobuf {kind}")
    spec = fields(fields(raw).get(2, [b""])[0])
    if 1 in spec:
        ra = fields(spec[1][0])
        names = ("namespace", "verb", "group", "version", "resource", "subresource", "name")
        obj["spec"] = {"resourceAttributes": {k: _str(ra, i + 1) for i, k in enumerate(names) if i + 1 in ra}}
    elif 2 in spec:
        nra = fields(spec[2][0])
        obj["spec"] = {"nonResourceAttributes": {"path": _str(nra, 1), "verb": _str(nra, 2)}}
    else:
        obj["spec"] = {}
    return obj
