"""A real Caddy (Debian package) running the rendered Caddyfile on loopback ports, with Caddy's
internal CA standing in for Let's Encrypt. Shared by the edge tests and the monitoring tests, which
probe billing and the proxy through it (and kill it to take a region off the air)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Sequence

from components import edge
from tests.conftest import require_binary, stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Edge:
    """`caddy run` of the rendered Caddyfile for `sites`; its state (the internal CA and the
    certificates) stays in `tmp` across restarts."""

    def __init__(self, tmp: Path, sites: Sequence[edge.Site]):
        self.tmp, self.sites = tmp, list(sites)
        self.https_port, self.http_port = free_port(), free_port()
        self.log = tmp / "access.log"
        self.caddyfile = tmp / "Caddyfile"
        self.caddyfile.write_text(edge.render_caddyfile(self.sites, tls="internal", https_port=self.https_port,
                                                        http_port=self.http_port))
        self.proc: subprocess.Popen | None = None
        self._ctx = None

    @property
    def root_ca(self) -> Path:
        return self.tmp / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

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
