"""Monitors: the monitoring stack on every host, the regions and the witness (FSD §9, issue #16).

Each host gets Prometheus, Alertmanager and the blackbox and node exporters (components/monitoring.py
renders their config and their container specs); its Prometheus scrapes the host's own services
and probes every region -- each nameserver by its address, each edge by a hosts file that pins the
health names to that region's address -- so the probes depend on no resolver. The Alertmanagers
form one cluster over port 9094, opened to the bridge's own hosts only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pulumi

from components import monitoring
from components.config import BridgeConfig
from components.firewall import peer_rule
from components.node import Node
from components.region import Region
from components.services import MONITORING_UID, payload_files

EDGE_CA_IN_CONTAINER = f"{monitoring.CONFIG_DIR}/edge-ca.crt"


@dataclass(frozen=True)
class MonitorsArgs:
    nodes: list[Node]  # every host: the witness and the regions
    regions: list[Region]
    config: BridgeConfig
    database_hosts: list[str]  # the hosts that run a database member
    consensus_hosts: list[str]  # the hosts that run an etcd member
    edge_ca: pulumi.Input[str] | None = None  # `make local`: the edges' CA, which the probes trust


class Monitors(pulumi.ComponentResource):
    def __init__(self, name: str, args: MonitorsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Monitors", name, None, opts)
        cfg = args.config
        zones = list(cfg.zones.zones)
        specs = [r.spec for r in args.regions]
        # Each region's nameserver by its address, its edge by name (the hosts file pins it).
        targets = pulumi.Output.all(*[r.ipv4 for r in args.regions]).apply(
            lambda ips: monitoring.region_targets(specs, {s.name: ip for s, ip in zip(specs, ips)}))
        pinned = targets.apply(lambda ts: monitoring.hosts_file(
            {url.split("/")[2]: t.nameserver for t in ts for url in t.health.values()}))
        blackbox = monitoring.blackbox_yml(zones, ca_file=EDGE_CA_IN_CONTAINER if args.edge_ca else None)
        alertmanager = monitoring.alertmanager_yml(cfg.alerts.email, smtp_password=cfg.secret("alert_smtp_password"),
                                                   webhook_url=cfg.secret("alert_webhook_url"),
                                                   heartbeat_url=cfg.secret("alert_heartbeat_url"))
        shown_alertmanager = monitoring.alertmanager_yml(
            cfg.alerts.email, smtp_password="[secret]" if cfg.secret("alert_smtp_password") else None,
            webhook_url="https://[secret]" if cfg.secret("alert_webhook_url") else None,
            heartbeat_url="https://[secret]" if cfg.secret("alert_heartbeat_url") else None)
        for warning in (monitoring.no_channel_warning(cfg), monitoring.no_heartbeat_warning(cfg)):
            if warning:
                pulumi.log.warn(warning, self)

        for node in args.nodes:
            is_region = isinstance(node, Region)
            prometheus = targets.apply(lambda ts, vantage=node.spec.name, region=is_region: monitoring.prometheus_yml(
                vantage, ts, zones, database=vantage in args.database_hosts,
                etcd=vantage in args.consensus_hosts,
                services=None if region else {}))
            others = [n for n in args.nodes if n is not node]
            am_args = pulumi.Output.all(node.ipv4, *[n.ipv4 for n in others]).apply(
                lambda ips: "\n".join(monitoring.alertmanager_args(
                    config_file=f"{monitoring.CONFIG_DIR}/alertmanager.yml", data_dir="/var/lib/alertmanager",
                    listen=f"0.0.0.0:{monitoring.ALERTMANAGER_PORT}", cluster_listen=f"0.0.0.0:{monitoring.CLUSTER_PORT}",
                    advertise=f"{ips[0]}:{monitoring.CLUSTER_PORT}",
                    peers=[f"{ip}:{monitoring.CLUSTER_PORT}" for ip in ips[1:]])) + "\n")
            files = {
                "monitoring/etc/prometheus.yml": prometheus,
                "monitoring/etc/blackbox.yml": blackbox,
                "monitoring/etc/alertmanager.yml": pulumi.Output.secret(alertmanager),
                "monitoring/etc/alertmanager.args": am_args,
                "monitoring/etc/hosts": pinned,
                "monitoring/etc/textfile/cost.prom": monitoring.cost_textfile(cfg),
                "monitoring/etc/textfile/backup.prom": monitoring.backup_textfile(cfg),
                "monitoring/etc/textfile/clock.prom": monitoring.clock_textfile(cfg.environment != "local"),
                "monitoring/etc/textfile/etcd.prom": monitoring.etcd_textfile(len(args.consensus_hosts)),
                **({"monitoring/etc/edge-ca.crt": args.edge_ca} if args.edge_ca else {}),
                **payload_files("monitoring"),  # the image's build context and the rules
            }
            for spec in monitoring.containers():
                node.add_service(spec, files, private={"monitoring/etc/alertmanager.yml": MONITORING_UID},
                                 shown={"monitoring/etc/alertmanager.yml": shown_alertmanager})
            if others:
                peers = [(n.ipv4, n.ipv6) for n in others]
                tcp = peer_rule("alertmanager", monitoring.CLUSTER_PORT, peers, "Alertmanager cluster: the bridge's hosts")
                node.open("monitoring", [tcp, dataclasses.replace(tcp, name="alertmanager-udp", protocol="udp")])
        # The `monitoring` stack output: where `ops status` finds each host's Prometheus.
        self.summary = [pulumi.Output.all(node.ipv4, node.host_public_key).apply(
            lambda a, n=node: monitoring.host_summary(n.spec.name, a[0], n.host.loopback, a[1])) for node in args.nodes]
        self.register_outputs({})
