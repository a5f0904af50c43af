"""What the gateway knows about one API call, shared by every step of the chain.

Each addon adds its finding (cluster, identity, request attributes, decision) to one `Call` kept on
`flow.metadata`, so a later step sees an earlier one's decision: audit records denials too.
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
