"""Policy files: YAML (ruamel.yaml) describing clusters and identity providers.

A policy is one YAML file or a directory of them (`*.yaml`, `*.yml`, read in name order and merged
section by section). Every mistake is reported as `file:line: field: what is wrong`, and unknown
keys are mistakes too: a typo in a security policy must stop the gateway, not be ignored.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from typing import TYPE_CHECKING

from jitgate.eks import EKSClusterCredentialConfig
from jitgate.notify import parse_notifications
from jitgate.oidc import IssuerConfig

if TYPE_CHECKING:
    from jitgate.access import AccessRule
    from jitgate.notify import Webhook


class PolicyError(Exception):
    """A policy mistake, located: `file:line: field: message`."""

    def __init__(self, file: Path | str, line: int | None, field_path: str, message: str):
        self.file = str(file)
        self.line = line
        self.field = field_path
        self.message = message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {field_path}: {message}" if field_path else f"{where}: {message}")


@dataclass(frozen=True)
class TokenFileCredential:
    """A bearer token read from a file (re-read when the file changes, as projected tokens rotate)."""

    path: Path


@dataclass(frozen=True)
class ClientCertCredential:
    cert_file: Path
    key_file: Path


UpstreamCredential = EKSClusterCredentialConfig | TokenFileCredential | ClientCertCredential


@dataclass(frozen=True)
class Cluster:
    name: str
    endpoint: str  # the URL clients use, e.g. https://ABC.gr7.eu-west-1.eks.amazonaws.com
    host: str
    port: int
    ca_file: Path  # verifies the upstream; verification is never skipped
    credential: UpstreamCredential
    connect: tuple[str, int] | None = None  # where to actually connect, when not the endpoint's host
    impersonate: bool = False  # send Impersonate-User/Group so cluster RBAC and audit see the human
    # Named IAM roles an access rule may pick (`upstream_role:`), e.g. readonly vs admin, per scope.
    upstream_roles: Mapping[str, str] = field(default_factory=dict)

    def credential_for_role(self, role: str | None) -> UpstreamCredential:
        """The credential a grant with this upstream role uses: the named IAM role, or the default."""
        if role is None:
            return self.credential
        return dataclasses.replace(self.credential, role_arn=self.upstream_roles[role])

    @property
    def connect_address(self) -> tuple[str, int]:
        return self.connect or (self.host, self.port)


@dataclass(frozen=True)
class Policy:
    clusters: tuple[Cluster, ...]
    identity_providers: tuple[IssuerConfig, ...]
    sources: tuple[Path, ...]
    by_endpoint: dict[tuple[str, int], Cluster] = field(repr=False)
    by_name: dict[str, Cluster] = field(repr=False)
    access_rules: tuple["AccessRule", ...] = ()
    webhooks: tuple["Webhook", ...] = ()

    def cluster_for(self, host: str, port: int) -> Cluster | None:
        return self.by_endpoint.get((host.lower(), port))

    def cluster_at(self, host: str, port: int) -> Cluster | None:
        """The cluster whose connect address (or endpoint, without one) this is; they are unique."""
        for cluster in self.clusters:
            if cluster.connect_address == (host.lower(), port):
                return cluster
        return None

    def by_endpoint_host(self, host: str) -> Cluster | None:
        """Endpoint hosts are unique across clusters, so the upstream SNI names the cluster."""
        for cluster in self.clusters:
            if cluster.host == host:
                return cluster
        return None


# ---------------------------------------------------------------------------------------------
# Located reading of YAML nodes


class Node:
    """A YAML mapping with its file and field path, so every error can say where it is."""

    def __init__(self, data: CommentedMap, file: Path, path: str):
        self.data = data
        self.file = file
        self.path = path
        self._read: set[str] = set()

    def line(self, key: str | None = None) -> int | None:
        lc = getattr(self.data, "lc", None)
        if lc is None:
            return None
        if key is not None and key in self.data:
            return lc.key(key)[0] + 1
        return lc.line + 1

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> PolicyError:
        return PolicyError(self.file, self.line(key), self.field(key) if key else self.path, message)

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = False, default: Any = None) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(None, f"missing required field {key!r}")
            return default
        value = self.data[key]
        # YAML booleans are ints in Python; never accept one where a number or string is wanted.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.error(key, f"expected {_kind_name(kind)}, got {_yaml_kind(value)}")
        return value

    def string(self, key: str, required: bool = False, default: str | None = None) -> str | None:
        value = self.get(key, str, required, default)
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def strings(self, key: str, required: bool = False) -> tuple[str, ...]:
        value = self.get(key, (list, str), required)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else list(value)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                raise PolicyError(self.file, self._item_line(key, i), f"{self.field(key)}[{i}]", "expected a non-empty string")
        if required and not items:
            raise self.error(key, "must list at least one value")
        return tuple(items)

    def child(self, key: str, required: bool = False) -> Node | None:
        value = self.get(key, dict, required)
        return None if value is None else Node(value, self.file, self.field(key))

    def children(self, key: str) -> Iterator[Node]:
        value = self.get(key, list, default=[])
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise PolicyError(self.file, self._item_line(key, i), f"{self.field(key)}[{i}]", f"expected a mapping, got {_yaml_kind(item)}")
            yield Node(item, self.file, f"{self.field(key)}[{i}]")

    def path_value(self, key: str, required: bool = False) -> Path | None:
        """A file path, relative to the policy file's folder; it must exist."""
        value = self.string(key, required)
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = (self.file.parent / path).resolve()
        if not path.is_file():
            raise self.error(key, f"file not found: {path}")
        return path

    def check(self, fn: Callable[[], Any], key: str | None = None) -> Any:
        """Run a constructor whose ValueError should be reported at this node."""
        try:
            return fn()
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def finish(self) -> None:
        """Unknown keys are errors: a misspelt security setting must not be silently ignored."""
        for key in self.data:
            if key not in self._read:
                raise self.error(key, f"unknown field {key!r}")

    def _item_line(self, key: str, index: int) -> int | None:
        seq = self.data.get(key)
        if isinstance(seq, CommentedSeq):
            return seq.lc.item(index)[0] + 1
        return self.line(key)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "a list", dict: "a mapping"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _as_tuple(kind)))


def _yaml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return _kind_name(type(value)) if type(value) in (str, int, float, list, dict) else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Sections


def _parse_host_port(node: Node, key: str, text: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    host = host.strip("[]")
    if not host:
        raise node.error(key, f"expected host:port, got {text!r}")
    if not port_text:
        if default_port is None:
            raise node.error(key, f"expected host:port, got {text!r}")
        return host.lower(), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise node.error(key, f"invalid port in {text!r}")
    return host.lower(), int(port_text)


def _credential(node: Node) -> tuple[UpstreamCredential, dict[str, str]]:
    kinds = [k for k in ("eks", "token_file", "client_cert") if k in node.data]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        raise node.error(None, f"exactly one of eks, token_file, client_cert is required (found: {found})")
    roles: dict[str, str] = {}
    if kinds[0] == "token_file":
        cred: UpstreamCredential = TokenFileCredential(node.path_value("token_file", required=True))
    elif kinds[0] == "client_cert":
        cc = node.child("client_cert", required=True)
        cred = ClientCertCredential(cc.path_value("cert_file", required=True), cc.path_value("key_file", required=True))
        cc.finish()
    else:
        eks = node.child("eks", required=True)
        sts_ca = eks.path_value("sts_ca_file")
        cred = eks.check(
            lambda: EKSClusterCredentialConfig(
                region=eks.string("region", required=True),
                cluster_name=eks.string("cluster_name", required=True),
                role_arn=eks.string("role_arn", required=True),
                sts_endpoint=eks.string("sts_endpoint"),
                session_duration=eks.get("session_duration", int, default=3600),
                external_id=eks.string("external_id"),
                ca_bundle=str(sts_ca) if sts_ca else None,
            )
        )
        roles_node = eks.child("roles")
        if roles_node is not None:
            for role in list(roles_node.data):
                arn = roles_node.string(role, required=True)
                # Each named role must be as valid as the default one.
                roles_node.check(lambda: dataclasses.replace(cred, role_arn=arn), role)
                roles[str(role)] = arn
            roles_node.finish()
        eks.finish()
    node.finish()
    return cred, roles


def _cluster(node: Node) -> Cluster:
    name = node.string("name", required=True)
    endpoint = node.string("endpoint", required=True)
    url = urlsplit(endpoint)
    if url.scheme != "https" or not url.hostname:
        raise node.error("endpoint", f"must be an https:// URL, got {endpoint!r}")
    if url.path not in ("", "/") or url.query or url.username:
        raise node.error("endpoint", "must be scheme://host[:port] only (no path, query or credentials)")
    connect_text = node.string("connect")
    connect = _parse_host_port(node, "connect", connect_text, default_port=None) if connect_text else None
    ca_file = node.path_value("ca_file", required=True)
    credential, roles = _credential(node.child("credential", required=True))
    cluster = Cluster(
        name=name,
        endpoint=f"https://{url.netloc.lower()}",
        host=url.hostname.lower(),
        port=url.port or 443,
        ca_file=ca_file,
        credential=credential,
        upstream_roles=roles,
        connect=connect,
        impersonate=node.get("impersonate", bool, default=False),
    )
    node.finish()
    return cluster


def _identity_provider(node: Node) -> IssuerConfig:
    required = node.child("required_claims")
    required_claims: dict[str, str] = {}
    if required is not None:
        for key in list(required.data):
            required_claims[str(key)] = required.string(key, required=True)
        required.finish()
    ca_file = node.path_value("ca_file")
    algorithms = node.strings("algorithms")
    username_prefix = node.get("username_prefix", str)
    config = node.check(
        lambda: IssuerConfig(
            issuer_url=node.string("issuer", required=True),
            audiences=node.strings("client_ids", required=True),
            username_claim=node.string("username_claim", default="sub"),
            username_prefix=username_prefix,
            groups_claim=node.string("groups_claim", default="groups"),
            groups_prefix=node.get("groups_prefix", str, default=""),
            required_claims=required_claims,
            algorithms=algorithms or ("RS256",),
            ca_file=str(ca_file) if ca_file else None,
            discovery_url=node.string("discovery_url"),
        )
    )
    node.finish()
    return config


SECTIONS = ("clusters", "identity_providers", "access_rules", "notifications")


def _read_file(path: Path) -> CommentedMap:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(path, None, "", f"cannot read: {e}") from None
    try:
        data = YAML(typ="rt", pure=True).load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise PolicyError(path, line, "", f"invalid YAML: {e.problem or e.context}") from None
    except Exception as e:  # ruamel raises a few unmarked errors (duplicate keys, bad tags)
        raise PolicyError(path, None, "", f"invalid YAML: {e}") from None
    if data is None:
        return CommentedMap()
    if not isinstance(data, CommentedMap):
        raise PolicyError(path, 1, "", f"the top level must be a mapping, got {_yaml_kind(data)}")
    return data


def policy_files(path: Path | str) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise PolicyError(path, None, "", "no *.yaml policy files in this folder")
        return files
    if not path.is_file():
        raise PolicyError(path, None, "", "no such policy file or folder")
    return [path]


def load_policy(path: Path | str) -> Policy:
    clusters: list[Cluster] = []
    issuers: list[IssuerConfig] = []
    by_endpoint: dict[tuple[str, int], Cluster] = {}
    by_name: dict[str, Cluster] = {}
    seen_issuers: dict[str, str] = {}
    rule_nodes: list[Node] = []
    webhooks: list = []
    files = policy_files(path)
    for file in files:
        root = Node(_read_file(file), file, "")
        # Rules may name clusters from any file: read them once every cluster is known.
        rule_nodes.extend(root.children("access_rules"))
        webhooks.extend(parse_notifications(root.child("notifications")))
        for node in root.children("clusters"):
            cluster = _cluster(node)
            if cluster.name in by_name:
                raise node.error("name", f"cluster {cluster.name!r} is already defined")
            other = next((c for c in clusters if c.host == cluster.host), None)
            if other is not None:
                raise node.error("endpoint", f"endpoint host {cluster.host} is already used by cluster {other.name!r}")
            other = next((c for c in clusters if c.connect_address == cluster.connect_address), None)
            if other is not None:
                raise node.error("connect" if cluster.connect else "endpoint",
                                 f"address {':'.join(map(str, cluster.connect_address))} is already used by cluster {other.name!r}")
            by_name[cluster.name] = by_endpoint[(cluster.host, cluster.port)] = cluster
            clusters.append(cluster)
        for node in root.children("identity_providers"):
            issuer = _identity_provider(node)
            where = f"{file}:{node.line()}"
            if issuer.issuer_url in seen_issuers:
                raise node.error("issuer", f"issuer {issuer.issuer_url!r} is already defined at {seen_issuers[issuer.issuer_url]}")
            seen_issuers[issuer.issuer_url] = where
            issuers.append(issuer)
        for key in root.data:
            if key not in SECTIONS:
                raise root.error(key, f"unknown section {key!r} (known: {', '.join(SECTIONS)})")
    if not clusters:
        raise PolicyError(files[0], None, "clusters", "no cluster is defined in any policy file")
    if not issuers:
        raise PolicyError(files[0], None, "identity_providers", "no identity provider is defined in any policy file")
    from jitgate.access import parse_access_rules  # access imports this module's types

    rules = parse_access_rules(rule_nodes, by_name)
    return Policy(tuple(clusters), tuple(issuers), tuple(files), by_endpoint, by_name, rules, tuple(webhooks))


_cache_lock = threading.Lock()
_cache: dict[str, tuple[tuple, Policy]] = {}


def load_policy_cached(path: Path | str) -> Policy:
    """The same Policy object for unchanged files, so several addons share one parse."""
    key = str(Path(path).resolve())
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in policy_files(path))
    with _cache_lock:
        hit = _cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
    policy = load_policy(path)
    with _cache_lock:
        _cache[key] = (stamp, policy)
    return policy
