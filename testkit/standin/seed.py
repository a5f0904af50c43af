"""The cluster the stand-in starts with: a few namespaces, running pods, secrets, config, a deployment.

The secret values are constants so tests can assert they never leak through the gateway's masking.
"""

from __future__ import annotations

import base64

from .store import Store

NAMESPACES = ("default", "kube-system", "dev", "prod")

# Plain-text values of every seeded secret, per namespace: what masking must never let through.
SECRET_VALUES: dict[str, dict[str, str]] = {
    ns: {"username": f"{ns}-app", "password": f"s3cr3t-{ns}-pa55w0rd"} for ns in NAMESPACES
}
API_TOKEN = "tok-3f9a7c1e5b2d4680"  # the prod `api-keys` secret


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _container(name: str, image: str, port: int | None = None, env: list[dict] | None = None,
               mounts: list[dict] | None = None, command: list[str] | None = None) -> dict:
    c: dict = {"name": name, "image": image}
    if command:
        c["command"] = command
    if port:
        c["ports"] = [{"containerPort": port, "protocol": "TCP"}]
    if env:
        c["env"] = env
    if mounts:
        c["volumeMounts"] = mounts
    return c


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def seed(store: Store, workloads: bool = True) -> None:
    """Namespaces always; `workloads` adds the node, secrets, config, pods, deployment and services."""
    rt = store.rt
    if not workloads:
        for ns in NAMESPACES:
            store.create(rt("", "namespaces"), None, {"metadata": {"name": ns}})
        return
    store.create(rt("", "nodes"), None, {
        "metadata": {"name": "standin-node", "labels": {"kubernetes.io/hostname": "standin-node",
                                                         "kubernetes.io/os": "linux",
                                                         "node-role.kubernetes.io/worker": ""}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "message": "kubelet is posting ready status"}],
                   "addresses": [{"type": "InternalIP", "address": "10.0.0.10"},
                                 {"type": "Hostname", "address": "standin-node"}],
                   "nodeInfo": {"kubeletVersion": "v1.37.0", "osImage": "Debian GNU/Linux 12 (bookworm)",
                                "kernelVersion": "6.1.0", "containerRuntimeVersion": "containerd://2.1.0",
                                "architecture": "amd64", "operatingSystem": "linux"}},
    })
    for ns in NAMESPACES:
        store.create(rt("", "namespaces"), None, {"metadata": {"name": ns}})
        store.create(rt("", "secrets"), ns, {
            "metadata": {"name": "db-credentials", "labels": {"app": "db"}},
            "type": "Opaque",
            "data": {k: _b64(v) for k, v in SECRET_VALUES[ns].items()},
        })
        store.create(rt("", "configmaps"), ns, {
            "metadata": {"name": "app-config", "labels": {"app": "config"}},
            "data": {"LOG_LEVEL": "info" if ns == "prod" else "debug",
                     "app.properties": f"environment={ns}\nfeature.flags=search,export\n"},
        })
    store.create(rt("", "secrets"), "prod", {
        "metadata": {"name": "api-keys"},
        "type": "Opaque",
        "data": {"token": _b64(API_TOKEN)},
    })
    store.create(rt("", "services"), "default", {
        "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]},
    })

    store.create(rt("", "pods"), "default", {
        "metadata": {"name": "nginx", "labels": {"app": "nginx"}},
        "spec": {"containers": [_container("nginx", "nginx:1.27", 80)]},
    })
    store.create(rt("", "pods"), "kube-system", {
        "metadata": {"name": "coredns-5d78c9869d-x7k2p", "labels": {"k8s-app": "kube-dns"}},
        "spec": {"containers": [_container("coredns", "registry.k8s.io/coredns/coredns:v1.11.1", 53)],
                 "priorityClassName": "system-cluster-critical"},
    })
    store.create(rt("", "pods"), "dev", {
        "metadata": {"name": "toolbox", "labels": {"app": "toolbox"}},
        "spec": {"containers": [
            _container("shell", "busybox:1.36", command=["sleep", "infinity"],
                       env=[{"name": "GREETING", "value": "hello from toolbox"}]),
            _container("sidecar", "busybox:1.36", command=["sleep", "infinity"]),
        ]},
    })
    store.create(rt("", "pods"), "prod", {
        "metadata": {"name": "api", "labels": {"app": "api", "tier": "backend"}},
        "spec": {
            "containers": [_container(
                "api", "ghcr.io/example/api:2.3.1", 8080,
                env=[{"name": "DB_HOST", "value": "db.prod.svc.cluster.local"},
                     {"name": "DB_USER", "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "username"}}},
                     _secret_env("DB_PASSWORD", "db-credentials", "password"),
                     {"name": "LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "app-config",
                                                                               "key": "LOG_LEVEL"}}}],
                mounts=[{"name": "config", "mountPath": "/etc/app", "readOnly": True},
                        {"name": "api-keys", "mountPath": "/var/run/secrets/api", "readOnly": True}],
            )],
            "volumes": [{"name": "config", "configMap": {"name": "app-config"}},
                        {"name": "api-keys", "secret": {"secretName": "api-keys"}}],
        },
    })
    store.create(rt("", "pods"), "prod", {
        "metadata": {"name": "worker", "labels": {"app": "worker", "tier": "backend"}},
        "spec": {"containers": [_container("worker", "ghcr.io/example/worker:2.3.1",
                                           env=[_secret_env("DB_PASSWORD", "db-credentials", "password")])]},
    })
    store.create(rt("apps", "deployments"), "dev", {
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [_container("web", "nginx:1.27", 80,
                                                            env=[{"name": "MODE", "value": "dev"}])]}},
        },
    })
    store.create(rt("", "services"), "dev", {
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 80}]},
    })
