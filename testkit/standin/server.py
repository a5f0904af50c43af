"""The HTTP side of the stand-in: authentication, request recording, routing kube paths to the store.

Paths are parsed the way kube-apiserver's RequestInfo does (`/api/v1/namespaces/dev/pods/x/log`,
the legacy `/api/v1/watch/...` prefix, `/namespaces/x/status`), and every refusal is a metav1.Status.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from ruamel.yaml import YAML

from jitgate.kube.status import status as status_object

from . import openapi, protobuf
from . import patch as patches
from .auth import (
    Authenticator,
    AuthError,
    DenyRule,
    Identity,
    forbidden_message,
    sha256_hex,
)
from .container import Container, build_container
from .controllers import Controllers
from .errors import ApiError, bad_request, conflict, not_found
from .exec import ExecRequest, serve_exec
from .h2front import PROTOCOL_HEADER
from .logs import format_line, heartbeat_line, startup_lines
from .resources import Catalogue, ResourceType
from .seed import seed
from .selectors import field_matcher, label_matcher, name_from_field_selector
from .store import Store
from .tables import partial_metadata, table

log = logging.getLogger(__name__)

VERSION_INFO = {
    "major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
    "minCompatibilityMajor": "1", "minCompatibilityMinor": "36",
    "gitVersion": "v1.37.0-eks-standin", "gitCommit": "0" * 40, "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25.0", "compiler": "gc", "platform": "linux/amd64",
}
DISCOVERY_TYPE = "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"
RECORDS_PATH = "/_standin/requests"
MAX_RECORDS = 20000


@dataclass
class StandinConfig:
    tokens: list[str] = field(default_factory=list)
    eks_cluster: str | None = None
    deny: list[DenyRule] = field(default_factory=list)
    server_address: str = "127.0.0.1:443"
    log_interval: float = 0.5
    bookmark_interval: float = 5.0
    seed: bool = True


@dataclass(frozen=True)
class MediaType:
    type: str
    params: dict[str, str]


def parse_accept(header: str | None) -> list[MediaType]:
    out = []
    for item in (header or "").split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        params = {}
        for p in parts[1:]:
            k, _, v = p.partition("=")
            params[k.strip().lower()] = v.strip()
        out.append(MediaType(parts[0].lower(), params))
    return out


def _conversion(request: web.Request, kinds: tuple[str, ...], group: str) -> MediaType | None:
    """The first Accept entry asking for one of `kinds` (as=...) in `group` (g=...), if any."""
    for m in parse_accept(request.headers.get("Accept")):
        if m.params.get("as") in kinds and m.params.get("g") == group:
            return m
    return None


def json_response(obj: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode(), status=status,
                        headers={"Content-Type": content_type})


def error_response(e: ApiError) -> web.Response:
    return json_response(e.status, e.code)


@dataclass
class ResourceRequest:
    rt: ResourceType
    verb: str
    namespace: str | None
    name: str | None
    subresource: str | None


class StandinServer:
    def __init__(self, config: StandinConfig):
        self.config = config
        self.catalogue = Catalogue()
        self.store = Store(self.catalogue)
        self.controllers = Controllers(self.store)
        seed(self.store, workloads=config.seed)
        self.authenticator = Authenticator(config.tokens, config.eks_cluster)
        self.records: list[dict] = []
        # Container filesystems outlive one exec, as in a real container: keyed by (pod uid, container).
        self.filesystems: dict[tuple[str, str], dict[str, bytes]] = {}
        self.yaml = YAML(typ="safe")
        # Handlers of watches, followed logs and exec sessions: ended at once on shutdown.
        self.streams: set[asyncio.Task] = set()

    def end_streams(self) -> None:
        for task in list(self.streams):
            task.cancel()

    def _streaming(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.streams.add(task)
            task.add_done_callback(self.streams.discard)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.authenticate], client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_response_prepare.append(self._audit_id)
        return app

    @staticmethod
    async def _audit_id(request: web.Request, response: web.StreamResponse) -> None:
        # kube-apiserver tags every response; gateways correlate their audit events with it.
        response.headers.setdefault("Audit-Id", str(uuid.uuid4()))

    # Authentication and recording ------------------------------------------------------------------

    def _record(self, request: web.Request) -> dict:
        headers = request.headers
        authorization = headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        return {
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "auth_kind": "none",
            "user": None,
            "token_sha256": sha256_hex(token.strip()) if token.strip() else None,
            "cert_subject": None,
            "eks": None,
            "impersonate_user": headers.get("Impersonate-User"),
            "impersonate_groups": headers.getall("Impersonate-Group", []),
            "impersonate_uid": headers.get("Impersonate-Uid"),
            "impersonate_extra": {k[len("Impersonate-Extra-"):].lower(): headers.getall(k)
                                  for k in set(headers) if k.lower().startswith("impersonate-extra-")},
            "user_agent": headers.get("User-Agent"),
            # HTTP/2 is served by the --h2 front (h2front), which says so in its own header.
            "protocol": headers.get(PROTOCOL_HEADER) or f"HTTP/{request.version.major}.{request.version.minor}",
            "headers": {k: v for k, v in headers.items() if k.lower() not in ("authorization", PROTOCOL_HEADER.lower())},
            "status": None,
        }

    @web.middleware
    async def authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        record = self._record(request)
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        try:
            identity = self.authenticator.authenticate(request.headers.get("Authorization"), peer)
        except AuthError as e:
            log.info("401 %s %s: %s", request.method, request.path_qs, e)
            record["auth_kind"] = "rejected"
            record["status"] = 401
            self._keep(record)
            return json_response(status_object(401, "Unauthorized"), 401)
        record.update(auth_kind=identity.kind, user=identity.user, cert_subject=identity.cert_subject,
                      eks={k: v for k, v in identity.eks.items() if k != "url"} if identity.eks else None)
        request["identity"] = identity
        if request.path.startswith("/_standin/"):
            return await handler(request)
        self._keep(record)
        try:
            response = await handler(request)
        except ApiError as e:
            response = error_response(e)
        except web.HTTPException as e:
            record["status"] = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # noqa: BLE001 - a stand-in bug must still answer like an apiserver
            log.exception("internal error serving %s %s", request.method, request.path_qs)
            response = error_response(ApiError(500, f"Internal error occurred: {type(e).__name__}: {e}",
                                               "InternalError"))
        record["status"] = response.status
        return response

    def _keep(self, record: dict) -> None:
        self.records.append(record)
        if len(self.records) > MAX_RECORDS:
            del self.records[: len(self.records) - MAX_RECORDS]

    def effective_user(self, request: web.Request) -> tuple[str, tuple[str, ...]]:
        identity: Identity = request["identity"]
        user = request.headers.get("Impersonate-User")
        if user:
            groups = tuple(request.headers.getall("Impersonate-Group", [])) + ("system:authenticated",)
            return user, groups
        return identity.user, identity.groups

    def authorize(self, request: web.Request, verb: str, rt: ResourceType, subresource: str | None,
                  namespace: str | None, name: str | None) -> None:
        user, groups = self.effective_user(request)
        attrs = {"verb": verb, "resource": rt.plural + (f"/{subresource}" if subresource else ""),
                 "namespace": namespace or "", "name": name or ""}
        if any(rule.matches(user, groups, attrs) for rule in self.config.deny):
            raise ApiError(403, forbidden_message(user, verb, rt.plural, rt.group, subresource or "",
                                                  namespace or "", name or ""), "Forbidden",
                           {"name": name or "", "group": rt.group, "kind": rt.plural})

    # Routing ----------------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == RECORDS_PATH:
            return self.records_endpoint(request)
        if request.method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           "MethodNotAllowed")
        if "//" in path or any(seg in (".", "..") for seg in path.split("/")):
            raise ApiError(404, "the server could not find the requested resource", "NotFound")
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            return json_response(VERSION_INFO)
        if path == "/openapi/v3":
            return json_response(openapi.index(self.catalogue))
        if path.startswith("/openapi/v3/"):
            doc = openapi.document_for_path(self.catalogue, path[len("/openapi/v3/"):])
            if doc is None:
                raise ApiError(404, "the server could not find the requested resource", "NotFound")
            return json_response(doc)
        if path in ("/api", "/apis"):
            return self.discovery_root(request, legacy=path == "/api")
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            if parts[1] != "v1":
                raise ApiError(404, "the server could not find the requested resource", "NotFound")
            return json_response(self.catalogue.api_resource_list("", "v1"))
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in self.catalogue.groups():
            return json_response(self.catalogue.api_group(parts[1]))
        if parts[0] == "apis" and len(parts) == 3 and self.catalogue.has_group_version(parts[1], parts[2]):
            return json_response(self.catalogue.api_resource_list(parts[1], parts[2]))
        if parts[0] in ("api", "apis"):
            return await self.resource(request, self.parse_resource_path(request, parts))
        raise ApiError(404, "the server could not find the requested resource", "NotFound")

    def records_endpoint(self, request: web.Request) -> web.Response:
        if request.method == "DELETE":
            self.records.clear()
            return json_response({"cleared": True})
        if request.method == "GET":
            return json_response(self.records)
        raise ApiError(405, "GET or DELETE", "MethodNotAllowed")

    def discovery_root(self, request: web.Request, legacy: bool) -> web.Response:
        aggregated = _conversion(request, ("APIGroupDiscoveryList",), "apidiscovery.k8s.io")
        if aggregated and aggregated.params.get("v") in ("v2", "v2beta1"):
            v = aggregated.params["v"]
            return json_response(self.catalogue.aggregated(legacy, v), content_type=DISCOVERY_TYPE.format(v=v))
        if legacy:
            return json_response(self.catalogue.api_versions(self.config.server_address))
        return json_response(self.catalogue.api_group_list())

    def parse_resource_path(self, request: web.Request, parts: list[str]) -> ResourceRequest:
        unknown = ApiError(404, "the server could not find the requested resource", "NotFound")
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 4:
                raise unknown
            group, version, rest = parts[1], parts[2], parts[3:]
        watch = bool(rest) and rest[0] == "watch"
        if watch:
            rest = rest[1:]
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace = rest[1]
            rest = rest[2:] if len(rest) > 2 else ["namespaces", namespace]
            if rest == ["namespaces", namespace]:
                namespace = None
        if not rest or len(rest) > 3:
            raise unknown
        rt = self.catalogue.find(group, version, rest[0])
        if rt is None:
            raise unknown
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource and not rt.subresource(subresource):
            raise unknown
        if namespace is not None and not rt.namespaced:
            raise unknown
        if rt.namespaced and namespace is None and name is not None:
            raise unknown
        watch = watch or request.query.get("watch") in ("true", "1")
        method = request.method
        if method == "GET":
            if subresource in ("exec", "attach", "portforward"):
                verb = "create"  # kube authorizes websocket exec/attach as create
            elif watch:
                verb = "watch"
            else:
                verb = "get" if name else "list"
        elif method == "POST":
            verb = "create"
        elif method == "PUT":
            verb = "update"
        elif method == "PATCH":
            verb = "patch"
        else:
            verb = "delete" if name else "deletecollection"
        if verb not in rt.verbs and not subresource and not (verb == "watch" and "watch" in rt.verbs):
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           "MethodNotAllowed")
        return ResourceRequest(rt, verb, namespace, name, subresource)

    async def resource(self, request: web.Request, rr: ResourceRequest) -> web.StreamResponse:
        self.authorize(request, rr.verb, rr.rt, rr.subresource, rr.namespace, rr.name)
        if not rr.rt.stored:
            return await self.review(request, rr)
        if rr.subresource == "log":
            return await self.pod_log(request, rr)
        if rr.subresource in ("exec", "attach"):
            return await self.pod_exec(request, rr)
        if rr.subresource == "portforward":
            raise bad_request("port forwarding is not supported by the jitgate stand-in")
        if rr.subresource == "scale":
            return await self.scale(request, rr)
        if rr.verb == "watch":
            return await self.watch(request, rr)
        handler = {"get": self.get, "list": self.list, "create": self.create, "update": self.update,
                   "patch": self.patch, "delete": self.delete, "deletecollection": self.delete_collection}[rr.verb]
        return await handler(request, rr)

    # Object verbs -----------------------------------------------------------------------------------

    def render_object(self, request: web.Request, rt: ResourceType, obj: dict, status: int = 200) -> web.Response:
        tbl = _conversion(request, ("Table",), "meta.k8s.io")
        if tbl:
            result = table(rt, [obj], request.query.get("includeObject", "Metadata"))
            result["apiVersion"] = f"meta.k8s.io/{tbl.params.get('v', 'v1')}"
            result["metadata"] = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            return json_response(result, status)
        if _conversion(request, ("PartialObjectMetadata",), "meta.k8s.io"):
            return json_response(partial_metadata(obj), status)
        return json_response(obj, status)

    async def get(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        # GET of the status subresource returns the whole object too, as kube does.
        return self.render_object(request, rr.rt, self.store.get(rr.rt, rr.namespace, rr.name))

    def _matcher(self, request: web.Request):
        labels = label_matcher(request.query.get("labelSelector"))
        fields = field_matcher(request.query.get("fieldSelector"))
        return lambda o: labels(o) and fields(o)

    async def list(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        rt = rr.rt
        items = self.store.list(rt, rr.namespace, self._matcher(request))
        meta: dict = {"resourceVersion": str(self.store.resource_version)}
        start = 0
        if request.query.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(request.query["continue"] + "==="))
                start = int(token["start"])
                meta["resourceVersion"] = str(token["rv"])
            except (ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid: incorrect encoded start resourceVersion "
                                  "(version meta.k8s.io/v1)") from None
        limit = int(request.query.get("limit") or 0)
        end = start + limit if limit > 0 else len(items)
        page = items[start:end]
        if end < len(items):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"start": end, "rv": int(meta["resourceVersion"])}).encode()).decode().rstrip("=")
            meta["remainingItemCount"] = len(items) - end
        tbl = _conversion(request, ("Table",), "meta.k8s.io")
        if tbl:
            result = table(rt, page, request.query.get("includeObject", "Metadata"), list_meta=meta)
            result["apiVersion"] = f"meta.k8s.io/{tbl.params.get('v', 'v1')}"
            return json_response(result)
        if _conversion(request, ("PartialObjectMetadataList",), "meta.k8s.io"):
            return json_response({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                                  "metadata": meta, "items": [partial_metadata(o) for o in page]})
        for obj in page:
            obj.pop("apiVersion", None)
            obj.pop("kind", None)
        return json_response({"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta, "items": page})

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            raise bad_request("the body of the request was empty")
        ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype == "application/vnd.kubernetes.protobuf":
            try:
                return protobuf.decode(raw)
            except ValueError as e:
                raise ApiError(415, f"the jitgate stand-in cannot read this protobuf body ({e}); send JSON",
                               "UnsupportedMediaType") from None
        try:
            if "yaml" in ctype:
                return self.yaml.load(raw.decode())
            return json.loads(raw)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the client's 400
            raise bad_request(f"error decoding request body: {e}") from None

    def _check_kind(self, rt: ResourceType, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise bad_request(f"the body of the request is not a {rt.kind} object")
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind and kind != rt.kind:
            raise bad_request(f"the kind of the object ({kind}) does not match the expected kind ({rt.kind})")
        if api_version and api_version != rt.api_version:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected API version "
                              f"({rt.api_version})")
        return obj

    @staticmethod
    def _dry_run(request: web.Request) -> bool:
        return "All" in request.query.getall("dryRun", [])

    async def create(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        if rr.name is not None:
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           "MethodNotAllowed")
        if rr.rt.namespaced and rr.namespace is None:
            raise ApiError(404, "the server could not find the requested resource", "NotFound")
        body = self._check_kind(rr.rt, await self._body(request))
        ns_in_body = body.get("metadata", {}).get("namespace") if isinstance(body.get("metadata"), dict) else None
        if rr.rt.namespaced and ns_in_body and ns_in_body != rr.namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        obj = self.store.create(rr.rt, rr.namespace, body, dry_run=self._dry_run(request))
        return self.render_object(request, rr.rt, obj, 201)

    async def update(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        body = self._check_kind(rr.rt, await self._body(request))
        obj = self.store.update(rr.rt, rr.namespace, rr.name, body, subresource=rr.subresource,
                                dry_run=self._dry_run(request))
        return self.render_object(request, rr.rt, obj)

    def apply_patch(self, request: web.Request, current: dict, body: Any) -> dict:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype == "application/json-patch+json":
            result = patches.json_patch(current, body)
        elif ctype == "application/merge-patch+json":
            result = patches.merge_patch(current, body)
        elif ctype == "application/strategic-merge-patch+json":
            result = patches.strategic_merge_patch(current, body)
        elif ctype == "application/apply-patch+yaml":
            applied = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
            result = patches.strategic_merge_patch(current, applied)
        else:
            raise ApiError(415, "the body of the request was in an unknown format - accepted media types include: "
                                "application/json-patch+json, application/merge-patch+json, "
                                "application/apply-patch+yaml, application/strategic-merge-patch+json",
                           "UnsupportedMediaType")
        if not isinstance(result, dict):
            raise bad_request("the patch did not produce an object")
        return result

    async def patch(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        rt = rr.rt
        body = await self._body(request)
        dry_run = self._dry_run(request)
        apply = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        if apply:
            body = self._check_kind(rt, body)
            if not request.query.get("fieldManager"):
                raise bad_request("PATCH requests with apply content type require fieldManager")
        current = self.store.try_get(rt, rr.namespace, rr.name)
        if current is None:
            if not apply or rr.subresource:
                raise not_found(rt.plural, rr.name, rt.group)
            body.setdefault("metadata", {})["name"] = rr.name
            obj = self.store.create(rt, rr.namespace, body, dry_run=dry_run)
            return self.render_object(request, rt, obj, 201)
        patched = self.apply_patch(request, current, body)
        patched.setdefault("metadata", {})
        if patched["metadata"].get("resourceVersion") == current["metadata"]["resourceVersion"]:
            patched["metadata"].pop("resourceVersion")  # only an explicit, different RV is a precondition
        obj = self.store.update(rt, rr.namespace, rr.name, patched, subresource=rr.subresource, dry_run=dry_run)
        return self.render_object(request, rt, obj)

    async def _delete_options(self, request: web.Request) -> dict:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            options = json.loads(raw)
        except ValueError as e:
            raise bad_request(f"error decoding DeleteOptions: {e}") from None
        return options if isinstance(options, dict) else {}

    async def delete(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        rt = rr.rt
        options = await self._delete_options(request)
        dry_run = self._dry_run(request) or "All" in options.get("dryRun", [])
        preconditions = options.get("preconditions")
        if rt.key == ("", "pods") and not dry_run:
            # Watchers see the pod Terminating before it goes, as with a kubelet.
            self.store.check_preconditions(self.store.get(rt, rr.namespace, rr.name), preconditions)
            self.store.mark_terminating(rt, rr.namespace, rr.name, options.get("gracePeriodSeconds", 30))
            preconditions = None
        obj = self.store.delete(rt, rr.namespace, rr.name, preconditions, dry_run=dry_run)
        if rt.key in (("", "pods"), ("", "namespaces")):
            # Graceful deletions answer with the object as it starts terminating.
            obj["metadata"]["deletionTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
            if rt.key == ("", "pods"):
                obj["metadata"]["deletionGracePeriodSeconds"] = options.get("gracePeriodSeconds", 30)
            else:
                obj["status"] = {"phase": "Terminating"}
            return self.render_object(request, rt, obj)
        return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                              "details": {"name": rr.name, "group": rt.group, "kind": rt.plural,
                                          "uid": obj["metadata"]["uid"]}})

    async def delete_collection(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        rt = rr.rt
        options = await self._delete_options(request)
        dry_run = self._dry_run(request) or "All" in options.get("dryRun", [])
        deleted = []
        for obj in self.store.list(rt, rr.namespace, self._matcher(request)):
            if self.store.try_get(rt, rr.namespace or obj["metadata"].get("namespace"), obj["metadata"]["name"]):
                deleted.append(self.store.delete(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"],
                                                 dry_run=dry_run))
        for obj in deleted:
            obj.pop("apiVersion", None)
            obj.pop("kind", None)
        return json_response({"kind": rt.list_kind, "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": str(self.store.resource_version)}, "items": deleted})

    # Subresources -----------------------------------------------------------------------------------

    def _scale_of(self, obj: dict) -> dict:
        spec = obj.get("spec", {})
        selector = ",".join(f"{k}={v}" for k, v in spec.get("selector", {}).get("matchLabels", {}).items())
        meta = obj["metadata"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta["uid"],
                             "resourceVersion": meta["resourceVersion"],
                             "creationTimestamp": meta["creationTimestamp"]},
                "spec": {"replicas": spec.get("replicas", 1)},
                "status": {"replicas": obj.get("status", {}).get("replicas", 0), "selector": selector}}

    async def scale(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        rt = rr.rt
        current = self.store.get(rt, rr.namespace, rr.name)
        scale = self._scale_of(current)
        if rr.verb == "get":
            return json_response(scale)
        body = await self._body(request)
        if rr.verb == "update":
            new_scale = body
        elif rr.verb == "patch":
            new_scale = self.apply_patch(request, scale, body)
        else:
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           "MethodNotAllowed")
        rv = new_scale.get("metadata", {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, rr.name, rt.group)
        updated = copy.deepcopy(current)
        updated["spec"]["replicas"] = int(new_scale.get("spec", {}).get("replicas", 0))
        updated["metadata"].pop("resourceVersion")
        self.store.update(rt, rr.namespace, rr.name, updated, dry_run=self._dry_run(request))
        return json_response(self._scale_of(self.store.get(rt, rr.namespace, rr.name)))

    async def review(self, request: web.Request, rr: ResourceRequest) -> web.Response:
        if rr.verb != "create":
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           "MethodNotAllowed")
        body = await self._body(request)
        if not isinstance(body, dict):
            raise bad_request(f"the body of the request is not a {rr.rt.kind} object")
        user, groups = self.effective_user(request)
        if rr.rt.plural == "selfsubjectreviews":
            return json_response({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None},
                                  "status": {"userInfo": {"username": user, "groups": list(groups)}}}, 201)
        attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
        resource = attrs.get("resource", "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        denied = any(rule.matches(user, groups, {"verb": attrs.get("verb", ""), "resource": resource,
                                                 "namespace": attrs.get("namespace", ""),
                                                 "name": attrs.get("name", "")})
                     for rule in self.config.deny)
        result = dict(body)
        result["status"] = {"allowed": not denied}
        if denied:
            result["status"].update(denied=True, reason="denied by a stand-in deny rule")
        return json_response(result, 201)

    # Watch ------------------------------------------------------------------------------------------

    async def watch(self, request: web.Request, rr: ResourceRequest) -> web.StreamResponse:
        rt, q = rr.rt, request.query
        name = rr.name or name_from_field_selector(q.get("fieldSelector"))
        rv_param = q.get("resourceVersion", "")
        send_initial = q.get("sendInitialEvents") == "true"
        since: int | None
        if send_initial or rv_param in ("", "0"):
            since = None
        else:
            try:
                since = int(rv_param)
            except ValueError:
                raise bad_request(f'invalid resource version "{rv_param}"') from None
        matcher = self._matcher(request)
        tbl = _conversion(request, ("Table",), "meta.k8s.io")
        include = q.get("includeObject", "Metadata")
        bookmarks = q.get("allowWatchBookmarks") == "true"
        timeout = float(q.get("timeoutSeconds") or 1800)

        self._streaming()
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        try:
            watcher = self.store.watch(rt, rr.namespace, name, matcher, since)
        except ApiError as e:
            # Like kube: the stream opens, and its one event is an ERROR carrying the 410 Status.
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": e.status}).encode() + b"\n")
            return response
        await response.prepare(request)
        first_table = True

        async def send(type_: str, obj: dict) -> None:
            nonlocal first_table
            if tbl and type_ != "BOOKMARK":
                converted = table(rt, [obj], include, headers=first_table)
                converted["apiVersion"] = f"meta.k8s.io/{tbl.params.get('v', 'v1')}"
                converted["metadata"] = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
                first_table = False
                obj = converted
            await response.write(json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n")

        def bookmark(extra_annotations: dict | None = None) -> dict:
            meta: dict = {"resourceVersion": str(self.store.resource_version)}
            if extra_annotations:
                meta["annotations"] = extra_annotations
            return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}

        deadline = time.monotonic() + timeout
        try:
            if send_initial:
                while not watcher.queue.empty():
                    await send(*watcher.queue.get_nowait())
                await send("BOOKMARK", bookmark({"k8s.io/initial-events-end": "true"}))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wait = min(remaining, self.config.bookmark_interval) if bookmarks and not tbl else remaining
                try:
                    type_, obj = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks and not tbl and deadline - time.monotonic() > 0:
                        await send("BOOKMARK", bookmark())
                    continue
                await send(type_, obj)
        except ConnectionResetError:
            pass  # the client went away; cancellation (also a departure) propagates after cleanup
        finally:
            self.store.unwatch(watcher)
        return response

    # Pods: logs and exec ----------------------------------------------------------------------------

    def _container_for(self, pod: dict, requested: str | None) -> str:
        names = [c["name"] for c in pod["spec"].get("containers", [])]
        pod_name = pod["metadata"]["name"]
        if not requested:
            default = pod["metadata"].get("annotations", {}).get("kubectl.kubernetes.io/default-container")
            if default in names:
                return default
            if len(names) == 1:
                return names[0]
            raise bad_request(f"a container name must be specified for pod {pod_name}, choose one of: "
                              f"[{' '.join(names)}]")
        if requested not in names:
            raise bad_request(f"container {requested} is not valid for pod {pod_name}")
        return requested

    def container(self, pod: dict, name: str) -> Container:
        key = (pod["metadata"]["uid"], name)
        container = build_container(self.store, pod, name, self.filesystems.get(key))
        self.filesystems[key] = container.files
        return container

    def _running_pod(self, rr: ResourceRequest, request: web.Request) -> tuple[dict, Container]:
        pod = self.store.get(rr.rt, rr.namespace, rr.name)
        name = self._container_for(pod, request.query.get("container"))
        phase = pod.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise bad_request(f"cannot exec into a container in a completed pod; current phase is {phase}")
        if phase != "Running":
            raise bad_request(f'container "{name}" in pod "{pod["metadata"]["name"]}" is waiting to start: '
                              "ContainerCreating")
        return pod, self.container(pod, name)

    async def pod_log(self, request: web.Request, rr: ResourceRequest) -> web.StreamResponse:
        if rr.verb != "get":
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           "MethodNotAllowed")
        q = request.query
        pod, container = self._running_pod(rr, request)
        if q.get("previous") == "true":
            raise bad_request(f'previous terminated container "{container.name}" in pod '
                              f'"{pod["metadata"]["name"]}" not found')
        timestamps = q.get("timestamps") == "true"
        lines = startup_lines(container)
        if q.get("sinceSeconds"):
            cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=int(q["sinceSeconds"]))
            lines = [(t, m) for t, m in lines if t >= cutoff]
        if q.get("tailLines"):
            tail = int(q["tailLines"])
            lines = lines[-tail:] if tail > 0 else []
        limit = int(q["limitBytes"]) if q.get("limitBytes") else None
        text = "".join(format_line(t, m, timestamps) for t, m in lines)
        if q.get("follow") != "true":
            body = text.encode()
            return web.Response(body=body[:limit] if limit is not None else body,
                                headers={"Content-Type": "text/plain"})
        self._streaming()
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0

        async def emit(chunk: str) -> bool:
            nonlocal sent
            data = chunk.encode()
            if limit is not None:
                data = data[: max(0, limit - sent)]
            sent += len(data)
            if data:
                await response.write(data)
            return limit is None or sent < limit

        try:
            if await emit(text):
                n = 0
                uid = pod["metadata"]["uid"]
                while True:
                    await asyncio.sleep(self.config.log_interval)
                    current = self.store.try_get(rr.rt, rr.namespace, rr.name)
                    if current is None or current["metadata"]["uid"] != uid:
                        break  # the container is gone, so is its log stream
                    n += 1
                    now = datetime.datetime.now(datetime.timezone.utc)
                    if not await emit(format_line(now, heartbeat_line(container, n), timestamps)):
                        break
        except ConnectionResetError:
            pass
        return response

    async def pod_exec(self, request: web.Request, rr: ResourceRequest) -> web.StreamResponse:
        q = request.query
        pod, container = self._running_pod(rr, request)
        stdin, stdout, stderr = (q.get(k) in ("true", "1") for k in ("stdin", "stdout", "stderr"))
        tty = q.get("tty") in ("true", "1")
        command = q.getall("command", [])
        if rr.subresource == "exec" and not command:
            raise bad_request("you must specify at least one command for the container")
        if not (stdin or stdout or stderr):
            raise bad_request("you must specify at least 1 of stdin, stdout, stderr")
        if tty and stderr:
            raise bad_request("tty and stderr cannot both be true")
        upgrade = request.headers.get("Upgrade", "").lower()
        if upgrade != "websocket":
            raise bad_request("Upgrade request required" if not upgrade else
                              f"the jitgate stand-in speaks only WebSocket ({upgrade} refused): use "
                              "v5.channel.k8s.io")
        exec_request = ExecRequest(container=container, command=command, stdin=stdin, stdout=stdout,
                                   stderr=stderr, tty=tty, attach=rr.subresource == "attach",
                                   log_interval=self.config.log_interval)
        self._streaming()
        return await serve_exec(request, exec_request)
