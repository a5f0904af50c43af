"""Canned response bodies: what a Kubernetes API server and an OIDC issuer would answer.

The shapes follow real kube-apiserver output (a PodList of 20 pods of a Deployment, a SecretList,
a watch stream of ADDED events), so the gateway parses and forwards bodies of realistic size.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

NAMESPACE = "default"
PODS_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods"
SECRETS_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"
WATCH_PATH = f"{PODS_PATH}?watch=1"
# Every path nginx serves, with what a client should get from it.
API_PATHS = ("/version", "/api", "/api/v1", PODS_PATH, SECRETS_PATH, WATCH_PATH)

CLIENT_ID = "jitgate"
USER_EMAIL = "bench@example.com"
USER_GROUPS = ["platform", "oncall"]
# Approves the benchmark user's request for Secrets (immediate approval may not grant them).
REVIEWER_EMAIL = "reviewer@example.com"
REVIEWER_GROUPS = ["sre"]
KEY_ID = "bench-rs256"
# A second key, used only by the in-process identity-cache curve: Ed25519 signs and verifies fast
# enough to fill a cache with 100,000 distinct verified tokens in seconds. The gateway accepts RS256 only.
CURVE_KEY_ID = "bench-eddsa"


def _stamp(seconds_ago: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def pod(index: int) -> dict[str, Any]:
    name = f"web-7c9d8f6b5-{index:05x}"
    return {
        "metadata": {
            "name": name,
            "generateName": "web-7c9d8f6b5-",
            "namespace": NAMESPACE,
            "uid": str(uuid.UUID(int=index + 1)),
            "resourceVersion": str(1000 + index),
            "creationTimestamp": _stamp(3600 + index),
            "labels": {"app": "web", "pod-template-hash": "7c9d8f6b5", "tier": "frontend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": _stamp(7200)},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9d8f6b5",
                "uid": str(uuid.UUID(int=9999)), "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "containers": [{
                "name": "web",
                "image": "public.ecr.aws/nginx/nginx:1.27",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"},
                        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                                  "readOnly": True}],
                "terminationMessagePath": "/dev/termination-log",
                "imagePullPolicy": "IfNotPresent",
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web",
            "nodeName": f"ip-10-0-{index % 4}-{10 + index}.eu-west-1.compute.internal",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {
                "expirationSeconds": 3607, "path": "token"}}]}}],
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": _stamp(3500)}
                           for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "hostIP": f"10.0.{index % 4}.{10 + index}",
            "podIP": f"10.0.{64 + index % 4}.{20 + index}",
            "startTime": _stamp(3550),
            "containerStatuses": [{
                "name": "web", "ready": True, "restartCount": 0, "started": True,
                "image": "public.ecr.aws/nginx/nginx:1.27",
                "imageID": "public.ecr.aws/nginx/nginx@sha256:" + "ab" * 32,
                "containerID": "containerd://" + f"{index:064x}",
                "state": {"running": {"startedAt": _stamp(3540)}},
            }],
            "qosClass": "Burstable",
        },
    }


def pod_list(count: int = 20) -> dict[str, Any]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "2000"},
            "items": [pod(i) for i in range(count)]}


def secret_list(count: int = 5) -> dict[str, Any]:
    items = []
    for i in range(count):
        items.append({
            "metadata": {"name": f"app-secret-{i}", "namespace": NAMESPACE, "uid": str(uuid.UUID(int=5000 + i)),
                         "resourceVersion": str(3000 + i), "creationTimestamp": _stamp(86400)},
            "type": "Opaque",
            "data": {"username": base64.b64encode(b"app").decode(),
                     "password": base64.b64encode(f"s3cr3t-value-{i}".encode()).decode()},
        })
    return {"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "3100"}, "items": items}


def watch_stream(count: int = 20) -> str:
    """Newline-delimited watch events, as a watch on pods sends them."""
    return "".join(json.dumps({"type": "ADDED", "object": {"kind": "Pod", "apiVersion": "v1", **pod(i)}}) + "\n"
                   for i in range(count))


def discovery() -> dict[str, dict[str, Any]]:
    """The discovery documents kubectl reads first: /version, /api, /api/v1."""
    return {
        "version": {"major": "1", "minor": "33", "gitVersion": "v1.33.1-eks-bench", "gitCommit": "0" * 40,
                    "gitTreeState": "clean", "buildDate": "2025-05-01T00:00:00Z", "goVersion": "go1.24.2",
                    "compiler": "gc", "platform": "linux/amd64"},
        "api": {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "10.0.0.1:443"}]},
        "api-v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": name, "singularName": singular, "namespaced": True, "kind": kind,
             "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}
            for name, singular, kind in (("pods", "pod", "Pod"), ("secrets", "secret", "Secret"),
                                         ("configmaps", "configmap", "ConfigMap"))]},
    }


class Issuer:
    """A static OIDC issuer: its keys, discovery document and JWKS, and tokens it signs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.curve_key = ed25519.Ed25519PrivateKey.generate()

    def discovery_document(self) -> dict[str, Any]:
        return {"issuer": self.url, "jwks_uri": f"{self.url}/jwks", "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"]}

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=KEY_ID, use="sig", alg="RS256")
        curve_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.curve_key.public_key()))
        curve_jwk.update(kid=CURVE_KEY_ID, use="sig", alg="EdDSA")
        return {"keys": [jwk, curve_jwk]}

    def claims(self, email: str, lifetime: int, groups: list[str] = USER_GROUPS) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.url, "aud": CLIENT_ID, "sub": email.split("@")[0], "email": email,
                "email_verified": True, "groups": groups, "iat": now, "exp": now + lifetime}

    def token(self, email: str = USER_EMAIL, lifetime: int = 86400, groups: list[str] = USER_GROUPS) -> str:
        """An RS256 ID token, as the gateway's identity provider would issue it."""
        return jwt.encode(self.claims(email, lifetime, groups), self.key, algorithm="RS256", headers={"kid": KEY_ID})

    def curve_token(self, email: str, lifetime: int = 86400) -> str:
        """An EdDSA ID token for the in-process identity-cache curve."""
        return jwt.encode(self.claims(email, lifetime), self.curve_key, algorithm="EdDSA",
                          headers={"kid": CURVE_KEY_ID})


def write_bodies(directory: Path, issuer: Issuer) -> None:
    """Write every canned body where the nginx configuration expects it."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = discovery()
    files = {
        "version.json": json.dumps(docs["version"]),
        "api.json": json.dumps(docs["api"]),
        "api-v1.json": json.dumps(docs["api-v1"]),
        "pods.json": json.dumps(pod_list()),
        "secrets.json": json.dumps(secret_list()),
        "watch-pods.json": watch_stream(),
        "openid-configuration.json": json.dumps(issuer.discovery_document()),
        "jwks.json": json.dumps(issuer.jwks()),
    }
    for name, text in files.items():
        (directory / name).write_text(text)
