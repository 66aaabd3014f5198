"""`python -m components.plan` as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import REPO
from tests.infra.expected import MONITORING


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "components.plan", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_json_plan_has_the_contract():
    result = plan("staging", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"stack", "resources", "outputs", "cost"}
    assert doc["stack"] == "staging"
    assert set(doc["outputs"]) == {"client_config", "glue_records", "database", "monthly_cost_usd", "witness", "monitoring",
                                "release"}
    assert all(set(r) == {"type", "name", "parent", "inputs"} for r in doc["resources"])
    vm = next(r for r in doc["resources"] if r["type"] == "vultr:index/instance:Instance")
    assert vm["parent"] == "us-east" and vm["inputs"]["plan"] == "vc2-1c-2gb"
    assert doc["cost"]["total"] == doc["outputs"]["monthly_cost_usd"]["total"]


def test_text_plan_shows_hosts_firewalls_volume_and_contract():
    result = plan("production")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("us-east-vm", "eu-west-vm", "eu-west-volume", "Firewall", "5432/tcp", "Monthly cost", "client_config",
                   "us-east/proxy", "us-east-dns-sync", "eu-west-dns-sync", "us-east/dns"):
        assert needle in out, needle
    # A name the edge serves outside our zones: where to point it (ADR 19; production's are all ours).
    assert "outside the bridge's zones" not in result.stderr


def test_out_writes_the_rendered_artifacts(tmp_path):
    result = plan("staging", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for region in ("us-east", "eu-west"):
        assert (tmp_path / region / "cloud-init.yaml").read_text().startswith("#cloud-config")
        assert "reverse_proxy billing-main:8000 billing-twin:8000" in (tmp_path / region / "Caddyfile").read_text()
        compose = yaml.safe_load((tmp_path / region / "compose.yaml").read_text())
        assert set(compose["services"]) == {"edge", "dns", "etcd", "postgres", "billing", "proxy", *MONITORING,  # staging: no backup
                                            "billing-twin", "proxy-twin"}  # started only while a deploy replaces them
        # Published on the host's own addresses only, never the wildcard; Prometheus and Alertmanager on loopback.
        addresses = {r["ipv4"] for r in json.loads(plan("staging", "--json").stdout)["outputs"]["client_config"]["regions"]}
        ports = [p for svc in compose["services"].values() for p in svc.get("ports", [])]
        assert ports and all(p.split(":")[0] in addresses | {"127.0.0.1"} or p.startswith("[2001:db8:") for p in ports), ports
        assert sorted(p for p in ports if p.startswith("127.")) == ["127.0.0.1:9090:9090/tcp", "127.0.0.1:9093:9093/tcp"]
        assert "53:53/udp" in " ".join(compose["services"]["dns"]["ports"])
        assert "api-key=[secret]" in (tmp_path / region / "dns" / "pdns.conf").read_text()
    for zone in ("staging.ciris-services-1.ai", "staging.ciris-services-2.ai"):
        text = (tmp_path / "zones" / f"{zone}.zone").read_text()
        assert text.startswith(f"$ORIGIN {zone}.") and " IN SOA " in text


def test_invalid_config_exits_2_with_one_message(tmp_path):
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text((REPO / "Pulumi.staging.yaml").read_text().replace("provider: hetzner", "provider: hertzner"))
    result = plan("staging", "--stack-file", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "invalid config: ciris-bridge:regions[1].provider: unknown provider 'hertzner'; expected one of: vultr, hetzner, digitalocean, local"
    ]


def test_missing_stack_file_exits_2(tmp_path):
    result = plan("nosuchstack", "--stack-file", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "stack file not found" in result.stderr
