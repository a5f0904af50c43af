"""Ports, a throwaway test CA and waiting for processes: shared by every process-starting fixture."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


# Ports free_port handed out, each still bound by this process until the server meant for it listens.
_reserved: dict[int, tuple[socket.socket, float]] = {}
_reserved_lock = threading.Lock()
RESERVATION_SECONDS = 120.0  # longer than any server here takes to start; wait_for_port ends it sooner


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, reserved for the server about to listen there.

    Picking a port and letting it go races: a gateway takes seconds to bind it, and meanwhile another
    pick (this process's, another pytest worker's) or an outgoing connection can take it; the server
    then fails to listen while a probe meets someone else's listener. So the port stays bound here
    (SO_REUSEADDR, never listening). On Linux that keeps every other bind and every ephemeral port
    off it, while a server that sets SO_REUSEADDR itself, as asyncio, werkzeug, uvicorn, http.server,
    aiohttp, nginx, node and Go all do, still binds and listens. `wait_for_port` ends the reservation
    once the port answers; one never waited for (a port meant to stay closed) ends after two minutes."""
    now = time.monotonic()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    with _reserved_lock:
        for old in [p for p, (_, since) in _reserved.items() if now - since > RESERVATION_SECONDS]:
            _reserved.pop(old)[0].close()
        _reserved[port] = (s, now)
    return port


def release_port(port: int) -> None:
    """End free_port's reservation of `port` (nothing if it holds none)."""
    with _reserved_lock:
        held = _reserved.pop(port, None)
    if held is not None:
        held[0].close()


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Until something listens on 127.0.0.1:`port` (and `proc` is still running); then, or on failure,
    free_port's reservation of the port ends."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
    finally:
        release_port(port)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a process this test run started (by its handle, never by name)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass(frozen=True)
class TestCA:
    """A CA made for one test session, and helpers to issue server/client certificates from it."""

    __test__ = False  # not a test class, despite the name

    directory: Path
    cert_path: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path, name: str = "jitgate test CA") -> "TestCA":
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            # Python 3.13's default context verifies strictly: SKI on the CA, AKI on leaves.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_path = directory / "ca.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert_path, key, cert)

    def issue(self, name: str, hosts: list[str] = (), client: bool = False) -> tuple[Path, Path]:
        """Issue a leaf certificate; returns (cert_path, key_path). `hosts` become SANs (DNS or IP)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cert_path, key_path
