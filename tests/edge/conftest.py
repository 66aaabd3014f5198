"""A real Caddy (Debian package) running the rendered Caddyfile on loopback ports, with an internal
CA standing in for Let's Encrypt (a root and a long-lived intermediate, as `make local` ships them,
so the certificates last 90 days as public ones do). Shared by the edge tests and the monitoring tests, which
probe billing and the proxy through it (and kill it to take a region off the air)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import datetime as dt
import time
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from components import edge
from tests.conftest import require_binary, stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca(directory: Path) -> None:
    """root.crt/key and intermediate.crt/key in `directory` (what components.bridge.local_edge_ca makes)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    issuer_name, issuer_key = None, None
    for kind in ("root", "intermediate"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test edge {kind}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(issuer_key or key, hashes.SHA256()))
        (directory / f"{kind}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{kind}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        issuer_name, issuer_key = name, key


class Edge:
    """`caddy run` of the rendered Caddyfile for `sites`; its state (the internal CA and the
    certificates) stays in `tmp` across restarts."""

    def __init__(self, tmp: Path, sites: Sequence[edge.Site]):
        self.tmp, self.sites = tmp, list(sites)
        self.https_port, self.http_port = free_port(), free_port()
        self.log = tmp / "access.log"
        self.caddyfile = tmp / "Caddyfile"
        make_ca(tmp / "ca")
        self.caddyfile.write_text(edge.render_caddyfile(self.sites, tls="internal", https_port=self.https_port,
                                                        http_port=self.http_port, ca_dir=str(tmp / "ca")))
        self.proc: subprocess.Popen | None = None
        self._ctx = None

    @property
    def root_ca(self) -> Path:
        return self.tmp / "ca" / "root.crt"

    @property
    def ctx(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = ssl.create_default_context(cafile=str(self.root_ca))
        return self._ctx

    def start(self, timeout: float = 30) -> None:
        """Until the first site answers over TLS (any status: what is behind it is not the edge)."""
        env = {**os.environ, "HOME": str(self.tmp), "XDG_DATA_HOME": str(self.tmp / "data"),
               "XDG_CONFIG_HOME": str(self.tmp / "config")}
        with open(self.log, "ab") as out, open(self.tmp / "caddy.err", "ab") as err:
            self.proc = subprocess.Popen([require_binary("caddy"), "run", "--config", str(self.caddyfile),
                                          "--adapter", "caddyfile"], env=env, stdout=out, stderr=err)
        deadline = time.time() + timeout
        while True:
            try:
                self.request(self.sites[0].host, "/health")
                return
            except (OSError, ssl.SSLError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"caddy did not come up: {(self.tmp / 'caddy.err').read_text()[-2000:]}")
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: the edge vanishes as a crashed host's would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, 10)

    def request(self, host: str, path: str, method: str = "GET", body: bytes | None = None, headers=None):
        conn = http.client.HTTPSConnection(host, self.https_port, context=self.ctx, timeout=10)
        conn.sock = self.ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.https_port), timeout=10), server_hostname=host)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp, data
