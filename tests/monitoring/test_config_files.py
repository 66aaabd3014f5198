"""The monitoring stack's rendered config, checked by the real tools (promtool, amtool), and its
rules tested by `promtool test rules` (tests/monitoring/rules/*_test.yml)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from components import config, monitoring, postgres_config as pgc
from tests.conftest import REPO, require_binary, stack_raw, third_region
from tests.monitoring.conftest import seconds

RULES = REPO / "payloads" / "monitoring" / "rules"
RULE_TESTS = Path(__file__).parent / "rules"
RUNBOOK = REPO / "docs" / "runbook-monitoring.md"
P = "ciris-bridge"


def run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def rules() -> list[dict]:
    return [r for f in sorted(RULES.glob("*.yml")) for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def vantage_files(tmp: Path, cfg: config.BridgeConfig) -> list[Path]:
    """prometheus.yml of every vantage point (each region, the witness) as production renders them."""
    targets = monitoring.region_targets(cfg.regions)
    out = []
    for vantage in [*[r.name for r in cfg.regions], "witness"]:
        region = next((r for r in cfg.regions if r.name == vantage), None)
        database = bool(region and region.postgres != "none")
        # etcd: on the witness and every database region, or beside the primary alone without a witness.
        etcd = (database or region is None) if cfg.witness else vantage == cfg.primary.name
        text = monitoring.prometheus_yml(
            vantage, targets, list(cfg.zones.zones), database=database, etcd=etcd,
            services=None if region else {}, rules_dir=str(RULES))
        path = tmp / f"prometheus-{vantage}.yml"
        path.write_text(text)
        out.append(path)
    return out


@pytest.mark.parametrize("regions", [2, 3])
def test_promtool_accepts_every_vantage_points_config(tmp_path, regions):
    promtool = require_binary("promtool")
    raw, secret_keys = stack_raw("production")
    if regions == 3:
        third_region(raw)
    cfg = config.parse(raw, secret_keys)
    for path in vantage_files(tmp_path, cfg):
        result = run(promtool, "check", "config", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(list(RULES.glob('*.yml')))} rule files found" in result.stdout


def test_a_third_region_is_probed_by_every_vantage_point_with_no_edit(tmp_path):
    raw, secret_keys = stack_raw("production")
    cfg = config.parse(third_region(raw), secret_keys)
    new = cfg.regions[2]
    for path in vantage_files(tmp_path, cfg):
        jobs = {j["job_name"]: j for j in yaml.safe_load(path.read_text())["scrape_configs"]}
        health = [sc for sc in jobs["health"]["static_configs"] if sc["labels"]["region"] == new.name]
        assert sorted(t for sc in health for t in sc["targets"]) == [
            f"https://billing1.{new.domain}/health", f"https://proxy1.{new.domain}/ready"]
        for zone in cfg.zones.zones:  # its nameserver is asked for every zone, and its zone of every nameserver
            dns = [t for sc in jobs[f"dns_soa_{zone}"]["static_configs"] for t in sc["targets"]]
            assert sorted(dns) == sorted(f"{r.nameserver_fqdn}:53" for r in cfg.regions)


def test_witness_scrapes_no_region_service_and_regions_scrape_their_own(tmp_path):
    cfg = config.load_stack_file(REPO / "Pulumi.production.yaml")
    by_vantage = {p.stem.removeprefix("prometheus-"): yaml.safe_load(p.read_text()) for p in vantage_files(tmp_path, cfg)}
    jobs = {v: {j["job_name"] for j in doc["scrape_configs"]} for v, doc in by_vantage.items()}
    probes = {"health", *(f"dns_soa_{z}" for z in cfg.zones.zones)}
    assert jobs["witness"] == probes | {"node", "etcd"}  # every host of production runs an etcd member
    assert jobs["us-east"] == probes | {"billing", "proxy", "powerdns", "postgres", "node", "etcd"}
    etcd = next(j for j in by_vantage["witness"]["scrape_configs"] if j["job_name"] == "etcd")
    assert etcd["static_configs"] == [{"targets": ["etcd:2381"], "labels": {"region": "witness"}}]  # plain HTTP, unpublished
    # Probe jobs are what the ServiceMetricsDown rule leaves out (a probe's own `up` is the exporter's).
    excluded = re.search(r'job!~"([^"]+)"', next(r for r in rules() if r["alert"] == "ServiceMetricsDown")["expr"]).group(1)
    assert all(re.fullmatch(excluded, j) for j in probes) and not any(re.fullmatch(excluded, j) for j in jobs["us-east"] - probes)
    # The vantage label keeps series apart in each Prometheus but is dropped from alerts (one alert, not three).
    for vantage, doc in by_vantage.items():
        assert doc["global"]["external_labels"] == {"vantage": vantage}
        assert {"action": "labeldrop", "regex": "vantage"} in doc["alerting"]["alert_relabel_configs"]


def test_every_database_member_scrapes_its_exporter(tmp_path):
    cfg = config.load_stack_file(REPO / "Pulumi.production.yaml")
    for path in vantage_files(tmp_path, cfg):
        vantage = path.stem.removeprefix("prometheus-")
        region = next((r for r in cfg.regions if r.name == vantage), None)
        jobs = {j["job_name"]: j for j in yaml.safe_load(path.read_text())["scrape_configs"]}
        if region is None or region.postgres == "none":
            assert "postgres" not in jobs and "patroni" not in jobs
            continue
        job = jobs["postgres"]
        assert job["static_configs"] == [{"targets": [f"postgres:{pgc.EXPORTER_PORT}"], "labels": {"region": vantage}}]
        assert job["metrics_path"] == "/metrics" and "scheme" not in job  # plain HTTP: the container network only


def test_every_series_the_rules_read_is_exported():
    """Each metric name in the rules is one a component exports (a rule on a name nobody exports
    never fires). The exporters' names are read from their source."""
    exported = set()
    for source in [*(REPO / "payloads").glob("*/*.py"), *(REPO / "payloads").glob("*/*/*.py"), REPO / "components" / "monitoring.py"]:
        exported |= set(re.findall(r"\b((?:ciris|billing)_[a-z0-9_]+)", source.read_text()))
    # Prometheus's own, the exporters' from Debian and etcd's: probe_*, node_*, etcd_*, up.
    outside = re.compile(r"(probe_|node_|etcd_)[a-z0-9_]+|up")
    read = set()
    for r in rules():
        expr = re.sub(r'"[^"]*"', "", r["expr"])  # label values are not names
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\b\s*(?:\{|\[|\)|>|<|=|!|$|\s)", expr):
            if name in PROMQL_WORDS or outside.fullmatch(name):
                continue
            read.add(name)
    assert read, "no series found in the rules"
    missing = sorted(n for n in read if n not in exported and n.removesuffix("_total") not in exported)
    assert not missing, f"the rules read series nothing exports: {missing}"


PROMQL_WORDS = {"max", "min", "sum", "count", "count_values", "by", "without", "and", "or", "unless", "increase", "delta",
                "rate", "time", "region", "member", "provider", "zone", "serial", "job", "instance", "outcome", "result",
                "fstype", "mountpoint", "bool", "on", "ignoring", "service", "group_left"}


def test_region_down_is_held_longer_than_its_checks_take_to_pass_again():
    """RegionDown's keep_firing_for must outlast how far apart its region's checks pass again (one
    probe interval, seen one evaluation later), or a check it inhibited pages as the region returns."""
    doc = yaml.safe_load(monitoring.prometheus_yml("us-east", [], []))
    probe = next(j["scrape_interval"] for j in doc["scrape_configs"] if j["job_name"] == "health")
    spread = seconds(probe) + seconds(doc["global"]["evaluation_interval"])
    down = next(r for r in rules() if r["alert"] == "RegionDown")
    assert seconds(down["keep_firing_for"]) > spread, (down["keep_firing_for"], spread)


def test_blackbox_config_is_accepted_by_the_exporter(tmp_path):
    exporter = require_binary("prometheus-blackbox-exporter")
    cfg = config.load_stack_file(REPO / "Pulumi.production.yaml")
    path = tmp_path / "blackbox.yml"
    path.write_text(monitoring.blackbox_yml(list(cfg.zones.zones)))
    result = run(exporter, f"--config.file={path}", "--config.check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_files_are_valid():
    result = run(require_binary("promtool"), "check", "rules", *map(str, sorted(RULES.glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    files = sorted(RULE_TESTS.glob("*_test.yml"))
    result = run(require_binary("promtool"), "test", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files) == len(list(RULES.glob("*.yml")))


def test_every_rule_fires_in_a_unit_test_and_links_its_runbook():
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.M)}
    fired = set()
    for f in RULE_TESTS.glob("*_test.yml"):
        for t in yaml.safe_load(f.read_text())["tests"]:
            fired |= {a["alertname"] for a in t.get("alert_rule_test", []) if a["exp_alerts"]}
    for rule in rules():
        assert rule["alert"] in fired, f"{rule['alert']} has no promtool test in which it fires"
        # The heartbeat's own severity: it goes to the dead man's switch, never to the operator.
        assert rule["labels"]["severity"] in ("warning", "critical") or (rule["alert"], rule["labels"]["severity"]) \
            == ("Heartbeat", "heartbeat")
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/runbook-monitoring.md" and anchor in anchors, rule["alert"]
        assert rule["alert"] in (REPO / "README.md").read_text(), f"README does not list {rule['alert']}"


def _email():
    return config.EmailAlerts.model_validate({"smtp_host": "smtp.example.org", "smtp_port": 587,
                                              "from": "alerts@example.org", "to": ["ops@example.org", "on-call@example.org"]})


@pytest.mark.parametrize("channels", ["none", "email", "webhook", "both"])
def test_amtool_accepts_alertmanager_config(tmp_path, channels):
    amtool = require_binary("amtool")
    email = _email() if channels in ("email", "both") else None
    webhook = "https://hooks.example.org/T0/CANARY-webhook-token" if channels in ("webhook", "both") else None
    heartbeat = "https://hc.example.org/ping/CANARY-heartbeat" if channels == "both" else None
    text = monitoring.alertmanager_yml(email, smtp_password="CANARY-smtp-password" if email else None, webhook_url=webhook,
                                       heartbeat_url=heartbeat)
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    result = run(amtool, "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CANARY" not in result.stdout + result.stderr
    doc = yaml.safe_load(text)
    assert doc["route"]["group_by"] == ["alertname", "severity", "region"]
    receiver, beat = doc["receivers"]
    assert ("email_configs" in receiver) == bool(email) and ("webhook_configs" in receiver) == bool(webhook)
    # The heartbeat goes to its own receiver only (the first route that matches it), never the operator's.
    assert doc["route"]["routes"][0]["matchers"] == ['alertname="Heartbeat"'] and doc["route"]["routes"][0]["receiver"] == "heartbeat"
    assert beat == {"name": "heartbeat", **({"webhook_configs": [{"url": heartbeat, "send_resolved": False}]} if heartbeat else {})}
    routed = run(amtool, "config", "routes", "test", "--config.file", str(path), "alertname=Heartbeat", "severity=heartbeat")
    assert routed.stdout.strip() == "heartbeat", routed.stdout + routed.stderr
    routed = run(amtool, "config", "routes", "test", "--config.file", str(path), "alertname=RegionDown", "severity=warning")
    assert routed.stdout.strip() == "operator", routed.stdout + routed.stderr
    if email:
        assert doc["global"]["smtp_auth_password"] == "CANARY-smtp-password"
        assert receiver["email_configs"][0]["to"] == "ops@example.org, on-call@example.org"


def test_alertmanager_cluster_flags_name_every_peer():
    args = monitoring.alertmanager_args(config_file="/c", data_dir="/d", listen="127.0.0.1:9093",
                                        cluster_listen="0.0.0.0:9094", advertise="198.51.100.1:9094",
                                        peers=["198.51.100.2:9094", "198.51.100.3:9094"])
    assert [a for a in args if a.startswith("--cluster.peer=")] == ["--cluster.peer=198.51.100.2:9094",
                                                                    "--cluster.peer=198.51.100.3:9094"]


def test_textfiles_are_the_estimate_and_whether_backups_are_configured():
    cfg = config.load_stack_file(REPO / "Pulumi.production.yaml")
    from components import cost

    total = cost.usd(cost.estimate(cfg.regions, cfg.budget, cfg.witness, cfg.backup).total_cents)
    assert f"ciris_estimated_monthly_cost_dollars {total}\n" in monitoring.cost_textfile(cfg)
    assert cfg.backup and "ciris_backup_configured 1\n" in monitoring.backup_textfile(cfg)
    raw, secret_keys = stack_raw("production")
    del raw[f"{P}:backup"]
    assert "ciris_backup_configured 0\n" in monitoring.backup_textfile(config.parse(raw, secret_keys))


# --- the alert channels in config ------------------------------------------------------------

def _with(raw, **alerts):
    raw[f"{P}:alerts"] = alerts
    return raw


def test_a_stack_without_channels_renders_and_is_warned_about():
    cfg = config.load_stack_file(REPO / "Pulumi.production.yaml")
    assert "reach no one" in monitoring.no_channel_warning(cfg)
    assert yaml.safe_load(monitoring.alertmanager_yml(cfg.alerts.email))["receivers"] == [{"name": "operator"},
                                                                                          {"name": "heartbeat"}]
    assert "dead man's switch" in monitoring.no_heartbeat_warning(cfg)


def test_email_channel_parses():
    raw, secret_keys = stack_raw("production")
    raw[f"{P}:alert_smtp_password"] = "pw"
    cfg = config.parse(_with(raw, email={"smtp_host": "smtp.example.org", "from": "a@example.org", "to": ["b@example.org"]}),
                       secret_keys | {f"{P}:alert_smtp_password"})
    assert cfg.alerts.email.smtp_port == 587 and cfg.alerts.email.sender == "a@example.org"
    assert monitoring.no_channel_warning(cfg) is None


@pytest.mark.parametrize("email,key,text", [
    ({"smtp_host": "smtp.example.org", "from": "not-an-address", "to": ["b@example.org"]}, "alerts.email.from", "not-an-address"),
    ({"smtp_host": "smtp.example.org", "from": "a@example.org", "to": []}, "alerts.email.to", "at least 1"),
    ({"smtp_host": "smtp.example.org", "from": "a@example.org", "to": ["b@x"]}, "alerts.email.to[0]", "b@x"),
    ({"smtp_host": "smtp example", "from": "a@example.org", "to": ["b@example.org"]}, "alerts.email.smtp_host", "smtp example"),
    ({"smtp_host": "smtp.example.org", "smtp_port": 0, "from": "a@example.org", "to": ["b@example.org"]}, "alerts.email.smtp_port", "0"),
    ({"smtp_host": "smtp.example.org", "from": "a@example.org", "to": ["b@example.org"], "pasword": "x"}, "alerts.email.pasword", "unknown"),
])
def test_bad_email_channel_names_the_value(email, key, text):
    raw, secret_keys = stack_raw("production")
    with pytest.raises(config.ConfigError) as info:
        config.parse(_with(raw, email=email), secret_keys)
    assert info.value.key == f"{P}:{key}" and text in str(info.value)


def test_webhook_url_must_be_https_and_is_never_shown():
    raw, secret_keys = stack_raw("production")
    raw[f"{P}:alert_webhook_url"] = "http://hooks.example.org/CANARY-token"
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys | {f"{P}:alert_webhook_url"})
    assert info.value.key == f"{P}:alert_webhook_url" and "https" in str(info.value)
    assert "CANARY" not in str(info.value)


def test_webhook_url_in_plain_text_is_refused():
    raw, secret_keys = stack_raw("production")
    raw[f"{P}:alert_webhook_url"] = "https://hooks.example.org/CANARY-token"
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert "--secret" in str(info.value) and "CANARY" not in str(info.value)


def test_smtp_password_without_email_is_refused():
    raw, secret_keys = stack_raw("production")
    raw[f"{P}:alert_smtp_password"] = "CANARY-pw"
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys | {f"{P}:alert_smtp_password"})
    assert info.value.key == f"{P}:alert_smtp_password" and "CANARY" not in str(info.value)
