"""Monitoring: Prometheus, Alertmanager and the blackbox and node exporters on every region and the
witness (FSD §9, issue #16) -- the pure renderers of their config, shared by production and tests.

Every host is a vantage point: its Prometheus scrapes its own services and probes EVERY region from
outside (DNS SOA of every zone on every nameserver, HTTPS /health of every billing and proxy through
the edge, whose TLS handshake also gives the certificate's expiry). So a region that is down is
still reported by the others, and "every region down" by the witness. The alert rules are the files
in payloads/monitoring/rules, the same ones production loads and `promtool test rules` tests.

One page per incident: every Prometheus drops its vantage label from the alerts it sends, so the
same alert seen from three hosts is one alert; the Alertmanagers form one cluster (port 9094),
which sends each notification once; inhibition lets "region down" silence what it explains.

The edge (Caddy) exposes no metrics: its admin endpoint, which serves them, is off (components/edge.py);
the HTTPS probes through it are how it is watched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import yaml

from components import consensus, cost, postgres_config as pgc
from components.cloud_init import DEPLOY_USER
from components.services import PROMETHEUS_ADDRESS_SUFFIX, ContainerSpec

PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
CLUSTER_PORT = 9094  # Alertmanager's gossip between the hosts (peer-only firewall)
BLACKBOX_PORT = 9115
NODE_PORT = 9100
RULES_DIR = "/etc/prometheus/rules"  # where the rules files are mounted in the Prometheus container
HEALTH_MODULE = "https_health"
# A service's metrics endpoint on its host's container network: job -> (address, path).
SERVICES = {
    "billing": ("billing:8000", "/metrics"),
    "proxy": ("proxy:4000", "/metrics"),
    # PowerDNS's webserver (components/dns.pdns_conf); it must allow the Prometheus container's address.
    "powerdns": ("dns:8081", "/metrics"),
}
# The database member's own exporter (payloads/postgres/pg_exporter.py): replication, archiving,
# backups. Plain HTTP on the container network only; its port is never published.
POSTGRES = (f"postgres:{pgc.EXPORTER_PORT}", "/metrics")
ETCD = f"etcd:{consensus.METRICS_PORT}"  # the consensus member on this host (its metrics listener)


# Readiness, not liveness: billing's /health is "a write commits"; the proxy's /ready is "a paid call
# can be served" (200 "degraded: stand-in" while billing cannot write but stand-in can answer).
READINESS = {"billing": "/health", "proxy": "/ready"}


@dataclass(frozen=True)
class RegionTargets:
    """What the vantage points probe of one region: its nameserver (host or address, :53 implied)
    and the health URLs through its edge, by service."""

    name: str
    nameserver: str
    health: dict[str, str] = field(default_factory=dict)  # service -> URL


def region_targets(regions, nameservers: dict[str, str] | None = None) -> list[RegionTargets]:
    """The probe targets of the configured regions (config.Region); `nameservers` (region -> IP
    address) when known, else the nameserver's name."""
    nameservers = nameservers or {}
    return [
        RegionTargets(r.name, nameservers.get(r.name, r.nameserver_fqdn),
                      {s: f"https://{s}1.{r.domain}{READINESS[s]}" for s in READINESS})
        for r in regions
    ]


def dns_module(zone: str) -> str:
    return "dns_soa_" + re.sub(r"[^a-z0-9]", "_", zone)


def _probe_job(name: str, module: str | None, targets: list[dict], blackbox: str, interval: str) -> dict:
    """A blackbox job: each target's address becomes the probe's `target` parameter and its
    `instance` label; the scrape itself goes to the blackbox exporter."""
    job = {
        "job_name": name,
        "scrape_interval": interval,
        "metrics_path": "/probe",
        "static_configs": targets,
        "relabel_configs": [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"source_labels": ["__param_target"], "target_label": "instance"},
            {"target_label": "__address__", "replacement": blackbox},
        ],
    }
    if module:
        job["params"] = {"module": [module]}
    return job


def prometheus_yml(
    vantage: str,
    regions: Sequence[RegionTargets],
    zones: Sequence[str],
    *,
    database: bool = False,
    etcd: bool = False,
    alertmanagers: Sequence[str] = (f"alertmanager:{ALERTMANAGER_PORT}",),
    rules_dir: str = RULES_DIR,
    services: dict[str, tuple[str, str]] | None = None,
    node: str | None = f"node-exporter:{NODE_PORT}",
    blackbox: str = f"blackbox:{BLACKBOX_PORT}",
    scrape_interval: str = "30s",
    probe_interval: str = "60s",
    evaluation_interval: str = "30s",
) -> str:
    """Prometheus's config on one vantage point (a region's name, or "witness"). `services`
    defaults to a region's own (SERVICES; the witness passes {}); `database`: this host runs a
    database member (its exporter's metrics); `etcd`: this host runs a consensus member. Every region in `regions` is probed, so a region added to
    the config is monitored by every vantage point with no other edit. Tests pass local addresses
    and short intervals."""
    services = SERVICES if services is None else services
    jobs = []
    for job, (address, path) in services.items():
        jobs.append({"job_name": job, "metrics_path": path, "static_configs": [{"targets": [address]}]})
    # Not Patroni's /metrics: Debian's Patroni 3.0 writes `patroni_postgres_timeline None` on a
    # replica, which fails the whole scrape; the database's series come from its own exporter.
    if database:
        address, path = POSTGRES
        jobs.append({"job_name": "postgres", "metrics_path": path, "static_configs": [{"targets": [address]}]})
    if etcd:
        jobs.append({"job_name": "etcd", "static_configs": [{"targets": [ETCD]}]})
    if node:
        jobs.append({"job_name": "node", "static_configs": [{"targets": [node]}]})
    # Every scraped own-service series carries this host's region (the witness: "witness").
    for job in jobs:
        for sc in job["static_configs"]:
            sc["labels"] = {"region": vantage}

    health = [{"targets": [url], "labels": {"region": r.name, "service": service}}
              for r in regions for service, url in r.health.items()]
    jobs.append(_probe_job("health", HEALTH_MODULE, health, blackbox, probe_interval))
    # One DNS job per zone (the module names the zone), every nameserver asked for its SOA.
    for zone in zones:
        targets = [{"targets": [f"{r.nameserver}:53"], "labels": {"region": r.name, "zone": zone}} for r in regions]
        jobs.append(_probe_job(f"dns_soa_{zone}", dns_module(zone), targets, blackbox, probe_interval))

    doc = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": evaluation_interval,
            "external_labels": {"vantage": vantage},
        },
        "rule_files": [f"{rules_dir}/*.yml"],
        "alerting": {
            # The same alert from every vantage point is one alert in the Alertmanager cluster.
            "alert_relabel_configs": [{"action": "labeldrop", "regex": "vantage"}],
            "alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}],
        },
        "scrape_configs": jobs,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def blackbox_yml(zones: Sequence[str], *, ca_file: str | None = None, timeout: str = "10s") -> str:
    """The blackbox exporter's modules: HTTPS /health (2xx, TLS verified: `ca_file` is the stack's
    own CA for `make local` and tests) and one SOA query per zone."""
    tls = {"insecure_skip_verify": False, **({"ca_file": ca_file} if ca_file else {})}
    modules = {
        HEALTH_MODULE: {
            "prober": "http",
            "timeout": timeout,
            "http": {
                "method": "GET",
                "valid_status_codes": [],  # 2xx
                "fail_if_not_ssl": True,
                "preferred_ip_protocol": "ip4",
                "tls_config": tls,
            },
        }
    }
    for zone in zones:
        modules[dns_module(zone)] = {
            "prober": "dns",
            "timeout": timeout,
            "dns": {
                "query_name": zone,
                "query_type": "SOA",
                "transport_protocol": "udp",
                "preferred_ip_protocol": "ip4",
                "recursion_desired": False,  # an authoritative server: its own answer or nothing
                "valid_rcodes": ["NOERROR"],
                "validate_answer_rrs": {"fail_if_none_matches_regexp": [r".*\tSOA\t.*"]},
            },
        }
    return yaml.safe_dump({"modules": modules}, sort_keys=False)


@dataclass(frozen=True)
class Timing:
    """Alertmanager's grouping: wait briefly so one incident's alerts arrive as one notification,
    then no more than one update per group_interval; repeat a still-firing page every few hours,
    not every few minutes (one person, 3 a.m.)."""

    # One probe interval plus one evaluation: a region's probes start failing up to that far apart,
    # and RegionDown must exist before its RegionCheckFailing would page on its own.
    group_wait: str = "90s"
    group_interval: str = "5m"
    repeat_critical: str = "4h"
    repeat_warning: str = "24h"
    # The heartbeat reaches the dead man's switch every 5-6 minutes (one group_interval tick after
    # the repeat): set the switch to expect a ping every 5 minutes, with 10 minutes of grace.
    heartbeat_interval: str = "1m"
    heartbeat_repeat: str = "5m"


# Inhibition: the alert that explains an incident silences the ones it explains (rules carry an
# `explained_by` label): a region down silences its own checks, certificates and scrape failures;
# any region down silences replication alerts (the replica it lost is the cause); every region
# down silences the per-region pages.
INHIBIT_RULES = [
    {"source_matchers": ['alertname="RegionDown"'], "target_matchers": ['explained_by="region_down"'], "equal": ["region"]},
    {"source_matchers": ['alertname="RegionDown"'], "target_matchers": ['explained_by="any_region_down"']},
    {"source_matchers": ['alertname="AllRegionsDown"'], "target_matchers": ['explained_by=~"region_down|any_region_down"']},
    {"source_matchers": ['alertname="AllRegionsDown"'], "target_matchers": ['alertname="RegionDown"']},
    # No database member accepting writes explains each region's billing check failing.
    {"source_matchers": ['alertname="DatabaseNotWritable"'],
     "target_matchers": ['alertname="RegionCheckFailing"', 'service="billing"']},
    {"source_matchers": ['alertname="AllRegionsDown"'], "target_matchers": ['alertname="DatabaseNotWritable"']},
    # No provider answering explains each provider failing over.
    {"source_matchers": ['alertname="AllUpstreamsFailing"'], "target_matchers": ['alertname="UpstreamFailingOver"'],
     "equal": ["region"]},
]


def alertmanager_yml(email=None, *, smtp_password: str | None = None, webhook_url: str | None = None,
                     heartbeat_url: str | None = None, timing: Timing = Timing()) -> str:
    """Alertmanager's config. `email` is config.EmailAlerts (or None); the secrets are passed in,
    so the result is a secret file (the plan shows it rendered with placeholders). No channel: a
    receiver with no integrations -- the alerts are visible in Prometheus and Alertmanager only.
    The always-firing Heartbeat goes to `heartbeat_url` (a dead man's switch outside the bridge)
    and never to the operator's channels."""
    receiver: dict = {"name": "operator"}
    doc: dict = {}
    if email:
        doc["global"] = {
            "smtp_smarthost": f"{email.smtp_host}:{email.smtp_port}",
            "smtp_from": email.sender,
            "smtp_auth_username": email.username or email.sender,
            "smtp_require_tls": True,
        }
        if smtp_password:
            doc["global"]["smtp_auth_password"] = smtp_password
        receiver["email_configs"] = [{"to": ", ".join(email.to), "send_resolved": True}]
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    heartbeat: dict = {"name": "heartbeat"}
    if heartbeat_url:
        heartbeat["webhook_configs"] = [{"url": heartbeat_url, "send_resolved": False}]
    doc["route"] = {
        "receiver": "operator",
        "group_by": ["alertname", "severity", "region"],
        "group_wait": timing.group_wait,
        "group_interval": timing.group_interval,
        "repeat_interval": timing.repeat_critical,
        "routes": [
            {"matchers": ['alertname="Heartbeat"'], "receiver": "heartbeat", "group_wait": "0s",
             "group_interval": timing.heartbeat_interval, "repeat_interval": timing.heartbeat_repeat},
            {"matchers": ['severity="warning"'], "repeat_interval": timing.repeat_warning},
        ],
    }
    doc["inhibit_rules"] = INHIBIT_RULES
    doc["receivers"] = [receiver, heartbeat]
    return yaml.safe_dump(doc, sort_keys=False)


def alertmanager_args(*, config_file: str, data_dir: str, listen: str, cluster_listen: str | None,
                      advertise: str | None = None, peers: Sequence[str] = (),
                      peer_timeout: str = "15s") -> list[str]:
    """Alertmanager's command line (its cluster is set by flags, not by its config file): every
    host's Alertmanager lists the others' `address:9094` as peers, so the cluster sends each
    notification once. `cluster_listen=None`: a lone Alertmanager (tests)."""
    args = [f"--config.file={config_file}", f"--storage.path={data_dir}", f"--web.listen-address={listen}"]
    if cluster_listen is None:
        return [*args, "--cluster.listen-address="]
    args += [f"--cluster.listen-address={cluster_listen}", f"--cluster.peer-timeout={peer_timeout}"]
    if advertise:
        assert advertise.rsplit(":", 1)[-1].isdigit(), f"advertise {advertise!r}: host:port (Alertmanager refuses a bare address)"
        args.append(f"--cluster.advertise-address={advertise}")
    return args + [f"--cluster.peer={p}" for p in peers]


def cost_textfile(config) -> str:
    """The stack's estimated monthly cost for the node exporter's textfile collector (the
    CostOverCeiling rule reads it; components/cost.py is the one estimate)."""
    est = cost.estimate(config.regions, config.budget, config.witness, config.backup)
    return (
        "# HELP ciris_estimated_monthly_cost_dollars The stack's estimated monthly cost (components/cost.py).\n"
        "# TYPE ciris_estimated_monthly_cost_dollars gauge\n"
        f"ciris_estimated_monthly_cost_dollars {cost.usd(est.total_cents)}\n"
        "# HELP ciris_budget_ceiling_dollars The stack's configured hard ceiling.\n"
        "# TYPE ciris_budget_ceiling_dollars gauge\n"
        f"ciris_budget_ceiling_dollars {cost.usd(est.ceiling_cents)}\n"
    )


def backup_textfile(config) -> str:
    """Whether the stack backs its database up, for the textfile collector (BackupStatusMissing:
    without backups no backup status is expected)."""
    return (
        "# HELP ciris_backup_configured 1 if the stack backs its database up (ciris-bridge:backup).\n"
        "# TYPE ciris_backup_configured gauge\n"
        f"ciris_backup_configured {1 if config.backup else 0}\n"
    )


def clock_textfile(kept: bool) -> str:
    """Whether the host keeps its own clock (systemd-timesyncd on the hosts; `make local` shares this
    machine's): the clock alerts read it."""
    return (
        "# HELP ciris_clock_kept 1 if this host synchronises its own clock (the clock alerts apply).\n"
        "# TYPE ciris_clock_kept gauge\n"
        f"ciris_clock_kept {1 if kept else 0}\n"
    )


def etcd_textfile(members: int) -> str:
    """How many etcd members the stack declares (EtcdMemberMissing: each should reach the others)."""
    return (
        "# HELP ciris_etcd_members The etcd members the stack declares (the witness and the database regions).\n"
        "# TYPE ciris_etcd_members gauge\n"
        f"ciris_etcd_members {members}\n"
    )


def no_channel_warning(config) -> str | None:
    """What the plan says of a stack (config.BridgeConfig) whose alerts reach no one."""
    if config.alerts.email is None and config.secret("alert_webhook_url") is None:
        return ("monitoring: no alert channel (set ciris-bridge:alerts.email, or the secret "
                "ciris-bridge:alert_webhook_url); alerts fire but reach no one")
    return None


def no_heartbeat_warning(config) -> str | None:
    """What the plan says of a stack whose monitoring could die unnoticed."""
    if config.secret("alert_heartbeat_url") is None and config.environment != "local":
        return ("monitoring: no heartbeat (set the secret ciris-bridge:alert_heartbeat_url to a dead man's "
                "switch expecting a ping every 5 minutes); if monitoring itself dies, nothing tells you")
    return None


def hosts_file(names: dict[str, str]) -> str:
    """/etc/hosts of the blackbox exporter: each region's health names pinned to that region's edge,
    so every region is probed through its own edge whatever DNS answers (and with no resolver)."""
    lines = ["127.0.0.1 localhost"] + [f"{address} {name}" for name, address in sorted(names.items())]
    return "\n".join(lines) + "\n"


# --- the containers (one image, payloads/monitoring; every host) ------------------------------

CONFIG_DIR = "/etc/ciris-monitoring"  # the bundle's monitoring/etc, read-only
IMAGE = "ciris-monitoring:local"


def _spec(name: str, role: str, port: int, health: str, **kw) -> ContainerSpec:
    return ContainerSpec(
        name=name, image=IMAGE, build="./monitoring", command=(role,),
        healthcheck=("CMD", "sh", "/usr/local/lib/ciris/start.sh", "health", str(port), health), **kw)


def containers() -> list[ContainerSpec]:
    """Prometheus and Alertmanager published on the host's loopback only (an operator's SSH
    tunnel); Alertmanager's cluster port on the host's addresses (peer-only firewall); the
    exporters publish nothing. Prometheus has a fixed address: PowerDNS's webserver lets it in."""
    etc = f"./monitoring/etc:{CONFIG_DIR}:ro"
    return [
        _spec("prometheus", "prometheus", PROMETHEUS_PORT, "/-/ready",
              loopback_ports=(f"{PROMETHEUS_PORT}:{PROMETHEUS_PORT}/tcp",), address_suffix=PROMETHEUS_ADDRESS_SUFFIX,
              volumes=(etc, "./monitoring/rules:/etc/prometheus/rules:ro", "prometheus-data:/var/lib/prometheus/data")),
        _spec("alertmanager", "alertmanager", ALERTMANAGER_PORT, "/-/ready",
              ports=(f"{CLUSTER_PORT}:{CLUSTER_PORT}/tcp", f"{CLUSTER_PORT}:{CLUSTER_PORT}/udp"),
              loopback_ports=(f"{ALERTMANAGER_PORT}:{ALERTMANAGER_PORT}/tcp",),
              volumes=(etc, "alertmanager-data:/var/lib/alertmanager")),
        _spec("blackbox", "blackbox", BLACKBOX_PORT, "/-/healthy",
              volumes=(etc, "./monitoring/etc/hosts:/etc/hosts:ro")),
        # The host's filesystems, read-only, for disk usage (DiskAlmostFull).
        _spec("node-exporter", "node-exporter", NODE_PORT, "/metrics", volumes=(etc, "/:/host:ro,rslave")),
    ]


def host_summary(host: str, ipv4: str, loopback: str, host_key: str) -> dict:
    """One host's entry in the `monitoring` output. Published on the machine's loopback (production),
    Prometheus is reached over SSH as the deploy user, the host's key pinned; published on the host's
    own address (`make local`), directly."""
    entry = {"host": host, "ipv4": ipv4, "prometheus": f"{loopback}:{PROMETHEUS_PORT}",
             "alertmanager": f"{loopback}:{ALERTMANAGER_PORT}"}
    if loopback in ("127.0.0.1", "::1"):
        entry["ssh"] = {"user": DEPLOY_USER, "port": 22, "host_key": host_key}
    return entry
