"""A real PowerDNS Authoritative server on loopback, configured by the project's renderer."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import dns, dnssec
from tests.conftest import REPO, require_binary

SYNC = REPO / "payloads" / "dns" / "pdns_sync.py"
API_KEY = "test-api-key-CANARY-4417"


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, health_interval: int = 1, address: str = "127.0.0.1", port: int | None = None):
        self.tmp, self.address = tmp, address
        self.port = port or free_port()
        self.api_port = free_port()
        (tmp / "data").mkdir()
        (tmp / "pdns.conf").write_text(
            dns.pdns_conf(
                api_key=API_KEY,
                data_dir=str(tmp / "data"),
                listen=(address,),
                port=self.port,
                api_port=self.api_port,
                health_interval=health_interval,
                run_as=None,
            )
        )
        self.log = tmp / "pdns.log"
        self.start()

    def start(self) -> None:
        """Also after a kill: the same config, port and data (the zones loaded before are kept)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [require_binary("pdns_server"), f"--config-dir={self.tmp}", f"--socket-dir={self.tmp}", "--daemon=no",
                 "--guardian=no", "--disable-syslog", "--write-pid=no"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def sync(self, zones: list[dns.RenderedZone], keys: dict[str, list[dnssec.SigningKey]] | None = None) -> dict:
        """Through the production code path: the sync script, fed on stdin (with the signed zones' keys)."""
        request = {"api_url": self.api_url, "api_key": API_KEY, "wait": 30,
                   "zones": dnssec.with_keys([z.as_dict() for z in zones], keys or {})}
        result = subprocess.run([sys.executable, str(SYNC)], input=json.dumps(request), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert API_KEY not in result.stdout + result.stderr
        for key in (k for ks in (keys or {}).values() for k in ks):
            assert key.private.splitlines()[-1] not in result.stdout + result.stderr
        return json.loads(result.stdout)

    def kill(self) -> None:
        """SIGKILL: the nameserver vanishes as a crashed host's would."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def pdns(tmp_path):
    server = Server(tmp_path)
    yield server
    server.stop()
    assert API_KEY not in server.log.read_text()
