"""The monitoring stack as real processes on loopback: Prometheus, the blackbox exporter and
Alertmanager (Debian's packages) with the rendered config, and a local webhook receiver that
records what Alertmanager posts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from tests.conftest import require_binary, stop_process, wait_until_healthy


def seconds(duration: str) -> int:
    """A Prometheus/Alertmanager duration ("90s", "2m", "4h") in seconds."""
    n, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(n) * {"s": 1, "m": 60, "h": 3600}[unit]


class Daemon:
    """One of the monitoring binaries on loopback, logging to a file, ready once `ready_path`
    answers 200."""

    def __init__(self, binary: str, args: list[str], port: int, log: Path, ready_path: str = "/-/ready",
                 env: dict[str, str] | None = None):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([require_binary(binary), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        try:
            wait_until_healthy(self.url, self.proc, log, binary, timeout=60, path=ready_path)
        except BaseException:
            self.stop()
            raise

    def get(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        stop_process(self.proc)


class Prometheus(Daemon):
    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["data"]["result"]

    def alerts(self) -> list[dict]:
        """Every pending or firing alert, with its state."""
        return self.get("/api/v1/alerts")["data"]["alerts"]


class Webhook:
    """Alertmanager's webhook receiver: records each notification (arrival time, body) posted to its
    secret path; anything else is 404."""

    def __init__(self, token: str):
        self.path = f"/hook/{token}"
        self.received: list[tuple[float, dict]] = []
        self.raw: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                if self.path != outer.path:
                    self.send_response(404)
                else:
                    outer.raw.append(body)
                    outer.received.append((time.time(), json.loads(body)))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def on_loopback(prometheus_yml: str, edges: dict[str, int], nameservers: dict[str, int]) -> str:
    """A vantage point's rendered config with its probes sent to this machine: the production targets
    are names that do not resolve here (https://billing1.<domain>/health, ns1.<domain>:53). Each
    health URL goes to its region's edge on loopback with the name as the probe's `hostname` (the
    blackbox exporter sends it as Host and SNI), each zone's SOA query to its region's nameserver
    port; the `instance` label stays the production target, so alerts read as they would there."""
    doc = yaml.safe_load(prometheus_yml)
    for job in doc["scrape_configs"]:
        probe = job["job_name"] == "health" or job["job_name"].startswith("dns_soa_")
        if not probe:
            continue
        for sc in job["static_configs"]:
            (target,) = sc["targets"]
            region = sc["labels"]["region"]
            sc["labels"]["__production_target"] = target
            if job["job_name"] == "health":
                url = urlsplit(target)
                sc["labels"]["__param_hostname"] = url.hostname
                sc["targets"] = [url._replace(netloc=f"127.0.0.1:{edges[region]}").geturl()]
            else:
                sc["targets"] = [f"127.0.0.1:{nameservers[region]}"]
        job["relabel_configs"].append({"source_labels": ["__production_target"], "target_label": "instance"})
    return yaml.safe_dump(doc, sort_keys=False)
