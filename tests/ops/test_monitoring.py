"""`ops status`'s rows from the hosts' Prometheus (ops/monitoring.py): real Prometheus servers
scraping what each host's database exporter and proxy would export, reached directly (as `make
local` publishes them) and through a real sshd (as production's loopback-only ones are), the host
key pinned from the outputs."""

from __future__ import annotations

import getpass
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ops import checks, monitoring
from ops.checks import CRIT, OK, WARN
from tests.conftest import require_binary, stop_process
from tests.dns.conftest import free_port
from tests.monitoring.conftest import Prometheus

EAST, WEST = "us-east", "eu-west"
DECLARED = {"primary": EAST, "replicas": [WEST], "mode": "synchronous"}
RULES = {"groups": [{"name": "test", "rules": [
    {"alert": "TestCritical", "expr": "ciris_test_fire == 1", "labels": {"severity": "critical", "region": "{{ $labels.region }}"}},
]}]}


class Exporter:
    """What one host's exporters serve: exposition text the test changes as it goes."""

    def __init__(self) -> None:
        self.text = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.text.encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def primary(lag: float = 0.3, streaming: int = 1, sync: int = 1) -> str:
    return (f"ciris_pg_is_primary 1\nciris_pg_replicas_expected 1\nciris_pg_replicas_streaming {streaming}\n"
            f"ciris_pg_sync_standbys {sync}\n" + (f'ciris_pg_replication_lag_seconds{{member="eu_west"}} {lag}\n' if streaming else ""))


REPLICA = "ciris_pg_is_primary 0\n"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts, each a Prometheus scraping its exporter every second and evaluating RULES."""
    made = {}
    for name in (EAST, WEST):
        d = tmp_path_factory.mktemp(name)
        exporter = Exporter()
        (d / "rules.yml").write_text(yaml.safe_dump(RULES))
        (d / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(d / "rules.yml")],
            "scrape_configs": [{"job_name": "host", "static_configs": [{"targets": [exporter.address],
                                                                        "labels": {"region": name}}]}]}))
        port = free_port()
        prom = Prometheus("prometheus", [f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                                         f"--web.listen-address=127.0.0.1:{port}"], port, d / "prometheus.log")
        made[name] = (exporter, prom)
    yield made
    for exporter, prom in made.values():
        prom.stop()
        exporter.server.shutdown()


def direct(hosts) -> dict:
    return {"database": DECLARED, "monitoring": [{"host": name, "ipv4": "127.0.0.1", "prometheus": prom.url.split("//")[1]}
                                                 for name, (_, prom) in hosts.items()]}


def settle(hosts, east: str, west: str, outputs: dict, want, timeout: float = 20) -> list[checks.Row]:
    """Serve these metrics, then the rows once `want(rows)` holds (scrapes and rules take a second or two)."""
    hosts[EAST][0].text, hosts[WEST][0].text = east, west
    deadline = time.time() + timeout
    while True:
        rows = monitoring.rows(outputs)
        if want(rows) or time.time() > deadline:
            return rows
        time.sleep(0.5)


def by_check(rows: list[checks.Row]) -> dict[tuple[str, str], checks.Row]:
    return {(r.check, r.target): r for r in rows}


def test_rows_follow_what_each_hosts_prometheus_sees(hosts):
    outputs = direct(hosts)
    healthy = lambda rows: checks.worst(rows) == OK and any(r.check == "replication" for r in rows)  # noqa: E731
    rows = settle(hosts, primary(), REPLICA, outputs, healthy)
    assert checks.worst(rows) == OK, rows
    got = by_check(rows)
    assert got["database", "live"].detail == f"primary {EAST}"
    assert got["replication", f"from {EAST}"].detail == "1/1 replicas streaming, 1 synchronous; lag eu_west 0.3 s"
    assert got["alerts", f"{WEST}'s Prometheus"].detail == "none firing"

    # Lag over the alert's 10 s: a warning; the replica gone: critical (synchronous mode has no standby).
    rows = settle(hosts, primary(lag=42), REPLICA, outputs, lambda r: checks.worst(r) == WARN)
    assert by_check(rows)["replication", f"from {EAST}"].verdict == WARN, rows
    rows = settle(hosts, primary(streaming=0, sync=0), REPLICA, outputs,
                  lambda r: by_check(r).get(("replication", f"from {EAST}"), r[0]).verdict == CRIT)
    assert by_check(rows)["replication", f"from {EAST}"].detail.startswith("0/1 replicas streaming"), rows

    # The leader moved (a failover): a warning naming both; two leaders: critical.
    rows = settle(hosts, REPLICA, primary(), outputs, lambda r: checks.worst(r) == WARN)
    assert by_check(rows)["database", "live"].detail == f"primary {WEST} (declared: {EAST}; pulumi up moves it back)"
    rows = settle(hosts, primary(), primary(), outputs, lambda r: by_check(r)["database", "live"].verdict == CRIT)
    assert by_check(rows)["database", "live"].detail == f"more than one primary: {EAST}, {WEST}"

    # A firing alert is its severity, named with its region; a proxy standing in is a warning.
    rows = settle(hosts, primary() + "ciris_test_fire 1\n", REPLICA + "ciris_proxy_standin_active 1\n", outputs,
                  lambda r: {x.check for x in r if x.verdict != OK} == {"alerts", "stand-in"})
    got = by_check(rows)
    assert got["alerts", f"{EAST}'s Prometheus"].detail == f"1 firing: TestCritical({EAST})", rows
    assert got["stand-in", f"{WEST} proxy"].verdict == WARN


def test_a_host_whose_prometheus_is_gone_is_a_warning_and_the_rest_still_answers(hosts):
    outputs = direct(hosts)
    settle(hosts, primary(), REPLICA, outputs, lambda r: checks.worst(r) == OK)
    outputs["monitoring"].append({"host": "witness", "ipv4": "127.0.0.1", "prometheus": f"127.0.0.1:{free_port()}"})
    got = by_check(monitoring.rows(outputs))
    assert got["alerts", "witness's Prometheus"].verdict == WARN
    assert got["alerts", "witness's Prometheus"].detail.startswith("unreachable (URLError")
    assert got["database", "live"].verdict == OK


def test_production_hosts_are_reached_through_ssh_with_their_pinned_key(hosts, sshd):
    port, host_key, identity = sshd
    (_, east), (_, west) = hosts[EAST], hosts[WEST]
    settle(hosts, primary(), REPLICA, direct(hosts), lambda r: checks.worst(r) == OK)
    ssh = {"user": getpass.getuser(), "port": port, "host_key": host_key}
    outputs = {"database": DECLARED, "monitoring": [
        {"host": EAST, "ipv4": "127.0.0.1", "prometheus": east.url.split("//")[1], "ssh": ssh},
        {"host": WEST, "ipv4": "127.0.0.1", "prometheus": west.url.split("//")[1], "ssh": ssh}]}
    rows = monitoring.rows(outputs, identity)
    assert checks.worst(rows) == OK, rows
    assert by_check(rows)["database", "live"].detail == f"primary {EAST}"

    # Another key than the outputs pin: no tunnel, and ssh's own reason.
    other = {**ssh, "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPU/+6BWuZJm0j8ttiTuDSHmj9RskqpHfmrH1CG6NQAY"}
    got = by_check(monitoring.rows({"monitoring": [{**outputs["monitoring"][0], "ssh": other}]}, identity))
    row = got["alerts", f"{EAST}'s Prometheus"]
    assert row.verdict == WARN and "Host key verification failed" in row.detail, row
    # No usable key: refused, said, and nothing waits on a password prompt.
    row = by_check(monitoring.rows({"monitoring": [outputs["monitoring"][0]]}, str(Path(identity).with_name("host"))))
    assert "Permission denied" in row["alerts", f"{EAST}'s Prometheus"].detail
