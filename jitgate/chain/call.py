"""What the gateway knows about one API call, shared by every step of the chain.

Each step adds its finding (cluster, identity, request attributes, decision) to one `Call`, so a
later step sees an earlier one's decision: audit records denials too. The `Call` holds live policy
objects and stays with the gateway (jitgate.chain.flow keeps it beside the flow); what goes on
`flow.metadata["jitgate"]` is `Call.record()`, plain JSON-able values only, so flow files written
with `-w` keep it and mitmweb shows it on each flow.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from jitgate.access.model import Grant
from jitgate.identity.oidc import Identity
from jitgate.kube.request_info import RequestInfo
from jitgate.policy.clusters import Cluster

ALLOW = "allow"
DENY = "deny"


@dataclass(slots=True)
class Call:
    audit_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    received: float = field(default_factory=time.time)
    cluster: Cluster | None = None
    identity: Identity | None = None
    info: RequestInfo | None = None
    grant: Grant | None = None  # the grant that allowed the call
    decision: str = ""  # "" until a step decides; ALLOW or DENY after
    reason: str = ""  # why, in words an operator reads in the audit log
    long_running: bool = False  # watch, log follow, exec: audited at start and at end
    credential_sent: bool = False  # the gateway's cluster credential is on the request: scrub it
    started_audited: bool = False
    completed_audited: bool = False
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def denied(self) -> bool:
        return self.decision == DENY

    def deny(self, reason: str) -> None:
        self.decision = DENY
        self.reason = reason

    def allow(self, reason: str) -> None:
        if self.decision != DENY:  # an allow never overrides an earlier deny
            self.decision = ALLOW
            self.reason = reason

    def record(self) -> dict:
        """The plain per-call record: what mitmweb users see on a flow and recordings keep."""
        record: dict = {"auditID": self.audit_id, "decision": self.decision or "none"}
        if self.reason:
            record["reason"] = self.reason
        if self.cluster is not None:
            record["cluster"] = self.cluster.name
        if self.identity is not None:
            record["user"] = {"username": self.identity.username, "groups": list(self.identity.groups)}
        info = self.info
        if info is not None:
            request = {"verb": info.verb, "path": info.path}
            for key, value in (("apiGroup", info.api_group), ("apiVersion", info.api_version),
                               ("namespace", info.namespace), ("resource", info.resource),
                               ("subresource", info.subresource), ("name", info.name)):
                if value:
                    request[key] = value
            if info.exec is not None and info.exec.command:
                request["command"] = list(info.exec.command)
            record["request"] = request
        if self.grant is not None:
            record["grant"] = self.grant.id
            record["accessRequest"] = self.grant.request_id
            record["rule"] = self.grant.rule
        if self.long_running:
            record["longRunning"] = True
        if self.annotations:
            record["annotations"] = dict(self.annotations)
        return record
