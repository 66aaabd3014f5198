"""`make local`'s object storage: moto's S3 behind Caddy's TLS on an address of this machine.

pgBackRest speaks only HTTPS to S3, and the backup job and WAL archiving run inside the stack's
containers, so the endpoint is an address they reach (`ADDRESS`, on the loopback like the
regions') with a certificate from a CA made here; the stack config names that CA
(`backup.ca_cert`). moto keeps its objects in memory: they last until `make local-down`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import boto3

from components import mock_tls

ADDRESS = "10.77.0.1"
PORT = 9000
REGION = "us-east-1"
ENDPOINT = f"https://{ADDRESS}:{PORT}"


def bucket(encryption_key: str) -> str:
    """A bucket per backup encryption key: what one key encrypted never meets a stack with another
    (a new checkout, or local/secrets.json made again), which could not read it. Not per access key:
    those rotate under the same bucket (docs/runbook-secrets.md)."""
    return "ciris-local-" + hashlib.sha256(encryption_key.encode()).hexdigest()[:12]


def certificates(root: Path) -> tuple[str, Path, Path]:
    """(CA PEM, server cert file, server key file), made once from fixed names (deterministic)."""
    ecdsa = {"algorithm": "ECDSA", "ecdsaCurve": "P256"}
    ca_key = mock_tls.private_key("local-s3-ca", ecdsa)["privateKeyPem"]
    ca = mock_tls.self_signed_cert("local-s3-ca", {
        "privateKeyPem": ca_key, "subject": {"commonName": "ciris-bridge local S3 CA"}, "isCaCertificate": True,
        "validityPeriodHours": 24 * 365 * 10, "allowedUses": ["cert_signing"]})["certPem"]
    key = mock_tls.private_key("local-s3", ecdsa)["privateKeyPem"]
    # The address as a DNS name too: pgBackRest matches the endpoint against DNS names only.
    csr = mock_tls.cert_request({"privateKeyPem": key, "subject": {"commonName": ADDRESS},
                                 "ipAddresses": [ADDRESS], "dnsNames": [ADDRESS]})["certRequestPem"]
    cert = mock_tls.locally_signed_cert("local-s3", {
        "certRequestPem": csr, "caCertPem": ca, "caPrivateKeyPem": ca_key,
        "validityPeriodHours": 24 * 365 * 10, "allowedUses": ["server_auth"]})["certPem"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "server.crt").write_text(cert)
    (root / "server.key").write_text(key)
    (root / "server.key").chmod(0o600)
    return ca, root / "server.crt", root / "server.key"


def daemon_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def start_daemon(root: Path, name: str, argv: list[str], env: dict | None = None) -> None:
    """Start `argv` in its own session, logging to root/<name>.log, unless it runs already."""
    pidfile = root / f"{name}.pid"
    if daemon_alive(pidfile):
        return
    with open(root / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pidfile.write_text(str(proc.pid))


def stop_daemon(root: Path, name: str) -> None:
    pidfile = root / f"{name}.pid"
    if daemon_alive(pidfile):
        os.killpg(int(pidfile.read_text()), signal.SIGTERM)
    pidfile.unlink(missing_ok=True)


def up(root: Path, moto_server: str, caddy: str, access_key: str, secret_key: str, encryption_key: str) -> str:
    """Start (or keep) the endpoint and the keys' bucket; returns the CA PEM the stack must trust."""
    ca, cert, key = certificates(root)
    backend = PORT + 1
    start_daemon(root, "moto", [moto_server, "-H", "127.0.0.1", "-p", str(backend)])
    caddyfile = root / "Caddyfile"
    caddyfile.write_text(
        f"{{\n  admin off\n  auto_https off\n  default_sni {ADDRESS}\n}}\n"
        f"https://{ADDRESS}:{PORT} {{\n  tls {cert} {key}\n  reverse_proxy 127.0.0.1:{backend}\n}}\n")
    start_daemon(root, "caddy", [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
           env={**os.environ, "XDG_DATA_HOME": str(root / "caddy-data"), "XDG_CONFIG_HOME": str(root / "caddy-config")})
    ca_file = root / "ca.crt"
    ca_file.write_text(ca)
    s3 = boto3.client("s3", endpoint_url=ENDPOINT, verify=str(ca_file), region_name=REGION,
                      aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    deadline = time.time() + 30
    while True:
        try:
            name = bucket(encryption_key)
            if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket=name)
            return ca
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def down(root: Path) -> None:
    for name in ("caddy", "moto"):
        stop_daemon(root, name)
