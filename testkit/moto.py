"""A real moto_server (STS and IAM) over TLS with our test CA, and the AWS calls it received.

moto_server serves with a given certificate (`-c/-k`), so clients verify it against the TestCA like
any other endpoint. Its request recorder (MOTO_ENABLE_RECORDING, written before a request is
handled) tells which STS/IAM calls arrived with which parameters, so a test can count AssumeRole
calls and read their RoleSessionName and SourceIdentity on the server's side. moto does not check
signatures, so requests need credentials of the right shape, not real ones.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import boto3

from testkit.net import TestCA, free_port, stop, wait_for_port

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
ACCOUNT_ID = "123456789012"  # moto's default account
# Credentials of the shape AWS issues for an IAM user; moto accepts any.
ADMIN_ACCESS_KEY_ID = "AKIAMOTOTESTADMIN000"
ADMIN_SECRET_ACCESS_KEY = "moto-test-admin-secret-not-a-real-one00"


def trust_policy(account_id: str = ACCOUNT_ID) -> str:
    """Trust the whole account to assume the role and to set a SourceIdentity while doing so."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                    "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
                }
            ],
        }
    )


@dataclass(frozen=True)
class RecordedCall:
    """One request moto received: its form parameters and its headers."""

    params: dict[str, str]
    headers: dict[str, str]

    @property
    def access_key_id(self) -> str | None:
        """The access key id the request was signed with (from its SigV4 Authorization header)."""
        match = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization", ""))
        return match.group(1) if match else None


@dataclass
class MotoServer:
    """One moto_server process serving STS and IAM at `endpoint_url`, trusted through `ca_bundle`."""

    proc: subprocess.Popen
    endpoint_url: str
    ca_bundle: str
    recording: Path
    log_path: Path
    region: str = "us-east-1"

    @classmethod
    def start(cls, directory: Path, ca: TestCA, env: dict[str, str] | None = None) -> MotoServer:
        """Start moto_server on a free port; `env` adds settings (e.g. INITIAL_NO_AUTH_ACTION_COUNT)."""
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cert, key = ca.issue(f"moto-{port}", hosts=["127.0.0.1", "localhost"])
        recording = directory / "moto-recording.jsonl"
        recording.touch()
        log_path = directory / "moto.log"
        env = {**os.environ, **(env or {})}
        env.update(MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=str(recording))
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port), "-c", str(cert), "-k", str(key)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            wait_for_port(port, proc)
        except Exception:
            stop(proc)
            raise
        return cls(proc, f"https://127.0.0.1:{port}", str(ca.cert_path), recording, log_path)

    def stop(self) -> None:
        stop(self.proc)

    def client(self, service: str, **credentials: str):
        """A boto3 client against this server (admin credentials unless others are given)."""
        credentials = credentials or {
            "aws_access_key_id": ADMIN_ACCESS_KEY_ID,
            "aws_secret_access_key": ADMIN_SECRET_ACCESS_KEY,
        }
        return boto3.client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            verify=self.ca_bundle,
            **credentials,
        )

    def create_role(self, name: str, max_session_duration: int = 3600) -> str:
        """Create an IAM role the account may assume (with SourceIdentity); returns its ARN."""
        role = self.client("iam").create_role(
            RoleName=name,
            AssumeRolePolicyDocument=trust_policy(),
            MaxSessionDuration=max_session_duration,
        )
        return role["Role"]["Arn"]

    def calls(self, action: str | None = None) -> list[RecordedCall]:
        """Every recorded query-protocol call (STS, IAM), oldest first, optionally of one Action."""
        calls = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            call = RecordedCall(dict(parse_qsl(body, keep_blank_values=True)), entry.get("headers", {}))
            if action is None or call.params.get("Action") == action:
                calls.append(call)
        return calls

    def assume_role_calls(self, role_arn: str | None = None) -> list[RecordedCall]:
        return [c for c in self.calls("AssumeRole") if role_arn is None or c.params.get("RoleArn") == role_arn]

    def reset_recording(self) -> None:
        """Forget the calls recorded so far (what moto's /moto-api/recorder/reset-recording does)."""
        self.recording.write_text("")
