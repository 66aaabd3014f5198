"""The rendered Caddyfile in a real `caddy` (Debian package), with Caddy's internal CA standing in
for Let's Encrypt and two local HTTP servers standing in for billing and the proxy."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components import edge
from tests.conftest import require_binary
from tests.edge.conftest import Edge

DOMAIN = "ciris-services-1.ai"
CANARY_BODY = "CANARY-prompt-text-6b1f"
CANARY_PROVIDER_KEY = "sk-CANARY-provider-key-77"
CANARY_TOKEN = "CANARY-bearer-token-0c9e"
# Extra names (regions[].names, ADR 19), in this domain and in others, as the released agent has them.
NAMES = {"billing": ["billing1.ciris-services-2.ai"], "proxy": [f"llm01.{DOMAIN}", "llm01.ciris-services-eu-1.com"]}


class Upstream:
    """A stand-in service that records what reaches it."""

    def __init__(self, name: str):
        self.name = name
        self.seen: list[tuple[str, str, bytes]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream.seen.append((self.command, self.path, body))
                payload = json.dumps({"upstream": upstream.name, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def running_edge(tmp_path_factory):
    billing, proxy = Upstream("billing"), Upstream("proxy")
    e = Edge(tmp_path_factory.mktemp("edge"), edge.sites(DOMAIN, f"127.0.0.1:{billing.port}", f"127.0.0.1:{proxy.port}", NAMES))
    e.start()
    billing.seen.clear()
    yield e, billing, proxy
    e.stop()


def test_routes_each_host_to_its_service_with_hsts(running_edge):
    e, billing, proxy = running_edge
    resp, data = e.request(f"billing1.{DOMAIN}", "/health")
    assert resp.status == 200 and json.loads(data) == {"upstream": "billing", "path": "/health"}
    assert resp.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"
    assert resp.getheader("Server") is None
    resp, data = e.request(f"proxy1.{DOMAIN}", "/v1/models")
    assert resp.status == 200 and json.loads(data)["upstream"] == "proxy"
    resp, data = e.request(f"proxy1.{DOMAIN}", "/ready")  # readiness, probed by every region's monitoring
    assert resp.status == 200 and json.loads(data) == {"upstream": "proxy", "path": "/ready"}
    assert e.request(f"billing1.{DOMAIN}", "/ready")[0].status == 404  # billing's readiness is its /health
    resp, data = e.request(f"billing1.{DOMAIN}", "/v1/credits/u1")
    assert json.loads(data) == {"upstream": "billing", "path": "/v1/credits/u1"}
    resp, data = e.request(f"billing1.{DOMAIN}", "/.well-known/jwks.json")  # billing's token keys (ADR 21)
    assert json.loads(data) == {"upstream": "billing", "path": "/.well-known/jwks.json"}


@pytest.mark.parametrize("service,host", [(service, host) for service, hosts in NAMES.items() for host in hosts])
def test_an_extra_name_reaches_its_service(running_edge, service, host):
    """The name as SNI and Host: its own certificate, the same site as the default name."""
    e, billing, proxy = running_edge
    deadline = time.time() + 15  # the site's other certificates are issued beside the first one's
    while True:
        try:
            resp, data = e.request(host, "/health")
            break
        except (OSError, ssl.SSLError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    assert resp.status == 200 and json.loads(data) == {"upstream": service, "path": "/health"}
    assert resp.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"
    assert e.request(host, "/metrics")[0].status == 404


def test_a_name_not_configured_gets_no_certificate(running_edge):
    e, billing, proxy = running_edge
    before = len(billing.seen) + len(proxy.seen)
    with pytest.raises((OSError, ssl.SSLError)):
        e.request(f"llm02.{DOMAIN}", "/health")
    assert len(billing.seen) + len(proxy.seen) == before


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/metrics/", "/METRICS", "/v1/../metrics", "/health/../metrics", "/v1/%2e%2e/metrics", "//metrics", "/", "/admin", "/docs", "/key/generate"],
)
@pytest.mark.parametrize("host", ["billing1", "proxy1"])
def test_internal_paths_are_never_routed(running_edge, host, path):
    e, billing, proxy = running_edge
    before = len(billing.seen) + len(proxy.seen)
    resp, _ = e.request(f"{host}.{DOMAIN}", path)
    reached = (billing.seen + proxy.seen)[before:]
    assert resp.status == 404 or not any("metrics" in p.lower() for _, p, _ in reached)
    assert all(not p.lower().rstrip("/").endswith("metrics") for _, p, _ in billing.seen + proxy.seen)
    if path in ("/metrics", "/", "/admin", "/docs", "/key/generate"):
        assert resp.status == 404 and not reached


def test_access_log_has_no_bodies_and_no_credentials(running_edge):
    e, billing, proxy = running_edge
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": CANARY_BODY}]}).encode()
    resp, _ = e.request(
        f"proxy1.{DOMAIN}",
        "/v1/chat/completions",
        method="POST",
        body=body,
        headers={"Authorization": f"Bearer {CANARY_TOKEN}", "X-Provider-Key": CANARY_PROVIDER_KEY,
                 "Content-Type": "application/json"},
    )
    assert resp.status == 200
    assert proxy.seen[-1][1] == "/v1/chat/completions"
    assert proxy.seen[-1][2] == body  # the body did go through
    time.sleep(0.5)  # let caddy flush the log line
    log = e.log.read_text()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(x.get("request", {}).get("uri") == "/v1/chat/completions" for x in entries)
    assert CANARY_BODY not in log and CANARY_TOKEN not in log and CANARY_PROVIDER_KEY not in log


def test_bodies_over_the_limit_never_reach_the_service(running_edge):
    e, billing, proxy = running_edge
    before = len(proxy.seen)
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (600 * 1024) + b'"}]}'
    try:
        resp, _ = e.request(f"proxy1.{DOMAIN}", "/v1/chat/completions", method="POST", body=big,
                            headers={"Content-Type": "application/json"})
        assert resp.status == 413
    except (ConnectionError, ssl.SSLError):
        pass  # Caddy may close the connection while the body is still being sent
    assert all(len(body or b"") < 600 * 1024 for _, _, body in proxy.seen[before:])
    resp, _ = e.request(f"billing1.{DOMAIN}", "/v1/credits/consume", method="POST", body=b"{" + b" " * 70_000 + b"}",
                        headers={"Content-Type": "application/json"})
    assert resp.status == 413


def test_port_80_stays_closed(running_edge):
    e, _, _ = running_edge
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", e.http_port), timeout=2).close()


def test_production_caddyfile_uses_tls_alpn_only():
    caddy = require_binary("caddy")
    text = edge.render_caddyfile(edge.sites(DOMAIN, names=NAMES), acme_email="ops@ciris.ai")
    result = subprocess.run([caddy, "adapt", "--adapter", "caddyfile", "--config", "/dev/stdin"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    policies = cfg["apps"]["tls"]["automation"]["policies"]
    issuers = [i for p in policies for i in p.get("issuers", [])]
    assert issuers and all(i["module"] == "acme" and i["challenges"]["http"]["disabled"] for i in issuers)
    assert all(i["email"] == "ops@ciris.ai" for i in issuers)
    # Every name, the extra ones too, gets its certificate the same way (TLS-ALPN at this edge).
    names = {f"billing1.{DOMAIN}", f"proxy1.{DOMAIN}", *NAMES["billing"], *NAMES["proxy"]}
    assert {s for p in policies for s in p.get("subjects", [])} == names
    assert all(p.get("issuers") for p in policies if p.get("subjects"))
    server = next(iter(cfg["apps"]["http"]["servers"].values()))
    assert server["listen"] == [":443"]
    assert server["automatic_https"]["disable_redirects"] is True
    assert "admin" in cfg and cfg["admin"]["disabled"] is True
