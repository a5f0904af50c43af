"""Policy files: YAML (ruamel.yaml) describing clusters, identity providers, access rules and notifications.

A policy is one YAML file or a directory of them (`*.yaml`, `*.yml`, read in name order and merged
section by section). Every mistake is reported as `file:line: field: what is wrong`, and unknown
keys are mistakes too: a typo in a security policy must stop the gateway, not be ignored.

Each section's shape is declared once, beside its parser (`jitgate.policy.schema`); `POLICY` puts
them together, and the JSON Schema for editors and the README's reference tables come from it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError

from jitgate.identity.oidc import IssuerConfig
from jitgate.policy.access_rules import ACCESS_RULE, parse_access_rules
from jitgate.policy.clusters import CLUSTER, Cluster, parse_cluster
from jitgate.policy.document import Node, PolicyError, yaml_kind
from jitgate.policy.guardrails import GUARDRAIL, GuardrailIndex, parse_guardrails
from jitgate.policy.identity_providers import IDENTITY_PROVIDER, parse_identity_provider
from jitgate.policy.masking import MASKING, MaskingPolicy, parse_masking
from jitgate.policy.notifications import NOTIFICATIONS, parse_notifications
from jitgate.policy.schema import Field, ListOf, Section, json_schema_text, markdown_reference
from jitgate.policy.sessions import SESSIONS, SessionsPolicy, parse_sessions

if TYPE_CHECKING:
    from jitgate.access.rules import AccessRule
    from jitgate.notify.webhooks import Webhook



@dataclass(frozen=True)
class Policy:
    clusters: tuple[Cluster, ...]
    identity_providers: tuple[IssuerConfig, ...]
    sources: tuple[Path, ...]
    by_endpoint: dict[tuple[str, int], Cluster] = field(repr=False)
    by_name: dict[str, Cluster] = field(repr=False)
    access_rules: tuple["AccessRule", ...] = ()
    webhooks: tuple["Webhook", ...] = ()
    masking: MaskingPolicy = MaskingPolicy()
    guardrails: GuardrailIndex = field(default_factory=GuardrailIndex, repr=False)
    sessions: SessionsPolicy = SessionsPolicy()

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



# The top level of a policy file. A policy may be split across files, so no section is required
# in any one file; the loader checks that some file defines clusters and identity providers.
POLICY = Section(
    "policy",
    "A jitgate policy file. A policy is one file or a folder of `*.yaml`/`*.yml` files read in name order and "
    "merged section by section; relative paths are relative to the file that names them.",
    (
        Field("clusters", ListOf(CLUSTER), "Clusters behind the gateway."),
        Field("identity_providers", ListOf(IDENTITY_PROVIDER), "OIDC issuers whose ID tokens the gateway accepts."),
        Field("access_rules", ListOf(ACCESS_RULE), "What may be requested, by whom, for how long, and who decides."),
        Field("notifications", NOTIFICATIONS, "Webhooks told about access requests and decisions."),
        Field("masking", MASKING, "Detectors of secret values in responses, besides Secrets' own values."),
        Field("guardrails", ListOf(GUARDRAIL), "What nobody does without a second look, whatever their grant."),
        Field("sessions", SESSIONS, "Who sees which recorded session through the access API."),
    ),
)
# `mcp:` belongs to the MCP front (jitgate.policy.mcp, its own file); skipped here, so it may sit in policies/.
SECTIONS = POLICY.keys + ("mcp",)


def policy_json_schema() -> str:
    """The JSON Schema of a policy file, as committed in docs/policy.schema.json."""
    return json_schema_text(POLICY, "jitgate policy")


def policy_reference() -> str:
    """The README's reference tables of every section."""
    return markdown_reference(POLICY)


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
        raise PolicyError(path, 1, "", f"the top level must be a mapping, got {yaml_kind(data)}")
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
    guardrail_nodes: list[Node] = []
    masking: MaskingPolicy | None = None
    sessions: SessionsPolicy | None = None
    files = policy_files(path)
    for file in files:
        root = Node(_read_file(file), file, "")
        # Rules may name clusters from any file: read them once every cluster is known.
        rule_nodes.extend(root.children("access_rules"))
        webhooks.extend(parse_notifications(root.child("notifications")))
        if root.child("masking") is not None:
            if masking is not None:
                raise root.error("masking", "the masking section is already defined in an earlier file")
            masking = parse_masking(root.child("masking"))
        if root.child("sessions") is not None:
            if sessions is not None:
                raise root.error("sessions", "the sessions section is already defined in an earlier file")
            sessions = parse_sessions(root.child("sessions"))
        guardrail_nodes.extend(root.children("guardrails"))
        for node in root.children("clusters"):
            cluster = parse_cluster(node)
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
            issuer = parse_identity_provider(node)
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
    rules = parse_access_rules(rule_nodes, by_name)
    return Policy(tuple(clusters), tuple(issuers), tuple(files), by_endpoint, by_name, rules, tuple(webhooks),
                  guardrails=parse_guardrails(guardrail_nodes), masking=masking or MaskingPolicy(),
                  sessions=sessions or SessionsPolicy())


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
