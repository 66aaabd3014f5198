"""`python -m ops status`: its DNS checks against real PowerDNS servers (answers, serials that
disagree, a dead nameserver), its verdicts and exit codes, and the ways its outputs can be missing.
Against the running local stack it is exercised in tests/e2e (healthy, then a region's edge and
nameserver stopped)."""

from __future__ import annotations

import json
import socket

import pytest

from ops import checks, outputs
from ops.__main__ import main
from tests.dns.conftest import Server
from tests.dns.test_pdns import ADDRS, render


def free_port_on(*addresses: str) -> int:
    while True:
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for a in addresses[1:]:
                with socket.socket() as s, socket.socket(type=socket.SOCK_DGRAM) as u:
                    s.bind((a, port))
                    u.bind((a, port))
            return port
        except OSError:
            continue


@pytest.fixture
def two_nameservers(tmp_path):
    port = free_port_on("127.0.0.2", "127.0.0.3")
    servers = []
    for i, address in enumerate(("127.0.0.2", "127.0.0.3")):
        (tmp_path / str(i)).mkdir()
        servers.append(Server(tmp_path / str(i), address=address, port=port))
    yield servers
    for s in servers:
        s.stop()


def test_dns_rows_name_each_nameserver_a_serial_disagreement_and_a_dead_one(two_nameservers):
    zones = render()
    for s in two_nameservers:
        s.sync(zones)
    config = {"dns": {"zones": [z.name for z in zones], "nameservers": [
        {"name": "ns1", "ipv4": "127.0.0.2"}, {"name": "ns2", "ipv4": "127.0.0.3"}]}}
    rows = checks.dns_rows(config, port=two_nameservers[0].port)
    assert [r.verdict for r in rows] == ["ok"] * 2 * len(zones), rows
    two_nameservers[1].sync(render(addrs={**ADDRS, next(iter(ADDRS)): ("192.0.2.99", "2001:db8::99")}))  # ns2 moves on
    config["dns"]["nameservers"].append({"name": "ns3", "ipv4": "127.0.0.4"})  # nothing answers there
    rows = checks.dns_rows(config, port=two_nameservers[0].port, timeout=0.5)
    disagree = [r for r in rows if r.check == "dns-serial"]
    assert disagree and all(r.verdict == "warn" and "ns1" in r.detail and "ns2" in r.detail for r in disagree)
    dead = [r for r in rows if "ns3" in r.target]
    assert len(dead) == len(zones) and all(r.verdict == "crit" for r in dead)
    assert checks.worst(rows) == "crit"


def outputs_file(tmp_path, total: float) -> str:
    doc = {"client_config": {"dns": {"zones": [], "nameservers": []}, "regions": []},
           "database": {"primary": "us-east", "replicas": ["eu-west"], "mode": "synchronous"},
           "monthly_cost_usd": {"total": total, "target": 30.0, "ceiling": 40.0, "prices_as_of": "2026-11", "items": []}}
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_the_exit_code_is_the_worst_verdict(tmp_path, capsys):
    assert main(["status", "production", "--outputs", outputs_file(tmp_path, 33.81)]) == 0
    out = capsys.readouterr().out
    assert "$33.81 (target $30.00, ceiling $40.00" in out and "primary us-east, replicas eu-west" in out
    assert "the stack's outputs name no monitoring hosts" in out  # outputs from before monitoring
    assert out.rstrip().endswith("production: OK (3 checks)")
    assert main(["status", "production", "--json", "--outputs", outputs_file(tmp_path, 41.0)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "warn" and {"check": "cost", "target": "monthly estimate", "verdict": "warn",
                                          "detail": "$41.00 (target $30.00, ceiling $40.00; prices as of 2026-11)"} in doc["rows"]


def test_missing_outputs_are_one_clear_line(tmp_path, capsys, monkeypatch):
    assert main(["status", "production", "--outputs", str(tmp_path / "none.json")]) == 3
    assert capsys.readouterr().err.strip() == f"ops: cannot read {tmp_path / 'none.json'}: No such file or directory"
    (tmp_path / "bad.json").write_text("[1]")
    assert main(["status", "production", "--outputs", str(tmp_path / "bad.json")]) == 3
    assert "holds no stack outputs" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no pulumi here
    assert main(["status", "production"]) == 3
    assert "the pulumi CLI is not on PATH" in capsys.readouterr().err
    monkeypatch.setattr(outputs, "LOCAL", tmp_path / "local")
    assert main(["status", "local"]) == 3
    assert "the local stack is not up" in capsys.readouterr().err


@pytest.mark.parametrize("left_days, lifetime_days, verdict", [
    (60, 90, "ok"), (13, 90, "warn"), (2, 90, "crit"),  # ACME's 90-day certificates
    (0.3, 0.5, "ok"), (0.1, 0.5, "warn"), (0.01, 0.5, "crit"),  # the local CA's 12-hour ones
])
def test_certificate_verdicts_follow_the_lifetime(left_days, lifetime_days, verdict):
    assert checks.cert_verdict(left_days * 86400, lifetime_days * 86400) == verdict
